"""Concept datasets: labelled statements (RepE's true/false facts and files like it)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SHIPPED = {
    "facts_true_false": "repe/facts_true_false.csv",
}


@dataclass(frozen=True)
class Statement:
    text: str
    label: int  # 1 true, 0 false


def shipped_path(relative: str) -> Path:
    return Path(str(resources.files("plasticity.data") / "files" / relative))


def resolve_dataset(name_or_path: str) -> Path:
    if name_or_path in SHIPPED:
        return shipped_path(SHIPPED[name_or_path])
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(SHIPPED))
        raise FileNotFoundError(
            f"concept dataset {name_or_path!r} is neither a shipped dataset ({known}) nor a file"
        )
    return path


def load_statements(name_or_path: str = "facts_true_false") -> list[Statement]:
    """Read a `statement,label` CSV; every row must have a statement and a 0/1 label."""
    path = resolve_dataset(name_or_path)
    out: list[Statement] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"statement", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected statement,label")
        for lineno, row in enumerate(reader, start=2):
            text = (row.get("statement") or "").strip()
            label = (row.get("label") or "").strip()
            if not text or label not in ("0", "1"):
                raise ValueError(
                    f"{path}:{lineno}: expected a statement and a label 0 or 1, got {row!r}"
                )
            out.append(Statement(text, int(label)))
    if not out:
        raise ValueError(f"{path}: no statements")
    return out
