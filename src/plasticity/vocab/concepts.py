"""Concept word lists (shipped under data/files/concept_words/) as token id sets."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

SHIPPED_CONCEPTS = ("honesty", "deception")


def concept_words_path(name_or_path: str) -> Path:
    """A shipped list (`honesty`, `deception`) or a path to a text file of words."""
    if name_or_path in SHIPPED_CONCEPTS:
        return Path(
            str(resources.files("plasticity.data") / "files" / "concept_words" / f"{name_or_path}.txt")
        )
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"vocab.concepts: {name_or_path!r} is neither a shipped word list "
            f"({', '.join(SHIPPED_CONCEPTS)}) nor a file"
        )
    return path


def concept_name(name_or_path: str) -> str:
    return name_or_path if name_or_path in SHIPPED_CONCEPTS else Path(name_or_path).stem


def load_words(name_or_path: str) -> list[str]:
    path = concept_words_path(name_or_path)
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word = line.split("#", 1)[0].strip()
        if word:
            words.append(word)
    if not words:
        raise ValueError(f"{path}: no words")
    return words


def word_forms(word: str) -> list[str]:
    """Lowercase and capitalised, each with and without a leading space."""
    out = []
    for w in dict.fromkeys([word.lower(), word[:1].upper() + word[1:].lower()]):
        out += [w, " " + w]
    return out


def concept_token_ids(tokenizer, name_or_path: str, vocab_size: int | None = None) -> torch.Tensor:
    """Ids of the single-token forms of the concept's words (sorted, unique)."""
    ids: set[int] = set()
    for word in load_words(name_or_path):
        for form in word_forms(word):
            enc = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and (vocab_size is None or enc[0] < vocab_size):
                ids.add(int(enc[0]))
    return torch.tensor(sorted(ids), dtype=torch.long)
