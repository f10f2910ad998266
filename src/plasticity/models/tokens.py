"""The special tokens a tokenizer puts before a text by default (Gemma's BOS).

Prompts and training documents are tokenized without special tokens, so that prompt
and continuation join exactly; the prefix is then put back at the start of each
sequence, since a model trained with a BOS there (Gemma) reads text without it badly.
Tokenizers that add nothing (GPT-2, SmolLM2) get an empty prefix: their sequences are
unchanged.
"""

from __future__ import annotations

_PROBE = "The"


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer adds before a text by default ([] when none)."""
    cached = getattr(tokenizer, "_plasticity_prefix", None)
    if cached is None:
        full = list(tokenizer(_PROBE)["input_ids"])
        plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
        cached = []
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                cached = full[:i]
                break
        try:
            tokenizer._plasticity_prefix = cached
        except AttributeError:  # a tokenizer that refuses attributes: probe each time
            pass
    return list(cached)
