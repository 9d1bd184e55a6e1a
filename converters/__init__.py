"""Source-format converters: detect a model by content and read it as HF-named tensors."""
