"""Batched forward passes with left padding, reading the last token of each prompt."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from plasticity.models.loading import LoadedModel


def model_device(lm: LoadedModel) -> torch.device:
    return next(lm.model.parameters()).device


def encode_left_padded(lm: LoadedModel, prompts: list[str]) -> dict[str, torch.Tensor]:
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc["attention_mask"]
    # Positions count real tokens only, so left padding does not shift them.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    device = model_device(lm)
    return {
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": mask.to(device),
        "position_ids": position_ids.to(device),
    }


def batches(items: list, size: int) -> Iterator[tuple[int, list]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


@torch.no_grad()
def forward(lm: LoadedModel, batch: dict[str, torch.Tensor], logits_to_keep: int = 1):
    """One forward pass; logits only for the last `logits_to_keep` positions (0: all).

    Everything here reads the last token, and the unembedding over every position costs
    as much as a small model's blocks, so by default only the last position is projected.
    """
    device = model_device(lm)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return lm.model(**batch, use_cache=False, logits_to_keep=logits_to_keep)
