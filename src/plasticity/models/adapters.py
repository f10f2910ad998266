"""Where each architecture keeps its decoder blocks, final norm and unembedding.

Vectors are read from and written to a block's output through hooks on the same module,
so read and write points always agree; `output_hidden_states` is never used because
architectures disagree on whether its last entry is before or after the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchitectureAdapter:
    model_type: str
    blocks: str  # dotted path of the ModuleList of decoder blocks
    final_norm: str
    unembedding: str  # module whose .weight is (vocab, d_model); "a|b" tries a, then b

    def _get(self, model: nn.Module, path: str) -> nn.Module:
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part)
        return mod

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return self._get(model, self.blocks)

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        blocks = self.block_list(model)
        if not 0 <= layer < len(blocks):
            raise IndexError(f"layer {layer} is outside the model's {len(blocks)} blocks")
        return blocks[layer]

    def norm(self, model: nn.Module) -> nn.Module:
        return self._get(model, self.final_norm)

    def unembedding_matrix(self, model: nn.Module) -> torch.Tensor:
        # "a|b": the first path the model has (names moved between transformers versions).
        for path in self.unembedding.split("|"):
            try:
                return self._get(model, path).weight
            except AttributeError:
                continue
        raise AttributeError(f"{self.model_type}: no unembedding at {self.unembedding}")


ADAPTERS = {
    "gpt2": ArchitectureAdapter("gpt2", "transformer.h", "transformer.ln_f", "lm_head"),
    "biogpt": ArchitectureAdapter("biogpt", "biogpt.layers", "biogpt.layer_norm", "output_projection"),
    "llama": ArchitectureAdapter("llama", "model.layers", "model.norm", "lm_head"),
    "mistral": ArchitectureAdapter("mistral", "model.layers", "model.norm", "lm_head"),
    "qwen2": ArchitectureAdapter("qwen2", "model.layers", "model.norm", "lm_head"),
    "gemma3_text": ArchitectureAdapter("gemma3_text", "model.layers", "model.norm", "lm_head"),
    "gpt_neox": ArchitectureAdapter(
        "gpt_neox", "gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head|embed_out"
    ),
}


def adapter_for(model_or_type: nn.Module | str) -> ArchitectureAdapter:
    model_type = (
        model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    )
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"no architecture adapter for model_type {model_type!r}; known: {sorted(ADAPTERS)}"
        ) from None
