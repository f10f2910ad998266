"""Model loading (hub ids, local folders, offline presets) and architecture adapters."""

from plasticity.models.adapters import ArchitectureAdapter, adapter_for
from plasticity.models.loading import LoadedModel, load_model, load_tokenizer_from, model_layers

__all__ = [
    "ArchitectureAdapter",
    "adapter_for",
    "LoadedModel",
    "load_model",
    "load_tokenizer_from",
    "model_layers",
]
