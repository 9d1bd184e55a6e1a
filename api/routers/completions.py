from fastapi import APIRouter

from api.deps import RuntimeDep, SettingsDep
from api.responder import CompletionShape, Responder, respond
from api.schemas import CompletionRequest
from runtime.prompts import TextPrompt

router = APIRouter(tags=["completions"])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, runtime: RuntimeDep, settings: SettingsDep):
    entry = runtime.resolve(body.model)
    job = runtime.submit(entry, TextPrompt(body.prompt), body.sampling())
    responder = Responder(CompletionShape(), entry.id, body.include_usage, settings.keepalive_seconds)
    return await respond(job, responder, body.stream)
