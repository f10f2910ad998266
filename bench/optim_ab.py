"""A/B of AdamW4bit's C++ kernel: two or more builds of `_cpu_kernel.cpp` in one process.

Machine speed drifts between runs, so a kernel change is measured against the previous
source in the same process: each build steps its own `AdamW4bit` over the same
GPT-2-medium-shaped parameters (as `bench.optim`), with fused fp32 AdamW as the baseline, in
a shuffled order per repeat. `--rev REV` adds the optimizer of an earlier commit (its
`adamw4bit.py`, with its `_numerics.py` and `_dispatch.py` where it has them, and its kernel),
to measure a change of the Python step too. `--passes` times
the two passes alone instead, in ns per element, on one (rows x cols) tensor, or with
`--model` over all the matrices of the GPT-2-medium shapes (the kernels called back to
back, no optimizer around them).

    git show HEAD~1:src/plasticity/optim/_cpu_kernel.cpp > /tmp/old.cpp
    python -m bench.optim_ab /tmp/old.cpp src/plasticity/optim/_cpu_kernel.cpp
    python -m bench.optim_ab --rev HEAD~3 src/plasticity/optim/_cpu_kernel.cpp
    OMP_NUM_THREADS=1 python -m bench.optim_ab --passes --rows 512 /tmp/old.cpp src/plasticity/optim/_cpu_kernel.cpp
    python -m bench.optim_ab --passes --model src/plasticity/optim/_cpu_kernel.cpp
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from plasticity.optim import AdamW4bit, _cpu


def build(source: Path):
    from torch.utils.cpp_extension import load

    key = hashlib.sha256(source.read_bytes() + " ".join(_cpu.CFLAGS).encode()).hexdigest()[:12]
    out = _cpu.cache_dir() / f"ab-{key}"
    out.mkdir(parents=True, exist_ok=True)
    return load(name=f"plasticity_adamw4bit_ab_{key}", sources=[str(source)],
                extra_cflags=_cpu.CFLAGS, extra_ldflags=_cpu.LDFLAGS, build_directory=str(out))


def timed(fns: dict, repeats: int, inner: int = 1) -> dict[str, list[float]]:
    for f in fns.values():
        f()
    res: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        order = list(fns)
        random.shuffle(order)
        for k in order:
            t = time.perf_counter()
            for _ in range(inner):
                fns[k]()
            res[k].append((time.perf_counter() - t) / inner)
    return res


def at_revision(rev: str):
    """The optimizer class and the kernel build of commit `rev`."""
    def show(path: str) -> str:
        out = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"bench.optim_ab: git show {rev}:{path} failed: {out.stderr.strip()}")
        return out.stdout

    def exists(path: str) -> bool:
        return subprocess.run(["git", "cat-file", "-e", f"{rev}:{path}"],
                              capture_output=True).returncode == 0

    # Each module imports only the ones before it. While it runs, the commit's versions of
    # those stand in for the working tree's in sys.modules, so that its imports bind them.
    at_rev: dict[str, types.ModuleType] = {}
    for name in ("_numerics", "_dispatch", "adamw4bit"):
        path = f"src/plasticity/optim/{name}.py"
        if name != "adamw4bit" and not exists(path):  # (commits before the step was split up)
            continue
        module = types.ModuleType(f"{name}_at_{rev}")
        saved = {key: sys.modules.get(key) for key in at_rev}
        sys.modules.update(at_rev)
        try:
            exec(compile(show(path), f"{rev}:{name}.py", "exec"), module.__dict__)
        finally:
            for key, previous in saved.items():
                if previous is None:
                    sys.modules.pop(key, None)
                else:
                    sys.modules[key] = previous
        at_rev[f"plasticity.optim.{name}"] = module
    src = Path(tempfile.mkdtemp()) / "_cpu_kernel.cpp"
    src.write_text(show("src/plasticity/optim/_cpu_kernel.cpp"))
    return module.AdamW4bit, build(src)


def full_steps(mods: dict, repeats: int, layers: int, second_moment: str,
               revs: dict | None = None) -> None:
    """`bench.optim`'s step timing, with one AdamW4bit per build in place of its candidates
    (and one per earlier commit in `revs`: name -> (optimizer class, kernel build))."""
    from bench.optim import BASELINE, print_table, run

    _cpu._module = next(iter(mods.values()))  # (so that no other build is made)

    def with_build(mod, cls=AdamW4bit):
        def make(ps):
            opt = cls(ps, lr=1e-4, weight_decay=0.01, second_moment=second_moment)
            step = opt.step

            def stepped(closure=None):
                _cpu._module = mod  # the build this optimizer steps with
                return step(closure)

            opt.step = stepped
            return opt

        return make

    makers = {BASELINE: lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, fused=True)}
    makers.update({name: with_build(mod) for name, mod in mods.items()})
    makers.update({name: with_build(mod, cls) for name, (cls, mod) in (revs or {}).items()})
    print(f"AdamW4bit {second_moment}, one optimizer per kernel build")
    print_table(run("cpu", torch.float32, layers, repeats, None, makers=makers))


def pass_inputs(rows: int, cols: int, gen: torch.Generator) -> dict:
    """One rank-1 tensor's parameter, gradient, codes and scales, random, for the passes."""
    n = rows * cols
    return dict(
        cols=cols, p=torch.randn(rows, cols, generator=gen), g=torch.randn(rows, cols, generator=gen) * 1e-3,
        mc=torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=gen),
        ms=torch.rand(n // 128, generator=gen),
        vc=torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=gen),
        ro=torch.rand(rows, generator=gen) * 1e-6 + 1e-7, co=torch.rand(cols, generator=gen) * 1e-6 + 1e-7)


def stats_pass(mod, ts: list[dict]) -> None:
    """Pass 1 of a rank-1 step over each tensor; its maxima go into the tensor's dict."""
    for t in ts:
        t["rm"], t["cm"], _ = mod.rank1_stats(t["g"], t["vc"], t["ro"], t["co"], t["cols"], False, 0.999)


def update_pass(mod, ts: list[dict]) -> None:
    """Pass 2 of a rank-1 step over each tensor (after `stats_pass`)."""
    e = torch.zeros(0)
    for t in ts:
        mod.fused_step(t["p"], t["g"], t["mc"], t["ms"], t["vc"], e, t["ro"], t["co"], t["rm"], t["cm"],
                       0, t["cols"], 1, False, 0.99, 0.9, 0.999, 1.0, 1e-8, 1e-4, 128)


def model_passes(mods: dict, repeats: int, layers: int) -> None:
    """Both passes over every matrix of the GPT-2-medium shapes, kernel calls back to back."""
    from bench.optim import gpt2_medium_shapes

    gen = torch.Generator().manual_seed(0)
    ts = [pass_inputs(*shape, gen) for shape in gpt2_medium_shapes(layers) if len(shape) == 2]
    n_total = sum(t["g"].numel() for t in ts)
    fns = {}
    for name, mod in mods.items():
        stats_pass(mod, ts)
        fns[f"{name}: statistics pass"] = lambda mod=mod: stats_pass(mod, ts)
        fns[f"{name}: update pass"] = lambda mod=mod: update_pass(mod, ts)
    res = timed(fns, repeats)
    print(f"{len(ts)} matrices, {n_total / 1e6:.1f}M elements, {torch.get_num_threads()} threads, "
          f"median of {repeats}")
    for k, v in res.items():
        print(f"{k:60s} {statistics.median(v) * 1e3:7.1f} ms {statistics.median(v) / n_total * 1e9:7.3f} ns/element")


def passes(mods: dict, repeats: int, rows: int, cols: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n = rows * cols
    t = pass_inputs(rows, cols, gen)
    pa = torch.nn.Parameter(torch.randn(rows, cols, generator=gen))
    pa.grad = t["g"].clone()
    fns = {"torch AdamW fused": torch.optim.AdamW([pa], lr=1e-4, fused=True).step}
    for name, mod in mods.items():
        ts = [dict(t)]  # this build's maxima, for its update pass
        stats_pass(mod, ts)
        fns[f"{name}: statistics pass"] = lambda mod=mod: stats_pass(mod, [t])
        fns[f"{name}: update pass"] = lambda mod=mod, ts=ts: update_pass(mod, ts)
    inner = max(1, 20_000_000 // n)
    res = timed(fns, repeats, inner)
    print(f"{rows} x {cols}, {torch.get_num_threads()} threads, median of {repeats} x {inner}, ns per element")
    for k, v in res.items():
        print(f"{k:60s} {statistics.median(v) / n * 1e9:7.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", type=Path, help="kernel sources, e.g. an old and the new")
    ap.add_argument("--rev", action="append", default=[],
                    help="also step the optimizer of this commit (its Python and its kernel)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--second-moment", default="rank1", choices=["rank1", "block", "factor"])
    ap.add_argument("--passes", action="store_true", help="time the two passes on one tensor")
    ap.add_argument("--model", action="store_true", help="--passes over the GPT-2-medium matrices")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=1024)
    args = ap.parse_args()
    for src in args.sources:
        if not src.is_file():
            raise SystemExit(f"bench.optim_ab: no kernel source at {src}")
    names = [str(s) for s in args.sources]
    mods = {name: build(src) for name, src in zip(names, args.sources, strict=True)}
    if args.rev and args.passes:
        raise SystemExit("bench.optim_ab: --rev times whole steps, not --passes")
    if args.passes and args.model:
        model_passes(mods, args.repeats, args.layers)
    elif args.passes:
        passes(mods, args.repeats, args.rows, args.cols)
    else:
        revs = {f"AdamW4bit at {rev}": at_revision(rev) for rev in args.rev}
        full_steps(mods, args.repeats, args.layers, args.second_moment, revs)


if __name__ == "__main__":
    main()
