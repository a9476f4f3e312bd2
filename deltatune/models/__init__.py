"""Models deltatune knows by name and the one way it loads any model: `load_model` returns the
model (fp32, SDPA, eval) with a tokenizer that pads on the right; `list_models` says which known
models are available offline here and what they cost on disk."""
from deltatune.models.loading import LoadedModel, load_model, save_quantized
from deltatune.models.registry import KNOWN_MODELS, KnownModel, list_models

__all__ = ["load_model", "LoadedModel", "save_quantized", "list_models", "KNOWN_MODELS", "KnownModel"]
