"""Study throughput: the runs of one study at once against one after another.

Setting: a study of tiny-gpt2 x `--seeds` seeds (the smoke study's shortened smoke
timeline), run twice through `plasticity study run` in fresh processes on fresh
storage roots: once with `max_concurrent: 1` (the runs one after another) and once with
the default (as many at once as the cores allow; on a CPU-only machine each run then
gets its share of the cores). Wall time of the whole command, Prefect's and Ray's start
included, as a user sees it. Prints the ratio sequential / concurrent (> 1: the
concurrent study is faster); the order of the two alternates over `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _study(folder: Path, name: str, seeds: int, max_concurrent: int | None) -> Path:
    spec = yaml.safe_load((ROOT / "configs/study-smoke.yaml").read_text())
    spec.update(name=name, base=str(ROOT / "configs/smoke.yaml"), max_concurrent=max_concurrent)
    spec["axes"] = {"arch": [spec["axes"]["arch"][0]], "seed": list(range(seeds))}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _run(path: Path, store: Path) -> float:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_AUTH_MODE": "disabled",
           "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "plasticity.cli", "study", "run", "--config", str(path),
                          "--storage", f"file://{store}"], cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"study {path.name} failed:\n{out.stderr[-3000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="runs in the study (one per seed)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for rep in range(args.repeats):
            order = ["sequential", "concurrent"] if rep % 2 == 0 else ["concurrent", "sequential"]
            for mode in order:
                path = _study(folder, f"bench-{mode}-{rep}", args.seeds, 1 if mode == "sequential" else None)
                times[mode].append(_run(path, folder / f"store-{mode}-{rep}"))
    seq, con = statistics.median(times["sequential"]), statistics.median(times["concurrent"])
    print(f"study of {args.seeds} smoke runs ({os.cpu_count()} CPUs): sequential {seq:.1f} s, "
          f"concurrent {con:.1f} s; sequential / concurrent = {seq / con:.2f}x "
          f"(repeats {args.repeats}: {[round(t, 1) for t in times['sequential']]} / "
          f"{[round(t, 1) for t in times['concurrent']]})")


if __name__ == "__main__":
    main()
