"""Overhead of the read (capture) and write (steer) hooks against a bare forward pass.

A GPT-2-shaped model (12 layers, d=256, random init) on CPU, left-padded batches of real
contrast prompts, tokenized once beforehand. The baseline is measured in the same run,
interleaved with the variants in a shuffled order each repeat, and the median of the
repeats is reported.
"""

from __future__ import annotations

import random
import statistics
import time

import torch


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel

    from plasticity.models.adapters import adapter_for
    from plasticity.models.loading import LoadedModel
    from plasticity.models.presets import load_gpt2_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=256, n_head=8, n_positions=256)
    model = GPT2LMHeadModel(cfg).eval()
    tok = load_gpt2_tokenizer()
    tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, adapter_for(model))


def main(repeats: int = 11) -> None:
    from plasticity.config import ConceptConfig, ModelConfig
    from plasticity.data import load_statements
    from plasticity.steering import capture, contrast_pairs, steer
    from plasticity.steering.forward import encode_left_padded, forward

    lm = _model()
    pairs = contrast_pairs(load_statements(), lm.tokenizer, ConceptConfig(max_pairs=64, n_train=32), ModelConfig())
    prompts = [p for pair in pairs for p in pair.prompts]
    batches = [encode_left_padded(lm, prompts[i : i + 32]) for i in range(0, len(prompts), 32)]
    layers = list(range(12))
    vec = {6: torch.randn(256)}

    def bare():
        for b in batches:
            forward(lm, b)

    def read_all():
        with capture(lm, layers) as store:
            for b in batches:
                forward(lm, b)
                _ = {k: v[:, -1].float() for k, v in store.items()}

    def write_one():
        with steer(lm, vec):
            for b in batches:
                forward(lm, b)

    import tempfile

    from plasticity.config import StorageConfig
    from plasticity.storage import Storage, write_shard

    tmp = tempfile.mkdtemp(prefix="plasticity-bench-")
    storage = Storage.from_config(StorageConfig(uri=f"file://{tmp}"))

    def capture_and_write():
        # What the extract stage does after tokenizing: last-token states of every
        # layer over the same batches, then one activations shard per layer.
        kept: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        with capture(lm, layers) as store:
            for b in batches:
                forward(lm, b)
                for layer in layers:
                    kept[layer].append(store[f"blocks.{layer}.out"][:, -1].float())
        acts = {layer: torch.cat(v) for layer, v in kept.items()}
        token_index = torch.cat([b["attention_mask"].sum(-1) - 1 for b in batches])
        n = len(prompts)
        for layer, h in acts.items():
            write_shard(
                storage, "activations", {"run_id": "bench", "checkpoint_step": 0, "layer": layer}, "x",
                {"concept": ["honesty"] * n, "split": ["train"] * n, "example_id": list(range(n)),
                 "pair_id": [i // 2 for i in range(n)], "label": [i % 2 for i in range(n)],
                 "token_index": token_index.tolist(), "hidden": h.half().numpy()},
                d_model=256,
            )

    variants = {
        "bare forward": bare,
        "capture 12 layers": read_all,
        "capture + write Parquet": capture_and_write,
        "steer 1 layer": write_one,
    }
    for fn in variants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # no variant always runs after the same one
        for name in order:
            fn = variants[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["bare forward"])
    n_tokens = sum(int(b["attention_mask"].numel()) for b in batches)
    print(f"hooks: GPT-2 12x256, {len(prompts)} prompts, {n_tokens} padded tokens, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<24} {med * 1e3:8.1f} ms  {n_tokens / med:10.0f} tok/s  ratio {med / base:5.3f}x")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
