"""The extract stage: RepE's honesty contrast activations of one checkpoint, read at the
last token of every layer's block output, and one direction per reader and layer, with
its sign by vote and its detection accuracy on the test pairs."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import torch

from plasticity.config import RunConfig
from plasticity.models.loading import LoadedModel
from plasticity.stages.common import StageResult, model_layers, vectors_path
from plasticity.storage.fs import Storage
from plasticity.storage.shards import Rows, write_shard
from plasticity.train.checkpoint import CheckpointRef, load_checkpoint

log = logging.getLogger(__name__)


def extract_stage(
    cfg: RunConfig, run_id: str, ckpt: CheckpointRef, lm: LoadedModel | None = None,
    observe: Callable[[int, int], None] | None = None,
) -> StageResult:
    """Honesty contrast activations -> one direction per reader and layer.

    `observe(done, total)`, if given, is called after every forward pass with the prompts
    read so far and in all."""
    from safetensors.torch import save as save_safetensors

    from plasticity.data.concepts import load_statements, resolve_dataset
    from plasticity.steering.forward import collect_last_token
    from plasticity.steering.prompts import contrast_pairs
    from plasticity.steering.readers import (
        detection_accuracy,
        explained_variance,
        mean_difference,
        pca_direction,
        random_direction,
        vote_sign,
    )
    from plasticity.steering.vectors import tokenizer_fingerprint
    from plasticity.train.checkpoint import sha256_file

    storage = Storage.from_config(cfg.storage)
    lm = lm or load_checkpoint(storage, ckpt.path, cfg.model)
    c = cfg.concept
    layers = model_layers(c.layers, lm.n_layers, "concept.layers")
    pairs = contrast_pairs(load_statements(c.dataset), lm.tokenizer, c, cfg.model)
    if len(pairs) <= c.n_train:
        raise ValueError(
            f"concept.n_train={c.n_train} leaves no test pairs: only {len(pairs)} pairs were built"
        )
    prompts = [p for pair in pairs for p in pair.prompts]
    labels = torch.tensor([lab for pair in pairs for lab in pair.labels])
    on_rows = None
    if observe is not None:
        done = [0]

        def on_rows(n: int) -> None:
            done[0] += n
            observe(done[0], len(prompts))

    acts, token_index = collect_last_token(lm, prompts, layers, c.batch_size, on_rows)
    n_pairs = len(pairs)
    pair_ids = torch.arange(n_pairs).repeat_interleave(2)
    split = ["train" if p < c.n_train else "test" for p in pair_ids.tolist()]
    # Positive and negative member of each pair, and the members in presentation order.
    pos_idx = torch.arange(2 * n_pairs)[labels == 1]
    neg_idx = torch.arange(2 * n_pairs)[labels == 0]
    first_idx, second_idx = torch.arange(0, 2 * n_pairs, 2), torch.arange(1, 2 * n_pairs, 2)
    result = StageResult()
    part = {"run_id": run_id, "checkpoint_step": ckpt.step}
    rows = Rows("directions")
    tensors: dict[str, torch.Tensor] = {}
    tr, te = slice(0, c.n_train), slice(c.n_train, n_pairs)
    for layer in layers:
        h = acts[layer]
        result.shards.append(
            write_shard(
                storage, "activations", {**part, "layer": layer}, c.name,
                {
                    "concept": [c.name] * len(prompts), "split": split,
                    "example_id": list(range(len(prompts))), "pair_id": pair_ids.tolist(),
                    "label": labels.tolist(), "token_index": token_index.tolist(),
                    "hidden": h.half().numpy(),
                },
                d_model=lm.d_model,
            )
        )
        pos, neg = h[pos_idx], h[neg_idx]
        first, second = h[first_idx][tr], h[second_idx][tr]
        residual_norm = float(h.norm(dim=-1).mean())
        tensors[f"residual_norm.{layer}"] = torch.tensor([residual_norm])
        for method in c.methods:
            if method == "pca":
                direction, _ = pca_direction(first, second)
            elif method == "mean_diff":
                direction = mean_difference(pos[tr], neg[tr])
            else:
                direction = random_direction(lm.d_model, seed=c.seed * 100_003 + layer)
            # Sign by vote: the positive member should project higher in most training pairs.
            sign = vote_sign(direction, pos[tr], neg[tr])
            direction = direction * sign
            rows.add(
                concept=c.name, layer=layer, method=method, sign=sign,
                explained_variance=explained_variance(direction, first, second),
                detection_accuracy=detection_accuracy(direction, pos[te], neg[te]),
                residual_norm=residual_norm, vector=direction.numpy().tolist(),
            )
            tensors[f"{method}.{layer}"] = direction.contiguous()
    result.shards.append(
        write_shard(storage, "directions", part, c.name, rows.columns, d_model=lm.d_model)
    )
    meta = {
        "run_id": run_id, "model": cfg.model.source, "model_type": lm.adapter.model_type,
        "d_model": str(lm.d_model), "checkpoint_step": str(ckpt.step),
        "checkpoint_sha256": ckpt.sha256, "concept": c.name, "methods": json.dumps(c.methods),
        "layers": json.dumps(layers), "n_train": str(c.n_train), "n_pairs": str(n_pairs),
        "user_tag": cfg.model.user_tag, "assistant_tag": cfg.model.assistant_tag,
        "template": c.template, "positive": c.positive, "negative": c.negative,
        "dataset": c.dataset, "dataset_sha256": sha256_file(resolve_dataset(c.dataset)),
        "seed": str(c.seed), "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer),
    }
    storage.write_bytes(
        vectors_path(storage, run_id, ckpt.step, c.name), save_safetensors(tensors, metadata=meta)
    )
    result.summary = {
        "step": ckpt.step,
        "detection_accuracy": {
            f"{m}.{layer}": acc
            for m, layer, acc in zip(
                rows.columns["method"], rows.columns["layer"], rows.columns["detection_accuracy"],
                strict=True,
            )
        },
    }
    log.info("extract step %d: %d pairs, %d layers", ckpt.step, n_pairs, len(layers))
    return result
