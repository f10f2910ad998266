"""TruthfulQA (the CSV release) as multiple-choice items for MC1 and MC2."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from plasticity.data.concepts import shipped_path


@dataclass(frozen=True)
class TruthfulQAItem:
    question: str
    best: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]


def _answers(cell: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in cell.split(";") if a.strip())


def load_truthfulqa(path: str | Path | None = None) -> list[TruthfulQAItem]:
    path = Path(path) if path else shipped_path("truthfulqa/TruthfulQA.csv")
    items = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            try:
                item = TruthfulQAItem(
                    question=row["Question"].strip(),
                    best=row["Best Answer"].strip(),
                    correct=_answers(row["Correct Answers"]),
                    incorrect=_answers(row["Incorrect Answers"]),
                )
            except (KeyError, AttributeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a TruthfulQA row ({exc})") from exc
            if not item.question or not item.best or not item.incorrect:
                raise ValueError(f"{path}:{lineno}: a question needs a best and an incorrect answer")
            items.append(item)
    return items
