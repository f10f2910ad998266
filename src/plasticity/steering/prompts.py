"""RepE's honesty contrast prompts from labelled statements."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from plasticity.config import ConceptConfig, ModelConfig
from plasticity.data.concepts import Statement


@dataclass(frozen=True)
class ContrastPair:
    pair_id: int
    statement_index: int
    prompts: tuple[str, str]  # in presentation order
    labels: tuple[int, int]  # 1 = positive persona (honest), 0 = negative, same order


def render(template: str, persona: str, prefix: str, model_cfg: ModelConfig) -> str:
    text = template.format(
        user_tag=model_cfg.user_tag,
        assistant_tag=model_cfg.assistant_tag,
        persona=persona,
        prefix=prefix,
    )
    # Empty tags leave doubled or leading spaces behind.
    return re.sub(r" {2,}", " ", text).strip()


def contrast_pairs(
    statements: list[Statement], tokenizer, cfg: ConceptConfig, model_cfg: ModelConfig
) -> list[ContrastPair]:
    """Cut each true statement after each token prefix (1 … len-5 tokens) and wrap it in
    the positive and negative persona; members of each pair are shuffled with a seeded RNG.
    """
    if cfg.positive == cfg.negative:
        raise ValueError(
            f"concept.positive and concept.negative are both {cfg.positive!r}: "
            "the contrast set would be one-sided"
        )
    if not any(st.label == 1 for st in statements):
        raise ValueError(
            f"concept {cfg.name!r}: the dataset has no statements labelled 1 to build "
            "contrast pairs from"
        )
    rng = random.Random(cfg.seed)
    pairs: list[ContrastPair] = []
    for s_idx, st in enumerate(statements):
        if st.label != 1:
            continue
        tokens = tokenizer.tokenize(st.text)
        for cut in range(1, len(tokens) - 4):
            prefix = tokenizer.convert_tokens_to_string(tokens[:cut])
            pos = render(cfg.template, cfg.positive, prefix, model_cfg)
            neg = render(cfg.template, cfg.negative, prefix, model_cfg)
            if rng.random() < 0.5:
                prompts, labels = (pos, neg), (1, 0)
            else:
                prompts, labels = (neg, pos), (0, 1)
            pairs.append(ContrastPair(len(pairs), s_idx, prompts, labels))
            if cfg.max_pairs is not None and len(pairs) == cfg.max_pairs:
                return pairs
    if not pairs:
        raise ValueError(
            f"concept {cfg.name!r}: no contrast pairs; every true statement is 5 tokens or "
            "shorter for this tokenizer"
        )
    return pairs
