from fastapi import APIRouter

from api.deps import CatalogDep, ConversionsDep, RuntimeDep, SettingsDep
from api.responder import ChatShape, Responder, respond
from api.schemas import ChatCompletionRequest
from runtime.chat.prompts import ChatPrompt

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, runtime: RuntimeDep, settings: SettingsDep,
                           catalog: CatalogDep, conversions: ConversionsDep):
    ref = catalog.locate(body.model)
    prompt = ChatPrompt(body.template_messages(), body.tool_dicts(), body.tool_choice_value(), body.parallel_tool_calls)
    responder = Responder(ChatShape(settings.reasoning_field), ref.entry.id if ref.entry else body.model,
                          body.include_usage, settings.keepalive_seconds)
    return await respond(ref, conversions, lambda entry: runtime.submit(entry, prompt, body.sampling(), body.keep_alive),
                         responder, body.stream)
