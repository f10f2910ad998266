"""RepE honesty on SmolLM2-135M-Instruct: detection by layer, and control under `add`.

Not a speed benchmark: a measurement recorded in docs/BENCHMARKS.md. It runs the
project's own extraction (PCA and mean-difference readers, chat-template tags) on the
offline SmolLM2 preset, then steers at one layer with the PCA direction and with a random
direction of the same norm (the null), scoring the facts logit gap and accuracy and
TruthfulQA MC1/MC2.

    .venv/bin/python -m bench.honesty_smollm2 [--pairs 640] [--questions 48]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=640)
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--items", type=int, default=96)
    ap.add_argument("--questions", type=int, default=48)
    args = ap.parse_args()

    from plasticity.config import ConceptConfig, ModelConfig, RunConfig
    from plasticity.data import load_statements
    from plasticity.models import load_model
    from plasticity.steering import contrast_pairs, steer
    from plasticity.steering.evaluate import score_metrics
    from plasticity.steering.forward import collect_last_token
    from plasticity.steering.items import facts_items, truthfulqa_items
    from plasticity.steering.readers import (
        detection_accuracy,
        mean_difference,
        pca_direction,
        random_direction,
        vote_sign,
    )

    t0 = time.time()
    model_cfg = ModelConfig(
        source="smollm2-135m",
        user_tag="<|im_start|>user\n",
        assistant_tag="<|im_end|>\n<|im_start|>assistant\n",
    )
    lm = load_model(model_cfg)
    concept = ConceptConfig(max_pairs=args.pairs, n_train=args.train, batch_size=64)
    pairs = contrast_pairs(load_statements(), lm.tokenizer, concept, model_cfg)
    prompts = [p for pair in pairs for p in pair.prompts]
    labels = torch.tensor([lab for pair in pairs for lab in pair.labels])
    layers = list(range(lm.n_layers))
    acts, _ = collect_last_token(lm, prompts, layers, concept.batch_size)
    n = len(pairs)
    tr, te = slice(0, args.train), slice(args.train, n)
    pos_idx, neg_idx = torch.arange(2 * n)[labels == 1], torch.arange(2 * n)[labels == 0]
    print(f"SmolLM2-135M-Instruct, {n} pairs ({args.train} train, {n - args.train} test), "
          f"extraction {time.time() - t0:.0f} s")
    print("\n| layer | PCA test acc | PCA expl. var | mean-diff test acc | random test acc | residual norm |")
    print("|---|---|---|---|---|---|")
    directions = {}
    for layer in layers:
        h = acts[layer]
        pos, neg = h[pos_idx], h[neg_idx]
        d_pca, ev = pca_direction(h[0::2][tr], h[1::2][tr])
        d_pca = d_pca * vote_sign(d_pca, pos[tr], neg[tr])
        d_md = mean_difference(pos[tr], neg[tr])
        d_rnd = random_direction(lm.d_model, layer)
        d_rnd = d_rnd * vote_sign(d_rnd, pos[tr], neg[tr])
        directions[layer] = (d_pca, float(h.norm(dim=-1).mean()))
        print(f"| {layer} | {detection_accuracy(d_pca, pos[te], neg[te]):.3f} | {ev:.3f} | "
              f"{detection_accuracy(d_md, pos[te], neg[te]):.3f} | "
              f"{detection_accuracy(d_rnd, pos[te], neg[te]):.3f} | {directions[layer][1]:.1f} |")

    cfg = RunConfig()
    cfg.plasticity.n_items = args.items
    facts = facts_items(cfg, {pair.statement_index for pair in pairs[: args.train]})
    cfg.plasticity.n_items = args.questions
    questions = truthfulqa_items(cfg)
    metrics = ["facts_logit_gap", "facts_accuracy", "truthfulqa_mc1", "truthfulqa_mc2"]
    d_pca, norm = directions[args.layer]
    d_null = random_direction(lm.d_model, seed=12345)
    print(f"\nControl at layer {args.layer} (residual norm {norm:.1f}), operator add, "
          f"{len(facts)} held-out statements, {len(questions)} TruthfulQA questions:\n")
    print("| direction | alpha_rel | facts logit gap | facts accuracy | TruthfulQA MC1 | TruthfulQA MC2 |")
    print("|---|---|---|---|---|---|")
    base = score_metrics(lm, metrics, facts, questions, 32)
    print("| none | 0 | " + " | ".join(f"{float(base[m].mean()):.3f}" for m in metrics) + " |")
    for name, d in (("honesty (PCA)", d_pca), ("random (null)", d_null)):
        for a in (-0.5, -0.25, 0.25, 0.5):
            with steer(lm, {args.layer: d}, a * norm):
                s = score_metrics(lm, metrics, facts, questions, 32)
            print(f"| {name} | {a:+.2f} | " + " | ".join(f"{float(s[m].mean()):.3f}" for m in metrics) + " |")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
