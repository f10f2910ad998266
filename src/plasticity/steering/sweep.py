"""A whole steering sweep in one stream of batched forward passes.

Every item (a statement, a question, an answer) is repeated once per *variant* of the
model - the unsteered model, and each (direction, alpha) of the sweep - and each row of a
batch is steered with its own direction and coefficient (`RowSteering`). The repeats of
an item sit next to each other, so batches stay free of padding between variants, and a
sweep costs about one pass over (items x variants) rows instead of one pass per alpha.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from plasticity.models.loading import LoadedModel
from plasticity.steering.evaluate import (
    answer_log_odds,
    continuation_logprobs,
    facts_prompts,
    facts_signs,
    pubmedqa_correct,
    pubmedqa_prompts,
    truthfulqa_mc_from_scores,
    truthfulqa_pairs,
)
from plasticity.steering.hooks import RowSteering

METRICS = ("facts_logit_gap", "facts_accuracy", "facts_true_bias", "truthfulqa_mc1", "truthfulqa_mc2", "pubmedqa_accuracy")


@dataclass(frozen=True)
class Variant:
    """One version of the model in a sweep: a direction (an index into the steering's
    stacked directions; -1 for the unsteered model) and its coefficient."""

    direction: int
    coef: float


UNSTEERED = Variant(-1, 0.0)


def sweep_scores(
    lm: LoadedModel,
    metrics: list[str],
    variants: list[Variant],
    steering: RowSteering | None = None,
    facts=(),
    questions=(),
    pubmedqa=(),
    batch_size: int = 16,
    on_rows: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-item metric values of every variant, as (variants, items) tensors.

    `steering` must be open (entered) when any variant is steered; `batch_size` counts
    rows (item x variant) per forward pass. `on_rows(n)`, if given, is called as each
    forward pass is done with its n rows; they add up to `len(variants) *
    sweep_rows(metrics, ...)`.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {METRICS}")
    if steering is None and any(v.direction >= 0 for v in variants):
        raise ValueError("steered variants need a RowSteering")
    n_var = len(variants)
    index = torch.tensor([v.direction for v in variants], dtype=torch.long)
    coef = torch.tensor([v.coef for v in variants], dtype=torch.float64)

    pending = [0]  # rows of the forward pass in flight

    def on_batch(start: int, stop: int) -> None:
        if on_rows is not None:
            if pending[0]:
                on_rows(pending[0])
            pending[0] = stop - start
        if steering is not None:
            rows = torch.arange(start, stop) % n_var
            steering.set_rows(index[rows], coef[rows])

    def repeat(xs: list) -> list:
        return [x for x in xs for _ in range(n_var)]

    out: dict[str, torch.Tensor] = {}
    if {"facts_logit_gap", "facts_accuracy", "facts_true_bias"} & set(metrics):
        facts = list(facts)
        odds = answer_log_odds(lm, repeat(facts_prompts(facts)), (" True", " False"), batch_size, on_batch)
        odds = odds.view(len(facts), n_var).T
        gap = odds * facts_signs(facts)[None]
        out["facts_logit_gap"], out["facts_accuracy"] = gap, (gap > 0).double()
        out["facts_true_bias"] = odds
    if {"truthfulqa_mc1", "truthfulqa_mc2"} & set(metrics):
        questions = list(questions)
        prompts, conts, owners = truthfulqa_pairs(questions)
        scores = continuation_logprobs(lm, repeat(prompts), repeat(conts), batch_size, on_batch)
        out["truthfulqa_mc1"], out["truthfulqa_mc2"] = truthfulqa_mc_from_scores(
            scores.view(len(prompts), n_var), owners, len(questions)
        )
    if "pubmedqa_accuracy" in metrics:
        pubmedqa = list(pubmedqa)
        odds = answer_log_odds(lm, repeat(pubmedqa_prompts(pubmedqa)), (" yes", " no"), batch_size, on_batch)
        odds = odds.view(len(pubmedqa), n_var).T
        out["pubmedqa_accuracy"] = torch.stack([pubmedqa_correct(row, pubmedqa) for row in odds])
    if on_rows is not None and pending[0]:
        on_rows(pending[0])
    return {m: out[m] for m in metrics}


def sweep_rows(metrics: list[str], facts=(), questions=(), pubmedqa=()) -> int:
    """The rows (forward-pass inputs) `sweep_scores` runs per variant for these items."""
    rows = 0
    if {"facts_logit_gap", "facts_accuracy", "facts_true_bias"} & set(metrics):
        rows += len(list(facts))
    if {"truthfulqa_mc1", "truthfulqa_mc2"} & set(metrics):
        rows += len(truthfulqa_pairs(list(questions))[0])
    if "pubmedqa_accuracy" in metrics:
        rows += len(list(pubmedqa))
    return rows
