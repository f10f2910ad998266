"""Log forwarding: the smoke timeline with compute.forward_logs on against off.

Setting: `plasticity run` of configs/smoke.yaml with the integration tests' shortening
`--set` options (tests/integration/conftest.py FAST: 6 steps, checkpoints 0, 3, 6),
each run in a fresh process on a fresh storage root, against the Prefect API the
environment names (PREFECT_API_URL) or else Prefect's local one. Wall time of the whole
command, as a user sees it; the order of on and off alternates over `--repeats`. Prints
the ratio on / off of the medians (goal: within 5%, i.e. at most 1.05).
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

from tests.integration.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]


def _run(store: Path, run_id: str, forward: bool) -> float:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_AUTH_MODE": "disabled",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "plasticity.cli", "run", "--config", str(ROOT / "configs/smoke.yaml"),
           "--storage", f"file://{store}", "--run-id", run_id, *FAST,
           "--set", f"compute.forward_logs={'true' if forward else 'false'}"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"run {run_id} failed:\n{out.stderr[-3000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = ["on", "off"] if rep % 2 == 0 else ["off", "on"]
            for mode in order:
                run_id = f"bench-logs-{mode}-{rep}"
                times[mode].append(_run(Path(tmp) / run_id, run_id, mode == "on"))
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"smoke timeline, log forwarding ({os.cpu_count()} CPUs): on {on:.1f} s, off {off:.1f} s; "
          f"on / off = {on / off:.3f} (goal <= 1.05; repeats {args.repeats}: "
          f"{[round(t, 1) for t in times['on']]} / {[round(t, 1) for t in times['off']]})")


if __name__ == "__main__":
    main()
