from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api.deps import RuntimeDep
from api.responder import CompletionShape, Responder, wait_started
from api.schemas import CompletionRequest
from runtime.prompts import TextPrompt

router = APIRouter(tags=["completions"])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, runtime: RuntimeDep):
    entry = runtime.resolve(body.model)
    job = runtime.submit(entry, TextPrompt(body.prompt), body.sampling())
    await wait_started(job)
    responder = Responder(CompletionShape, entry.id, body.include_usage)
    if body.stream:
        return StreamingResponse(responder.stream(job), media_type="text/event-stream")
    return await responder.complete(job)
