"""Cheap checks of a config against the world, before any expensive work."""

from __future__ import annotations

import json
from pathlib import Path

from plasticity.config import RunConfig, layer_sets

KNOWN_LAYERS = {"tiny-gpt2": 4, "tiny-biogpt": 4, "tiny-llama": 4, "tiny-gpt-neox": 4, "smollm2-135m": 30,
                "gemma3-270m": 18}
KNOWN_HEADS = {"tiny-gpt2": 4, "tiny-biogpt": 4, "tiny-llama": 4, "tiny-gpt-neox": 4, "smollm2-135m": 9,
               "gemma3-270m": 4}


def _from_config_json(source: str, keys: tuple[str, ...]) -> int | None:
    cfg_file = Path(source).expanduser() / "config.json"
    if cfg_file.is_file():
        data = json.loads(cfg_file.read_text())
        for key in keys:
            if isinstance(data.get(key), int):
                return data[key]
    return None


def model_n_heads(source: str) -> int | None:
    """Number of attention heads, when it can be told without loading weights."""
    if source in KNOWN_HEADS:
        return KNOWN_HEADS[source]
    return _from_config_json(source, ("num_attention_heads", "n_head"))


def model_n_layers(source: str) -> int | None:
    """Number of decoder blocks, when it can be told without loading weights."""
    if source in KNOWN_LAYERS:
        return KNOWN_LAYERS[source]
    return _from_config_json(source, ("num_hidden_layers", "n_layer", "num_layers"))


def preflight(cfg: RunConfig) -> list[str]:
    """Errors that would stop the run later: missing data files, layers out of range."""
    from plasticity.data.concepts import resolve_dataset
    from plasticity.data.corpus import SHIPPED_CORPORA

    errors: list[str] = []
    if cfg.data.corpus not in SHIPPED_CORPORA and not Path(cfg.data.corpus).expanduser().is_file():
        errors.append(
            f"data.corpus: {cfg.data.corpus!r} is neither a shipped corpus "
            f"({', '.join(sorted(SHIPPED_CORPORA))}) nor a file"
        )
    try:
        resolve_dataset(cfg.concept.dataset)
    except FileNotFoundError as exc:
        errors.append(f"concept.dataset: {exc}")
    n_heads = model_n_heads(cfg.model.source)
    if n_heads is not None and cfg.vocab.circuit_heads and cfg.vocab.circuits:
        bad = [h for h in cfg.vocab.circuit_heads if h >= n_heads]
        if bad:
            errors.append(f"vocab.circuit_heads: heads {bad} are outside the model's 0..{n_heads - 1}")
    n_layers = model_n_layers(cfg.model.source)
    if n_layers is not None:
        steered = sorted({x for s in layer_sets(cfg.plasticity.layers) or [[n_layers // 2]] for x in s})
        for name, layers in (("concept.layers", cfg.concept.layers), ("plasticity.layers", steered)):
            bad = [x for x in (layers or []) if x >= n_layers]
            if bad:
                errors.append(f"{name}: layers {bad} are outside the model's 0..{n_layers - 1}")
        if "training" in cfg.plasticity.modes:
            layer = cfg.plasticity.intervention_layer
            layer = n_layers - 1 if layer is None else layer
            if layer >= n_layers:
                errors.append(
                    f"plasticity.intervention_layer: {layer} is outside the model's 0..{n_layers - 1}"
                )
            elif cfg.concept.layers is not None and layer not in cfg.concept.layers:
                errors.append(
                    f"plasticity.intervention_layer: layer {layer} is steered in 'training' mode "
                    "but not extracted (add it to concept.layers)"
                )
        if cfg.concept.layers is not None:
            missing = [x for x in steered if x not in cfg.concept.layers]
            if missing:
                errors.append(
                    f"plasticity.layers: layers {missing} are steered but not extracted "
                    "(add them to concept.layers)"
                )
    return errors
