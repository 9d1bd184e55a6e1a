from fastapi import APIRouter

from api.deps import CatalogDep, ConversionsDep, RuntimeDep, SettingsDep
from api.responder import CompletionShape, Responder, respond
from api.schemas import CompletionRequest
from runtime.chat.prompts import TextPrompt

router = APIRouter(tags=["completions"])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, runtime: RuntimeDep, settings: SettingsDep,
                      catalog: CatalogDep, conversions: ConversionsDep):
    ref = catalog.locate(body.model)
    responder = Responder(CompletionShape(), ref.entry.id if ref.entry else body.model, body.include_usage,
                          settings.keepalive_seconds)
    prompt = TextPrompt(body.prompt)
    return await respond(ref, conversions, lambda entry: runtime.submit(entry, prompt, body.sampling(), body.keep_alive),
                         responder, body.stream)
