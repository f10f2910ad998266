"""Load a causal LM and its tokenizer from a preset, a local folder or a hub id."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plasticity.config import ModelConfig
from plasticity.models.adapters import ArchitectureAdapter, adapter_for
from plasticity.models.presets import (
    GGUF_PRESETS,
    PRESETS,
    TINY_PRESETS,
    build_tiny,
    preset_folder,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelUnavailableError(RuntimeError):
    """A model that cannot be loaded here (offline hub id, missing folder)."""


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    adapter: ArchitectureAdapter

    @property
    def n_layers(self) -> int:
        return len(self.adapter.block_list(self.model))

    @property
    def d_model(self) -> int:
        return int(self.adapter.unembedding_matrix(self.model).shape[1])


def model_layers(model) -> int:
    return len(adapter_for(model).block_list(model))


def _prepare_tokenizer(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer_from(folder: str | Path):
    from transformers import AutoTokenizer

    return _prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder)))


def _from_folder(folder: str | Path, dtype: torch.dtype, revision: str | None = None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, revision=revision, **kw)
    tok = AutoTokenizer.from_pretrained(str(folder), revision=revision, **kw)
    return model, tok


def load_model(cfg: ModelConfig, folder: str | Path | None = None) -> LoadedModel:
    """Load the model named by `cfg`, or the checkpoint in `folder` when given."""
    dtype = DTYPES[cfg.dtype]
    if folder is not None:
        model, tok = _from_folder(folder, dtype)
    elif cfg.source in TINY_PRESETS:
        model, tok = build_tiny(cfg.source, cfg.seed)
        model = model.to(dtype)
    elif cfg.source in GGUF_PRESETS:
        model, tok = _from_folder(preset_folder(cfg.source), dtype)
    elif Path(cfg.source).expanduser().is_dir():
        model, tok = _from_folder(Path(cfg.source).expanduser(), dtype, cfg.revision)
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        try:
            model, tok = _from_folder(
                cfg.source, dtype, cfg.revision, local_files_only=offline or None
            )
        except (OSError, ValueError) as exc:
            raise ModelUnavailableError(
                f"model.source {cfg.source!r} could not be loaded"
                f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: it is not a preset "
                f"({', '.join(PRESETS)}) nor a local folder, and the hub did not provide it. "
                "Download it elsewhere (huggingface-cli download ID --local-dir DIR) and set "
                f"model.source to that folder. Cause: {exc}"
            ) from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=_prepare_tokenizer(tok), adapter=adapter_for(model))
