"""The items a steering sweep scores: held-out statements, TruthfulQA questions and
PubMedQA questions, chosen and ordered by `plasticity.seed`, the same for every checkpoint
and every stage that scores behaviour."""

from __future__ import annotations

import random

from plasticity.config import RunConfig
from plasticity.models.loading import LoadedModel


def facts_items(cfg: RunConfig, train_statements: set[int]):
    """`plasticity.n_items` statements, half true and half false, interleaved."""
    from plasticity.data.concepts import load_statements

    statements = load_statements(cfg.concept.dataset)
    # Prefer statements that did not feed the training pairs of the direction (by text:
    # the dataset repeats some statements).
    train_texts = {statements[i].text for i in train_statements}
    pool = [s for s in statements if s.text not in train_texts] or statements
    rng = random.Random(cfg.plasticity.seed)
    # As many true as false statements: a shift of the model's True/False bias then
    # cancels in the label-signed mean, which moves only with discrimination.
    by_label = {label: [s for s in pool if s.label == label] for label in (1, 0)}
    for group in by_label.values():
        rng.shuffle(group)
    half = min(cfg.plasticity.n_items // 2, len(by_label[0]), len(by_label[1]))
    if half == 0:
        raise ValueError(
            f"concept.dataset {cfg.concept.dataset!r}: held-out statements of both labels are "
            "needed to score facts metrics (and plasticity.n_items >= 2)"
        )
    items = [s for pair in zip(by_label[1][:half], by_label[0][:half], strict=True) for s in pair]
    return items


def _sample(items: list, cfg: RunConfig) -> list:
    """`plasticity.n_items` items in a seeded random order."""
    items = list(items)
    random.Random(cfg.plasticity.seed).shuffle(items)
    return items[: cfg.plasticity.n_items]


def truthfulqa_items(cfg: RunConfig):
    from plasticity.data.truthfulqa import load_truthfulqa

    return _sample(load_truthfulqa(), cfg)


def pubmedqa_items(cfg: RunConfig):
    from plasticity.data.pubmedqa import load_pubmedqa

    return _sample(load_pubmedqa("test"), cfg)


def eval_sets(cfg: RunConfig, lm: LoadedModel) -> dict[str, list]:
    """The items of every configured metric, as `sweep_scores` takes them: statements
    held out of the direction's training pairs, and the QA sets the metrics name."""
    from plasticity.data.concepts import load_statements
    from plasticity.steering.prompts import contrast_pairs

    c, p = cfg.concept, cfg.plasticity
    pairs = contrast_pairs(load_statements(c.dataset), lm.tokenizer, c, cfg.model)
    train_statements = {pair.statement_index for pair in pairs[: c.n_train]}
    return dict(
        facts=facts_items(cfg, train_statements),
        questions=truthfulqa_items(cfg) if any(m.startswith("truthfulqa") for m in p.metrics) else [],
        pubmedqa=pubmedqa_items(cfg) if "pubmedqa_accuracy" in p.metrics else [],
    )
