"""Step time and state bytes of AdamW4bit against fused fp32 AdamW, same process.

GPT-2-medium-shaped parameters (354.8M with the default 24 layers): wte 50257x1024, wpe
1024x1024, per block c_attn 1024x3072, attn c_proj 1024x1024, c_fc 1024x4096, mlp c_proj
4096x1024, their biases and two LayerNorms; a final LayerNorm. fp32 parameters and gradients
(random, with outliers), shared by all the optimizers, which run in a shuffled order in each repeat and the median step is reported, with its ratio to
`torch.optim.AdamW(fused=True)` measured in the same run ("AdamW4bit rank1, bf16 scales"
is `rank1` with `scale_dtype="bfloat16"`). torchao's AdamW4bit and
bitsandbytes' AdamW8bit are timed too when they are installed (`pip install -e .[bench]`).

    python -m bench.optim                      # CPU, the full 354.8M shapes
    python -m bench.optim --layers 4 --repeats 3
    python -m bench.optim --device cuda        # fp32 and bf16 params (bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Callable

import torch

from plasticity.optim import AdamW4bit, optimizer_state_bytes

D, VOCAB, CTX, FF = 1024, 50257, 1024, 4096


def gpt2_medium_shapes(layers: int = 24) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(VOCAB, D), (CTX, D)]
    for _ in range(layers):
        shapes += [(D,), (D,), (D, 3 * D), (3 * D,), (D, D), (D,), (D,), (D,), (D, FF), (FF,),
                   (FF, D), (D,)]
    return shapes + [(D,), (D,)]


def make_params(shapes, device, dtype, seed) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen, device=device, dtype=dtype) * 0.02)
        g = torch.randn(s, generator=gen, device=device, dtype=dtype) * 1e-3
        g.view(-1)[:: 997] *= 50.0
        p.grad = g
        params.append(p)
    return params


def candidates(device: str) -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    hp = dict(lr=1e-4, weight_decay=0.01)
    out: dict[str, Callable] = {
        BASELINE: lambda ps: torch.optim.AdamW(ps, fused=True, **hp),
        "AdamW4bit rank1": lambda ps: AdamW4bit(ps, second_moment="rank1", **hp),
        "AdamW4bit block": lambda ps: AdamW4bit(ps, second_moment="block", **hp),
        "AdamW4bit factor": lambda ps: AdamW4bit(ps, second_moment="factor", **hp),
    }
    out["AdamW4bit rank1, bf16 scales"] = lambda ps: AdamW4bit(
        ps, second_moment="rank1", scale_dtype="bfloat16", **hp)
    try:
        from torchao.optim import AdamW4bit as AoAdamW4bit

        out["torchao AdamW4bit"] = lambda ps: AoAdamW4bit(ps, **hp)
    except Exception as exc:  # not installed, or built for another torch
        print(f"torchao AdamW4bit: unavailable ({type(exc).__name__}: {str(exc)[:100]})")
    try:
        import bitsandbytes as bnb

        out["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, **hp)
    except Exception as exc:
        print(f"bitsandbytes AdamW8bit: unavailable ({type(exc).__name__}: {str(exc)[:100]})")
    return out


def _device_seconds(opt: torch.optim.Optimizer) -> float:
    """CUDA: the GPU time of one step (the kernels' own durations, from the profiler); the
    rest of a step's wall time is the GPU waiting for the host."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        field = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        return sum(getattr(e, field) for e in events) / 1e6
    except Exception as exc:
        print(f"  (device time unavailable: {type(exc).__name__}: {str(exc)[:120]})")
        return float("nan")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


BASELINE = "torch AdamW fused (fp32 states)"


def run(device: str, dtype: torch.dtype, layers: int, repeats: int, only: list[str] | None,
        seed: int = 0, makers: dict[str, Callable] | None = None) -> dict:
    """Times `makers` (default: `candidates(device)`; it must hold BASELINE) on shared
    GPT-2-medium-shaped parameters."""
    shapes = gpt2_medium_shapes(layers)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    makers = candidates(device) if makers is None else makers
    if only:
        makers = {k: v for k, v in makers.items() if k == BASELINE or any(o in k for o in only)}
    # One set of parameters and gradients for all (memory: 2 x 1.4 GB at full size); each
    # optimizer steps it in turn, which moves the same bytes as separate copies would.
    params = make_params(shapes, device, dtype, seed)
    opts = {}
    for name, make in makers.items():
        try:
            opts[name] = make(params)
            _sync(device)
            t0 = time.perf_counter()
            opts[name].step()  # first step: state allocation (and the kernel build, if any)
            _sync(device)
            print(f"  {name}: first step {time.perf_counter() - t0:.2f} s")
        except Exception as exc:
            print(f"  {name}: failed ({type(exc).__name__}: {str(exc)[:160]})")
            opts.pop(name, None)
            gc.collect()
    times: dict[str, list[float]] = {k: [] for k in opts}
    cpu: dict[str, list[float]] = {k: [] for k in opts}  # process CPU time (all threads)
    order = list(opts)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            opts[name].step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    gpu = {name: _device_seconds(opt) for name, opt in opts.items()} if device == "cuda" else {}
    base = statistics.median(times[BASELINE])
    base_cpu = statistics.median(cpu[BASELINE])
    rows = []
    for name in opts:
        med = statistics.median(times[name])
        try:
            nbytes = optimizer_state_bytes(opts[name])
        except Exception:
            nbytes = float("nan")
        med_cpu = statistics.median(cpu[name])
        # The ratio within each repeat (steps taken moments apart), then its median: steadier
        # than the ratio of medians when the machine's speed drifts between repeats.
        paired = statistics.median(t / b for t, b in zip(times[name], times[BASELINE], strict=True))
        rows.append({"optimizer": name, "median_s": med, "ratio": med / base, "paired_ratio": paired,
                     "median_cpu_s": med_cpu, "cpu_ratio": med_cpu / base_cpu,
                     "min_s": min(times[name]), "max_s": max(times[name]),
                     "state_bytes_per_param": nbytes / n_params,
                     "device_s": gpu.get(name, float("nan")),
                     "device_ratio": gpu.get(name, float("nan")) / gpu.get(BASELINE, float("nan"))})
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "n_params": n_params,
            "layers": layers, "repeats": repeats, "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "rows": rows}


def print_table(res: dict) -> None:
    print(f"\n{res['n_params'] / 1e6:.1f}M params ({res['layers']} layers), {res['dtype']} on "
          f"{res['device_name']}, {res['threads']} threads, median of {res['repeats']} steps")
    print(f"{'optimizer':<34} {'median step':>12} {'ratio':>7} {'paired':>7} {'min..max':>17} "
          f"{'CPU time':>10} {'ratio':>6} {'state B/param':>14}")
    for r in res["rows"]:
        print(f"{r['optimizer']:<34} {r['median_s'] * 1e3:>9.1f} ms {r['ratio']:>7.2f} {r['paired_ratio']:>7.2f} "
              f"{r['min_s'] * 1e3:>7.0f}..{r['max_s'] * 1e3:<7.0f}ms "
              f"{r['median_cpu_s'] * 1e3:>7.0f} ms {r['cpu_ratio']:>6.2f} "
              f"{r['state_bytes_per_param']:>14.4f}")
    if res["device"] == "cuda":
        print("GPU time of one step (the kernels' durations; the rest of the step is host time):")
        for r in res["rows"]:
            print(f"  {r['optimizer']:<34} {r['device_s'] * 1e3:>8.2f} ms   ratio {r['device_ratio']:.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=int, default=24, help="transformer blocks (24: GPT-2 medium)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", nargs="*", help="substrings of optimizer names to keep (besides the baseline)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.layers < 1 or args.repeats < 1:
        raise SystemExit("--layers and --repeats must be >= 1")
    dtypes = [torch.float32] if args.device == "cpu" else [torch.float32, torch.bfloat16]
    results = []
    for dtype in dtypes:
        res = run(args.device, dtype, args.layers, args.repeats, args.only)
        print_table(res)
        results.append(res)
        gc.collect()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
