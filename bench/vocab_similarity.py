"""The across-checkpoint vocabulary comparison at Gemma 3 270M's size: the current code
against the way it was computed before, each in a fresh process (wall time and peak RSS).

Setting: `checkpoints` (default 3) synthetic tied embeddings of 262,144 x 640 (float32),
their projections of 72 vectors (2 variants: the ranks of each checkpoint's (V x 72)
scores, computed once per checkpoint) and the layer alignment of 2 objects (18 layers x
32 vectors) for every pair of checkpoints. `before`: a float32 clone of the input and of
the output embedding per checkpoint, ranks by binary search of every value in its sorted
column, and per alignment the centred float64 copies of both embeddings and their three
Gram matrices. `after`: the code in plasticity.vocab (one clone of a tied embedding,
ranks from the sort with one pass over its runs of ties, each centred Gram computed once
per stage a block of rows at a time). Prints both and the ratios before / after.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

V, D, N_VECTORS, LAYERS, ALIGN = 262_144, 640, 72, 18, 32


def _before_ranks(s):
    import torch

    sv, _ = torch.sort(s, dim=0)
    st, sc = sv.t().contiguous(), s.t().contiguous()
    lo = torch.searchsorted(st, sc, right=False).t() + 1
    hi = torch.searchsorted(st, sc, right=True).t()
    return (lo + hi).float() / 2


class _BeforeGrams:
    """The three Gram matrices of one `align_layers` call as it computed them before:
    from centred float64 copies of both embeddings, made anew for every call (pass a
    fresh one to each call)."""

    def __init__(self) -> None:
        self._grams: dict[tuple[int, int], object] = {}

    def __call__(self, x, y):
        if not self._grams:  # align_layers asks for (x, y) first, then (x, x) and (y, y)
            ex, ey = x.double(), y.double()
            ex, ey = ex - ex.mean(0), ey - ey.mean(0)
            self._grams = {(id(x), id(y)): ex.t() @ ey, (id(x), id(x)): ex.t() @ ex,
                           (id(y), id(y)): ey.t() @ ey}
        return self._grams[(id(x), id(y))]


def _work(path: str, checkpoints: int) -> dict:
    import torch

    from plasticity.vocab.scores import CentredGrams, align_layers, average_ranks

    torch.manual_seed(0)
    t0 = time.perf_counter()
    cks = []
    for _ in range(checkpoints):
        weight = torch.randn(V, D)
        # Many unused tokens share one embedding row, as in Gemma's vocabulary.
        weight[-4096:] = weight[-1]
        e_in = weight.float().clone()
        e_out = e_in if path == "after" else weight.float().clone()
        vectors = torch.randn(N_VECTORS, D)
        align = {o: {i: torch.randn(ALIGN, D) for i in range(LAYERS)} for o in range(2)}
        cks.append((e_in, e_out, vectors, align))
        del weight
    ranks = _before_ranks if path == "before" else average_ranks
    rank_sum = 0.0
    for _e_in, e_out, vectors, _align in cks:
        for _variant in range(2):
            rank_sum += float(ranks(e_out @ vectors.t())[-4097:].double().sum())
    centred = CentredGrams()
    scores = []
    for i, a in enumerate(cks):
        for b in cks[i + 1:]:
            for obj in range(2):
                grams = _BeforeGrams() if path == "before" else centred
                scores.append(float(align_layers(a[3][obj], b[3][obj], a[1], b[1], grams).score.sum()))
    return {"seconds": time.perf_counter() - t0,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "score": sum(scores), "rank_sum": rank_sum}


def _run(path: str, checkpoints: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.vocab_similarity", "--path", path,
                          "--checkpoints", str(checkpoints)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{path}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--path", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.path:
        print(json.dumps(_work(args.path, args.checkpoints)))
        return
    after = _run("after", args.checkpoints)
    before = _run("before", args.checkpoints)
    print(f"vocab comparison, {args.checkpoints} checkpoints of {V} x {D} (tied): before "
          f"{before['seconds']:.1f} s, {before['peak_rss_gb']:.2f} GB; after {after['seconds']:.1f} s, "
          f"{after['peak_rss_gb']:.2f} GB; before / after: time {before['seconds'] / after['seconds']:.2f}x, "
          f"peak memory {before['peak_rss_gb'] / after['peak_rss_gb']:.2f}x (same results: alignment "
          f"scores {abs(before['score'] - after['score']):.1e} apart, ranks equal: "
          f"{before['rank_sum'] == after['rank_sum']})")


if __name__ == "__main__":
    main()
