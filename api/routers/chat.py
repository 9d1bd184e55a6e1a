from fastapi import APIRouter

from api.deps import RuntimeDep, SettingsDep
from api.responder import ChatShape, Responder, respond
from api.schemas import ChatCompletionRequest
from runtime.prompts import ChatPrompt

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, runtime: RuntimeDep, settings: SettingsDep):
    entry = runtime.resolve(body.model)
    prompt = ChatPrompt(body.template_messages(), body.tool_dicts(), body.tool_choice_value(), body.parallel_tool_calls)
    job = runtime.submit(entry, prompt, body.sampling())
    responder = Responder(ChatShape(settings.reasoning_field), entry.id, body.include_usage, settings.keepalive_seconds)
    return await respond(job, responder, body.stream)
