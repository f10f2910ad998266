"""Text corpora for fine-tuning: shipped ones by name, or any Parquet/JSONL/CSV/text file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from plasticity.data.concepts import shipped_path

SHIPPED_CORPORA = {
    "pubmed": ("pubmed/pubmed20n0014_sample2000.parquet", "abstract"),
    "e2e": ("e2e/devset.csv", None),
}
TEXT_FIELDS = ("text", "abstract", "content", "ref")


def _pick_field(columns: list[str], text_field: str | None, path: Path) -> str:
    if text_field is not None:
        if text_field not in columns:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {columns})")
        return text_field
    for name in TEXT_FIELDS:
        if name in columns:
            return name
    raise ValueError(f"{path}: cannot tell which column holds text among {columns}; set data.text_field")


def _e2e_text(row: dict[str, str]) -> str:
    # The fine-tuning format of the E2E task: meaning representation, then the reference.
    return f"{row['mr']} ||| {row['ref']}"


def load_corpus(
    corpus: str, text_field: str | None = None, max_documents: int | None = None
) -> list[str]:
    """Return the documents of a corpus as strings, in file order."""
    if corpus in SHIPPED_CORPORA:
        rel, default_field = SHIPPED_CORPORA[corpus]
        path = shipped_path(rel)
        text_field = text_field or default_field
    else:
        path = Path(corpus).expanduser()
        if not path.is_file():
            known = ", ".join(sorted(SHIPPED_CORPORA))
            raise FileNotFoundError(
                f"data.corpus {corpus!r} is neither a shipped corpus ({known}) nor a file"
            )
    suffix = path.suffix.lower()
    docs: list[str]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        name = _pick_field(schema.names, text_field, path)
        docs = [d for d in pq.read_table(path, columns=[name]).column(name).to_pylist() if d]
    elif suffix in (".jsonl", ".json"):
        docs = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not a JSON line: {exc}") from exc
                name = _pick_field(list(rec), text_field, path)
                docs.append(str(rec[name]))
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = list(reader.fieldnames or [])
            if text_field is None and {"mr", "ref"} <= set(cols):
                docs = [_e2e_text(r) for r in reader]
            else:
                name = _pick_field(cols, text_field, path)
                docs = [r[name] for r in reader if r.get(name)]
    elif suffix in (".txt", ".text", ".md"):
        # One document per blank-line-separated paragraph.
        docs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    else:
        raise ValueError(f"{path}: unsupported corpus format {suffix!r} (parquet, jsonl, csv, txt)")
    if max_documents is not None:
        docs = docs[:max_documents]
    if not docs:
        raise ValueError(f"{path}: the corpus has no documents")
    return docs
