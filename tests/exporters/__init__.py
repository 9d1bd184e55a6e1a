"""One module per source format: `export(model, arch, dest) -> Path` writes a tiny transformers model
with that ecosystem's own exporter; an optional `reference_logits(model, arch, ids)` gives the torch
reference when the export is lossy (quantised); otherwise the model's own fp32 logits are the reference."""
