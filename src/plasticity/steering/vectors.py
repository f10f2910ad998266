"""Steering-vector files: safetensors with provenance metadata, loadable on their own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class VectorFile:
    """Directions keyed `<method>.<layer>` and the metadata that says how they were made."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def direction(self, method: str, layer: int) -> torch.Tensor:
        key = f"{method}.{layer}"
        if key not in self.tensors:
            have = sorted(k for k in self.tensors if not k.startswith("residual_norm."))
            raise KeyError(f"no direction {key!r} in this file; it has {have}")
        return self.tensors[key]

    def check_width(self, d_model: int) -> None:
        width = int(self.metadata.get("d_model", -1))
        if width != d_model:
            raise ValueError(
                f"the vectors are {width} wide ({self.metadata.get('model')}); the model is {d_model}"
            )

    def check_tokenizer(self, fingerprint: str) -> None:
        """Refuse vectors read through a different tokenizer (files without a recorded
        fingerprint pass)."""
        mine = self.metadata.get("tokenizer_sha256")
        if mine is not None and mine != fingerprint:
            raise ValueError(
                f"the vectors come from a model with another tokenizer ({self.metadata.get('model')}, "
                f"vocabulary sha256 {mine[:12]}...); the model's is {fingerprint[:12]}..."
            )


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's vocabulary (token -> id), to tell tokenizers apart."""
    import hashlib
    import json

    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()


def read_vector_file(source: str | Path | bytes) -> VectorFile:
    """Read a vectors file written by the extract stage, from a path or its bytes."""
    from safetensors import safe_open
    from safetensors.torch import load

    if isinstance(source, bytes):
        import json
        import struct

        n = struct.unpack("<Q", source[:8])[0]
        header = json.loads(source[8 : 8 + n])
        return VectorFile(load(source), header.get("__metadata__", {}))
    with safe_open(str(source), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return VectorFile(tensors, meta)
