"""PubMedQA-L (expert-labelled yes/no/maybe questions with abstracts)."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Literal

from plasticity.data.concepts import shipped_path

MAX_CONTEXT_CHARS = 1500  # keeps prompts inside small models' context windows


@dataclass(frozen=True)
class PubMedQAItem:
    pmid: str
    question: str
    context: str
    decision: str  # yes, no or maybe


def _contexts(value) -> list[str]:
    # The release stores the context list either as a list or as its Python repr.
    if isinstance(value, list):
        return value
    return list(ast.literal_eval(value))


def load_pubmedqa(split: Literal["test", "train", "all"] = "test", yes_no_only: bool = True) -> list[PubMedQAItem]:
    """PubMedQA-L items; `test` is the 500 questions of the official test split."""
    data = json.loads(shipped_path("pubmedqa/ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = set(json.loads(shipped_path("pubmedqa/test_ground_truth.json").read_text()))
    items = []
    for pmid, rec in data.items():
        if split == "test" and pmid not in test_ids or split == "train" and pmid in test_ids:
            continue
        decision = rec["final_decision"]
        if yes_no_only and decision not in ("yes", "no"):
            continue
        context = " ".join(_contexts(rec["CONTEXTS"]))[:MAX_CONTEXT_CHARS]
        items.append(PubMedQAItem(pmid, rec["QUESTION"].strip(), context, decision))
    return items
