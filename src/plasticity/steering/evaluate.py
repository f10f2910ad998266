"""Behavioural metrics of a (possibly steered) model."""

from __future__ import annotations

import torch

from plasticity.data.concepts import Statement
from plasticity.models.loading import LoadedModel
from plasticity.steering.forward import batches, encode_left_padded, forward

FACTS_PROMPT = "Is the following statement true or false?\nStatement: {statement}\nAnswer:"


def answer_token_ids(tokenizer, answers: tuple[str, str] = (" True", " False")) -> tuple[int, int]:
    ids = []
    for a in answers:
        toks = tokenizer(a, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"answer {a!r} is {len(toks)} tokens for this tokenizer; need one")
        ids.append(toks[0])
    return ids[0], ids[1]


@torch.no_grad()
def facts_logit_gap(
    lm: LoadedModel, statements: list[Statement], batch_size: int = 16
) -> torch.Tensor:
    """Per statement: log p(' True') - log p(' False') for the next token, times +1 for a
    true statement and -1 for a false one (positive = the model leans to the right answer).

    Steering, if any, comes from hooks the caller holds open around this call.
    """
    true_id, false_id = answer_token_ids(lm.tokenizer)
    prompts = [FACTS_PROMPT.format(statement=s.text) for s in statements]
    signs = torch.tensor([1.0 if s.label == 1 else -1.0 for s in statements], dtype=torch.float64)
    out = torch.empty(len(prompts), dtype=torch.float64)
    for start, chunk in batches(prompts, batch_size):
        logits = forward(lm, encode_left_padded(lm, chunk)).logits[:, -1].double()
        logp = torch.log_softmax(logits, dim=-1)
        out[start : start + len(chunk)] = (logp[:, true_id] - logp[:, false_id]).cpu()
    return out * signs


def bootstrap_ci(
    values: torch.Tensor, n_resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values`."""
    n = len(values)
    if n < 2:
        v = float(values.mean()) if n else float("nan")
        return v, v
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_resamples, n), generator=gen)
    means = values.double()[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64))
    return float(lo), float(hi)
