"""The converted-model store."""
