"""Loading models and data: the embedded default, Hugging Face ids and local paths."""

from .data import TextData, load_text, token_chunks
from .loader import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model", "TextData", "load_text", "token_chunks"]
