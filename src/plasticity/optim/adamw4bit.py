"""AdamW with 4-bit optimizer states (Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit
States", NeurIPS 2023).

Per parameter tensor with more than `min_quantized_numel` elements (and whose group does not
set `quantize=False`):

- first moment: blocks of `block_size` elements of the row-major flattened tensor, fp32 scale
  per block (absmax, clamped at 1e-12; bfloat16, rounded to nearest, with
  `scale_dtype="bfloat16"`), signed 4-bit dynamic-exponent map;
- second moment, `second_moment=`
  - "rank1" (default): for ndim >= 2 the scale of an entry is the minimum, over the
    tensor's dimensions, of that dimension's max vector (for a matrix: min(max of its row,
    max of its column)), zero-free linear 4-bit map (i + 1) / 16; 1-D tensors use blocks;
  - "block": blocks of `block_size` with the same linear map for every tensor;
  - "factor": Adafactor-style fp32 running means of g^2 over rows and columns, rebuilt as
    (R / mean(R)) (x) C; for ndim >= 3 the statistics are taken over the last two
    dimensions (one (R, C) pair per leading index); 1-D tensors use blocks, as in "rank1".
    On the CPU each row and column sum of g^2 is a pairwise tree (adjacent pairs added, an
    odd last element carried up), the same in the C++ kernel and in PyTorch operations;
    on CUDA, PyTorch's reductions.

Other tensors keep fp32 moments. One step, per tensor: p <- p (1 - lr wd); dequantize m and
v; m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2; p <- p - lr / (1 - b1^t) * m /
(sqrt(v) / sqrt(1 - b2^t) + eps); requantize m and v with fresh scales. Both moments start
at exactly zero. Codes are packed two per uint8 byte, element 2k in the low nibble of byte k.
A second-moment scale below the smallest normal float (1.2e-38, second moments of gradients
around 1e-19 or smaller) is taken as that float when quantizing, so no code comes from an
infinite inverse.

All gradients are checked before anything changes: a non-finite gradient (or second
moment) anywhere leaves parameters and states untouched and raises `FloatingPointError`
(`nonfinite="raise"`, the default) or logs a warning and skips the step (`"skip"`).

On CPU float32 tensors the step runs in a fused C++/OpenMP kernel (two passes for
"rank1": the maxima of the new second moment, then one pass that dequantizes, updates and
requantizes; one call into the kernel per pass for all of the step's tensors); on CUDA
(float32, bfloat16 or float16 parameters) in multi-tensor Triton kernels that compute the
same operations, without fused multiply-adds, so the same bits for "rank1" and "block" (a
step is a fixed number of launches however many tensors it updates); elsewhere (and when
no compiler is available) in PyTorch operations that give the C++ kernel's results bit for
bit.

The optimizer is this module; the rest of the package holds what it dispatches to:
`_numerics` the per-tensor operations in PyTorch (what each layout stores, the
second-moment statistics, the step constants, the PyTorch update path), `_dispatch` the
choice of backend per tensor and the batching of each backend's work, `_cpu` with
`_cpu_kernel.cpp` and `_triton` with `_triton_kernels` the kernels, `quant` the 4-bit maps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from plasticity.optim import quant
from plasticity.optim._dispatch import (
    _all_flags,
    _finish_update,
    _forget_plans,
    _pass_stats,
    _pass_update,
    _routes,
    _run_stats_kernels,
    _run_update_kernels,
    _triton_abort,
    _triton_apply,
    _triton_check,
)
from plasticity.optim._numerics import SCALE_DTYPES, _row_scale

log = logging.getLogger(__name__)

SECOND_MOMENTS = ("rank1", "block", "factor")
BACKENDS = ("auto", "cpp", "torch", "triton")


def _validate(lr: Any, betas: Any, eps: Any, weight_decay: Any, second_moment: Any,
              block_size: Any, min_quantized_numel: Any, scale_dtype: Any = "float32") -> None:
    if not isinstance(lr, int | float) or not lr >= 0.0:
        raise ValueError(f"lr: must be a number >= 0, got {lr!r}")
    if not isinstance(eps, int | float) or not eps >= 0.0:
        raise ValueError(f"eps: must be a number >= 0, got {eps!r}")
    if not isinstance(weight_decay, int | float) or not weight_decay >= 0.0:
        raise ValueError(f"weight_decay: must be a number >= 0, got {weight_decay!r}")
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas: expected two numbers, got {betas!r}") from None
    for name, b in (("betas[0]", b1), ("betas[1]", b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name}: must be in [0, 1), got {b!r}")
    if second_moment not in SECOND_MOMENTS:
        raise ValueError(
            f"second_moment: expected one of {', '.join(SECOND_MOMENTS)}, got {second_moment!r}"
        )
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"block_size: must be an even integer >= 2, got {block_size!r}")
    if not isinstance(min_quantized_numel, int) or min_quantized_numel < 0:
        raise ValueError(
            f"min_quantized_numel: must be an integer >= 0, got {min_quantized_numel!r}"
        )
    if not isinstance(scale_dtype, str) or scale_dtype not in SCALE_DTYPES:
        raise ValueError(
            f"scale_dtype: expected one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}"
        )


class AdamW4bit(torch.optim.Optimizer):
    """AdamW whose moments are stored in 4 bits (see the module docstring).

    Parameter groups may override `lr`, `betas`, `eps`, `weight_decay`, `second_moment`,
    `block_size`, `min_quantized_numel`, `scale_dtype`, and set `quantize=False` to keep
    fp32 moments. `scale_dtype="bfloat16"` stores the block scales (the first moment's, and
    the block-wise second moment's) in 16 bits, rounded to nearest, and quantizes against
    the rounded scale; every backend supports it, with the same bits.
    `backend`: "auto" (C++ on CPU float32, Triton on CUDA, PyTorch otherwise), or force
    "cpp", "triton" or "torch" (each falls back to "torch" where it cannot run; "triton" runs
    on CPU tensors under Triton's interpreter, `TRITON_INTERPRET=1`, slowly, for debugging).
    """

    # The second moment's 4-bit map (the value of each code) and its quantizer (values already
    # divided by their scale -> codes). A subclass may swap both for an ablation; it then runs
    # on the PyTorch path only, since the kernels implement this map.
    v_map: torch.Tensor = quant.UNSIGNED_MAP

    @staticmethod
    def v_quantize(x: torch.Tensor) -> torch.Tensor:
        return quant.quantize_unsigned(x)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        second_moment: str = "rank1",
        block_size: int = 128,
        min_quantized_numel: int = 4096,
        nonfinite: str = "raise",
        backend: str = "auto",
        scale_dtype: str = "float32",
    ) -> None:
        _validate(lr, betas, eps, weight_decay, second_moment, block_size, min_quantized_numel,
                  scale_dtype)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite: expected 'raise' or 'skip', got {nonfinite!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        self.nonfinite = nonfinite
        self.backend = backend
        self.skipped_steps = 0
        defaults = dict(
            lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps,
            weight_decay=weight_decay, second_moment=second_moment, block_size=block_size,
            min_quantized_numel=min_quantized_numel, quantize=True, scale_dtype=scale_dtype,
        )
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer's keeps defaults, state and param_groups only (pickle, copy.deepcopy);
        # the Triton plans and routes are caches, built again on the next step.
        return {**super().__getstate__(), "nonfinite": self.nonfinite, "backend": self.backend,
                "skipped_steps": self.skipped_steps}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                  group["second_moment"], group["block_size"], group["min_quantized_numel"],
                  group.get("scale_dtype", "float32"))
        group["betas"] = (float(group["betas"][0]), float(group["betas"][1]))
        for p in group["params"]:
            if p.is_complex() or not p.is_floating_point():
                raise ValueError(
                    f"params: AdamW4bit needs real floating-point parameters, got {p.dtype}"
                )

    # ------------------------------------------------------------------ layout
    @staticmethod
    def layout(p: torch.Tensor, group: dict[str, Any]) -> str:
        """How `p`'s moments are stored: 'fp32', 'rank1', 'block' or 'factor'."""
        if not group.get("quantize", True) or p.numel() <= group["min_quantized_numel"] or p.numel() == 0:
            return "fp32"
        sm = group["second_moment"]
        if p.dim() < 2 and sm in ("rank1", "factor"):
            return "block"
        return sm

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("p: not a parameter of this optimizer")

    @classmethod
    def _kernel_maps(cls) -> bool:
        """Whether the second moment's map is the one the kernels implement (a subclass that
        swaps it runs on the PyTorch path)."""
        return cls.v_map is AdamW4bit.v_map and cls.v_quantize is AdamW4bit.v_quantize

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Pass 1 (statistics and finiteness checks) for every tensor, then, if every check
        passed, pass 2 (the update); `_dispatch` batches each backend's work."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, batch = [], []
        for group, p, kind, backend in _routes(self):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise ValueError("grad: AdamW4bit does not support sparse gradients")
            if g.is_complex():
                raise ValueError("grad: AdamW4bit does not support complex gradients")
            if backend == "triton":  # stepped together, in a few launches
                batch.append((group, p, g, kind))
                continue
            plan = _pass_stats(self, p, g, group, kind, backend)
            work.append((group, p, g, kind, backend, plan))
        if not work and not batch:
            return loss
        _run_stats_kernels([w[5] for w in work])
        runs, batch_ok = _triton_check(self, batch)
        ok = _all_flags([w[5]["finite"] for w in work]) + batch_ok
        if not all(ok):
            _triton_abort(self, runs)
            shapes = [w[1].shape for w in work] + [b[1].shape for b in batch]
            bad = [f"#{i} {tuple(s)}" for i, (s, good) in enumerate(zip(shapes, ok, strict=True)) if not good]
            self.skipped_steps += 1
            msg = (f"AdamW4bit: non-finite gradient in {len(bad)} parameter(s) "
                   f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); the step was not "
                   f"taken, parameters and optimizer states are unchanged")
            if self.nonfinite == "raise":
                raise FloatingPointError(msg)
            log.warning(msg)
            return loss
        calls: dict[str, list[tuple]] = {"fused": [], "fp32": []}
        for group, p, g, kind, backend, plan in work:
            _pass_update(self, p, g, group, kind, backend, plan, calls)
        _run_update_kernels(calls)
        for _group, p, _g, kind, _backend, plan in work:
            _finish_update(self.state[p], kind, plan)
        _triton_apply(self, batch, runs)
        return loss

    # ------------------------------------------------------------------ inspection
    def dequantized_state(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v) of `p` as float32 tensors shaped like `p` (zeros before the first step)."""
        group = self._group_of(p)
        st = self.state.get(p)
        if not st or st["step"] == 0:
            z = torch.zeros(p.shape, device=p.device, dtype=torch.float32)
            return z, z.clone()
        kind = self.layout(p, group)
        if kind == "fp32":
            return st["exp_avg"].clone(), st["exp_avg_sq"].clone()
        n, block = p.numel(), group["block_size"]
        m = quant.SIGNED_MAP.to(p.device)[quant.unpack_nibbles(st["exp_avg_codes"], n)]
        m = m * quant.expand_blocks(st["exp_avg_scale"].float(), block, n)
        if kind == "factor":
            rows, cols = p.shape[-2], p.shape[-1]
            r = st["exp_avg_sq_row"].reshape(-1, rows)
            r_mean = r.mean(dim=-1, keepdim=True)
            rf = torch.where(r_mean > 0, r / r_mean, torch.zeros_like(r))
            v = (rf[:, :, None] * st["exp_avg_sq_col"].reshape(-1, 1, cols)).reshape(-1)
        else:
            codes = self.v_map.to(p.device)[quant.unpack_nibbles(st["exp_avg_sq_codes"], n)]
            if kind == "rank1":
                maxes = [st[f"exp_avg_sq_max{k}"] for k in range(p.dim())]
                s = torch.minimum(_row_scale(maxes[:-1], p.shape)[:, None], maxes[-1][None, :])
                s = s.reshape(-1)
            else:
                s = quant.expand_blocks(st["exp_avg_sq_scale"].float(), block, n)
            v = codes * s
        return m.view(p.shape), v.view(p.shape)

    def optimizer_state_bytes(self) -> int:
        """Bytes the optimizer states occupy (every state tensor's elements)."""
        return optimizer_state_bytes(self)

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As `Optimizer.load_state_dict`, but state tensors keep their saved dtypes (the base
        class would cast uint8 codes and fp32 scales to the parameter's dtype)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("state_dict: it has a different number of parameter groups")
        originals = {k: dict(v) for k, v in state_dict["state"].items()}
        _forget_plans(self)  # they point at the states being replaced
        super().load_state_dict(state_dict)
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups), strict=True))
        for key, saved in originals.items():
            p = id_map[key]
            for name, value in saved.items():
                if name == "step":
                    self.state[p][name] = int(value.item()) if torch.is_tensor(value) else int(value)
                elif torch.is_tensor(value):
                    self.state[p][name] = value.to(device=p.device, copy=True)
        for group in self.param_groups:
            group["betas"] = (float(group["betas"][0]), float(group["betas"][1]))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of an optimizer's per-parameter states."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total
