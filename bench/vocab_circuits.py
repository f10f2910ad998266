"""Exact top-100 entries of one head's OV circuit at GPT-2-medium shapes, without the
50,257 x 50,257 matrix: the pruned, bf16-screened search (plasticity.vocab.topk)
against dense block-streaming of the full product with a running top-k, both in the
same run, on the same factors.

Random weights: E (50,257 x 1,024) and W_V, W_O (1,024 x 64) Gaussian; and a more
realistic norm-heterogeneous E (each row scaled by a log-normal factor, sigma 0.5), as
trained embeddings have. The pruned search is timed on `heads` heads of each; the dense
baseline on one head of each (it does not depend on the data). Both results are checked
equal.

    .venv/bin/python -m bench.vocab_circuits [--heads 3] [--threads 2] [--vocab 50257]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _factors(vocab: int, d: int, d_head: int, kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(vocab, d, generator=g) * 0.02
    if kind == "lognormal":
        e = e * torch.exp(0.5 * torch.randn(vocab, 1, generator=g))
    wv = torch.randn(d, d_head, generator=g) * 0.02
    wo = torch.randn(d_head, d, generator=g) * 0.02
    return e @ wv, e @ wo.t()


def main(argv: list[str] | None = None) -> None:
    from plasticity.vocab.topk import product_topk, product_topk_dense

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"OV top-{args.k}, V={args.vocab}, d={args.d_model}, d_head={args.d_head}, "
          f"{args.threads} threads")
    print(f"{'embeddings':<12} {'method':<28} {'s/head':>8} {'ratio':>7}  blocks exact/screened/total")
    for kind in ("gaussian", "lognormal"):
        times, last = [], None
        for h in range(args.heads):
            a, b = _factors(args.vocab, args.d_model, args.d_head, kind, seed=h)
            t = time.perf_counter()
            last = product_topk(a, b, args.k)
            times.append(time.perf_counter() - t)
        pruned = statistics.median(times)
        dense_s = float("nan")
        if not args.no_dense:
            a, b = _factors(args.vocab, args.d_model, args.d_head, kind, seed=args.heads - 1)
            t = time.perf_counter()
            dense = product_topk_dense(a, b, args.k)
            dense_s = time.perf_counter() - t
            same = all(
                torch.equal(x, y) for x, y in (
                    (last.top_rows, dense.top_rows), (last.top_cols, dense.top_cols),
                    (last.bottom_rows, dense.bottom_rows), (last.bottom_cols, dense.bottom_cols),
                )
            )
            if not same:
                raise SystemExit(f"{kind}: pruned and dense top-k differ")
            print(f"{kind:<12} {'dense block-streaming':<28} {dense_s:8.2f} {1.0:7.3f}")
        print(f"{kind:<12} {'pruned + bf16 screen (median)':<28} {pruned:8.2f} "
              f"{pruned / dense_s:7.3f}  {last.blocks_exact}/{last.blocks_screened}/{last.blocks_total}"
              f"  (heads: {', '.join(f'{x:.2f}' for x in times)} s)")


if __name__ == "__main__":
    main()
