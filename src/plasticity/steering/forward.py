"""Batched forward passes with left padding, reading the last token of each prompt."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from plasticity.models.loading import LoadedModel
from plasticity.models.tokens import special_prefix


def model_device(lm: LoadedModel) -> torch.device:
    return next(lm.model.parameters()).device


def pad_left(token_lists: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Left-pad token id lists into a batch with its attention mask and position ids."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        if toks:
            ids[i, width - len(toks) :] = torch.tensor(toks)
            mask[i, width - len(toks) :] = 1
    # Positions count real tokens only, so left padding does not shift them.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": position_ids.to(device),
    }


def encode_left_padded(lm: LoadedModel, prompts: list[str]) -> dict[str, torch.Tensor]:
    prefix = special_prefix(lm.tokenizer)
    ids = [prefix + x for x in lm.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    return pad_left(ids, lm.tokenizer.pad_token_id, model_device(lm))


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


@torch.no_grad()
def collect_last_token(
    lm: LoadedModel, prompts: list[str], layers: list[int], batch_size: int,
    on_rows: Callable[[int], None] | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Hidden state of the last token of each prompt at each layer's block output.
    `on_rows(n)`, if given, is called as each forward pass is done with its n prompts."""
    from plasticity.steering.hooks import capture, hook_name

    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    token_index: list[torch.Tensor] = []
    with capture(lm, layers) as store:
        for _, chunk in batches(prompts, batch_size):
            enc = encode_left_padded(lm, chunk)
            forward(lm, enc)
            token_index.append(enc["attention_mask"].sum(-1).cpu() - 1)
            for layer in layers:
                out[layer].append(store[hook_name(layer)][:, -1].float().cpu())
            if on_rows is not None:
                on_rows(len(chunk))
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(token_index)
