"""A plasticity sweep in one stream of row-wise steered passes, against a bare forward.

Setting: a GPT-2-shaped model (12 layers, d=256, random init) on CPU; 16 held-out facts
statements; the sweep of one target: 2 source directions and 1 null direction, each at
alphas (-0.5, -0.25, 0.25, 0.5) - 12 steered variants - plus the unsteered model, so
208 rows, 32 rows per forward pass, scored as the facts logit gap.

- bare: the same 800 rows through the same scoring loop, no hooks (the ceiling);
- sweep: `sweep_scores` with `RowSteering` (each row its own direction and alpha);
- naive: one steered pass over the 32 statements per (direction, alpha), plus one
  unsteered pass (what a loop over alphas costs).

Throughput is real (unpadded) tokens per second; the median of interleaved repeats in a
shuffled order. Goal: sweep >= 0.85x bare.
"""

from __future__ import annotations

import random
import statistics
import time

import torch


def main(repeats: int = 5) -> None:
    from bench.hooks import _model
    from plasticity.data import load_statements
    from plasticity.steering.evaluate import facts_logit_gap, facts_prompts
    from plasticity.steering.hooks import RowSteering, steer
    from plasticity.steering.sweep import UNSTEERED, Variant, sweep_scores

    lm = _model()
    facts = load_statements()[:16]
    layer, batch = 6, 32
    g = torch.Generator().manual_seed(0)
    n_dirs = 3
    dirs = {layer: torch.randn(n_dirs, lm.d_model, generator=g)}
    alphas = [-0.5, -0.25, 0.25, 0.5]
    norm = 8.0
    variants = [UNSTEERED] + [Variant(d, a) for d in range(n_dirs) for a in alphas]
    n_tokens = sum(len(t) for t in lm.tokenizer(facts_prompts(facts), add_special_tokens=False)["input_ids"])
    rows_tokens = n_tokens * len(variants)

    def bare():
        sweep_scores(lm, ["facts_logit_gap"], [UNSTEERED] * len(variants), None, facts, batch_size=batch)

    def sweep():
        with RowSteering(lm, dirs, {layer: norm}, "add") as st:
            sweep_scores(lm, ["facts_logit_gap"], variants, st, facts, batch_size=batch)

    def naive():
        facts_logit_gap(lm, facts, batch)
        for d in range(n_dirs):
            for a in alphas:
                with steer(lm, {layer: dirs[layer][d]}, a * norm, "add"):
                    facts_logit_gap(lm, facts, batch)

    # Same numbers from the sweep and the loop (the sweep is a re-arrangement, not an approximation).
    with RowSteering(lm, dirs, {layer: norm}, "add") as st:
        got = sweep_scores(lm, ["facts_logit_gap"], variants, st, facts, batch_size=batch)["facts_logit_gap"]
    with steer(lm, {layer: dirs[layer][2]}, alphas[1] * norm, "add"):
        ref = facts_logit_gap(lm, facts, batch)
    k = variants.index(Variant(2, alphas[1]))
    max_diff = float((got[k] - ref).abs().max())

    cases = {"bare": bare, "sweep": sweep, "naive": naive}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm-up
    rng = random.Random(0)
    for _ in range(repeats):
        order = list(cases)
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: rows_tokens / v for k, v in med.items()}
    print(f"plasticity sweep: {len(variants)} variants x {len(facts)} statements = "
          f"{len(variants) * len(facts)} rows, {rows_tokens} tokens, {torch.get_num_threads()} threads")
    for name in cases:
        print(f"  {name:6s} {med[name]:7.3f} s  {tps[name]:9.0f} tokens/s  {tps[name] / tps['bare']:.3f}x bare")
    print(f"  sweep vs naive loop: {med['naive'] / med['sweep']:.2f}x faster; "
          f"max |sweep - separate pass| = {max_diff:.2e}")


if __name__ == "__main__":
    main()
