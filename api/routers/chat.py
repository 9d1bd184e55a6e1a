from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api.deps import RuntimeDep
from api.responder import ChatShape, Responder, wait_started
from api.schemas import ChatCompletionRequest
from runtime.prompts import ChatPrompt

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, runtime: RuntimeDep):
    entry = runtime.resolve(body.model)
    job = runtime.submit(entry, ChatPrompt(body.template_messages()), body.sampling())
    await wait_started(job)
    responder = Responder(ChatShape, entry.id, body.include_usage)
    if body.stream:
        return StreamingResponse(responder.stream(job), media_type="text/event-stream")
    return await responder.complete(job)
