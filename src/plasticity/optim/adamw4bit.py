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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from plasticity.optim import quant

log = logging.getLogger(__name__)

SECOND_MOMENTS = ("rank1", "block", "factor")
BACKENDS = ("auto", "cpp", "torch", "triton")
_MODE = {"rank1": 0, "block": 1, "factor": 2}
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (PyTorch's vectorized CPU sqrt is not always;
    the C++ kernel's is), so both paths round alike."""
    return v.double().sqrt().float() if v.device.type == "cpu" else v.sqrt()


def _all_flags(flags: list[Any]) -> list[bool]:
    """Python bools and device tensors -> bools, with one transfer per device."""
    out: list[Any] = list(flags)
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        if torch.is_tensor(f):
            by_device.setdefault(f.device, []).append(i)
    for idx in by_device.values():
        values = torch.stack([flags[i].reshape(()).bool() for i in idx]).tolist()
        for i, v in zip(idx, values, strict=True):
            out[i] = v
    return [bool(f) for f in out]


_SQUARES_CHUNK = 1 << 20  # elements of g^2 held at once on the CPU (4 MB)


def _pair_sums(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums of `x` along `dim` (removed) as a pairwise tree: adjacent pairs added, an odd
    last element carried up unchanged, until one is left. For values >= +0 (squares) this
    is the perfect tree over the length rounded up to a power of two, zero-padded: the C++
    kernel's `factor_stats` sums in this order too, so both give the same bits."""
    dim = dim % x.dim()
    if x.shape[dim] == 1:
        return x.squeeze(dim).clone()  # (never a view of the caller's buffer)
    while x.shape[dim] > 1:
        n = x.shape[dim]
        h = n // 2
        pairs = x.narrow(dim, 0, 2 * h).unflatten(dim, (h, 2))
        s = pairs.select(dim + 1, 0) + pairs.select(dim + 1, 1)
        x = torch.cat([s, x.narrow(dim, n - 1, 1)], dim) if n & 1 else s
    return x.squeeze(dim)


def _mean_squares(g3: torch.Tensor, scratch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of g^2 over the last and the second-to-last dimension of (B, rows, cols) `g3`.

    On the CPU the sums are pairwise trees (`_pair_sums`, the order of the C++ kernel's
    `factor_stats`), with g^2 formed in `scratch` a chunk at a time (whole batches, or an
    aligned power-of-two number of rows of one batch: subtrees of the column tree) instead
    of as a new tensor the size of the parameter. On GPUs, PyTorch's reductions."""
    nb, rows, cols = g3.shape
    if g3.device.type != "cpu":
        sq = g3 * g3
        return sq.sum(dim=-1) / cols, sq.sum(dim=-2) / rows
    cap = scratch.numel() if scratch is not None else g3.numel()

    def square(gc: torch.Tensor) -> torch.Tensor:
        if scratch is None or gc.numel() > cap:  # (no buffer, or a row longer than it)
            return gc * gc
        return torch.mul(gc, gc, out=scratch[:gc.numel()].view(gc.shape))

    if rows * cols <= cap:
        row_sum = torch.empty(nb, rows)
        col_sum = torch.empty(nb, cols)
        step = max(1, cap // (rows * cols))
        for b0 in range(0, nb, step):
            sq = square(g3[b0:b0 + step])
            row_sum[b0:b0 + step] = _pair_sums(sq, -1)
            col_sum[b0:b0 + step] = _pair_sums(sq, -2)
    else:
        span = 1 << max(0, (cap // cols).bit_length() - 1)  # rows per chunk, a power of two
        row_parts, col_sums = [], []
        for b in range(nb):
            roots = []
            for r0 in range(0, rows, span):
                sq = square(g3[b, r0:r0 + span])
                row_parts.append(_pair_sums(sq, -1))
                roots.append(_pair_sums(sq, -2))
            col_sums.append(_pair_sums(torch.stack(roots), 0))
        row_sum = torch.cat(row_parts).view(nb, rows)
        col_sum = torch.stack(col_sums)
    return row_sum / cols, col_sum / rows


def _row_scale(maxes: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Per flat row of the (prod(shape[:-1]) x shape[-1]) view: min over the leading dims'
    max vectors."""
    lead = shape[:-1]
    if len(lead) == 1:
        return maxes[0]
    s: torch.Tensor | None = None
    for k in range(len(lead)):
        view = [1] * len(lead)
        view[k] = lead[k]
        t = maxes[k].view(view)
        s = t if s is None else torch.minimum(s, t)
    assert s is not None
    return s.expand(lead).reshape(-1).contiguous()


def _step_constants(group: dict[str, Any], t: int) -> tuple[float, float, float, float, float, float]:
    """decay, beta1, beta2, 1 / sqrt(1 - beta2^t), eps, lr / (1 - beta1^t) for step t."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    b1, b2 = group["betas"]
    return (1.0 - lr * wd, b1, b2, 1.0 / math.sqrt(1.0 - b2**t), eps, lr / (1.0 - b1**t))


def _by_device(batch: list[tuple]) -> dict[torch.device, list[int]]:
    out: dict[torch.device, list[int]] = {}
    for i, item in enumerate(batch):
        out.setdefault(item[1].device, []).append(i)
    return out


def _by_argument(calls: list[tuple]) -> list[list[Any]]:
    """Argument tuples of several calls -> one list per argument (the C++ `*_many` form)."""
    return [list(column) for column in zip(*calls, strict=True)]


def _factor_plan(r_old: torch.Tensor, c_old: torch.Tensor, row_msq: torch.Tensor,
                 col_msq: torch.Tensor, b2: float, cuda: bool) -> dict[str, Any]:
    """A factor step's new row and column statistics, row factor and finiteness."""
    r_new = r_old * b2 + row_msq * (1.0 - b2)
    c_new = c_old * b2 + col_msq * (1.0 - b2)
    r_mean = r_new.mean(dim=-1, keepdim=True)
    row_factor = torch.where(r_mean > 0, r_new / r_mean, torch.zeros_like(r_new))
    finite = torch.isfinite(r_new).all() & torch.isfinite(c_new).all()
    return {"finite": finite if cuda else bool(finite), "r_new": r_new, "c_new": c_new,
            "row_factor": row_factor.reshape(-1).contiguous()}


def _dim_maxes(row_max: torch.Tensor, col_max: torch.Tensor, shape: torch.Size) -> list[torch.Tensor]:
    lead = shape[:-1]
    if len(lead) == 1:
        return [row_max, col_max]
    rm = row_max.view(lead)
    out = []
    for k in range(len(lead)):
        others = [d for d in range(len(lead)) if d != k]
        out.append(rm.amax(dim=others).contiguous())
    return [*out, col_max]


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

    def _backend_for(self, p: torch.Tensor, block: int) -> str:
        if type(self).v_map is not AdamW4bit.v_map or type(self).v_quantize is not AdamW4bit.v_quantize:
            return "torch"
        if self.backend in ("auto", "triton"):
            from plasticity.optim import _triton

            on_device = p.is_cuda and _triton.available()
            # Forced "triton" on CPU tensors under TRITON_INTERPRET=1: the kernels, interpreted.
            interpreted = (self.backend == "triton" and p.device.type == "cpu"
                           and _triton.interpreted())
            if (on_device or interpreted) and _triton.supports(block) and _triton.handles(p):
                return "triton"
        if (p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
                and self.backend in ("auto", "cpp")):
            from plasticity.optim import _cpu

            if _cpu.available():
                return "cpp"
        return "torch"

    def _routes(self) -> list[tuple[dict[str, Any], torch.Tensor, str, str]]:
        """(group, parameter, layout, backend) of every parameter, in order; worked out again
        when a parameter's storage, dtype or strides, a group's storage settings or `backend`
        change."""
        sig = (self.backend,
               *((id(p), p.data_ptr(), p.dtype, p.stride()) for group in self.param_groups
                 for p in group["params"]),
               *((group["second_moment"], group["block_size"], group["min_quantized_numel"],
                  group.get("quantize", True), group.get("scale_dtype", "float32"))
                 for group in self.param_groups))
        cached = self.__dict__.get("_route_cache")
        if cached is None or cached[0] != sig:
            routes = [(group, p, self.layout(p, group),
                       self._backend_for(p, group["block_size"]))
                      for group in self.param_groups for p in group["params"]]
            cached = self.__dict__["_route_cache"] = (sig, routes)
        return cached[1]

    def _init_state(self, p: torch.Tensor, kind: str, block: int,
                    scale_dtype: str = "float32") -> dict[str, Any]:
        n = p.numel()
        dev = p.device
        f32 = dict(device=dev, dtype=torch.float32)
        scales = dict(device=dev, dtype=SCALE_DTYPES[scale_dtype])
        st: dict[str, Any] = {"step": 0}
        if kind == "fp32":
            st["exp_avg"] = torch.zeros(p.shape, **f32)
            st["exp_avg_sq"] = torch.zeros(p.shape, **f32)
            return st
        nb = -(-n // block)
        st["exp_avg_codes"] = torch.zeros(quant.packed_bytes(n), device=dev, dtype=torch.uint8)
        st["exp_avg_scale"] = torch.zeros(nb, **scales)
        if kind == "rank1":
            st["exp_avg_sq_codes"] = torch.zeros(quant.packed_bytes(n), device=dev, dtype=torch.uint8)
            for k, size in enumerate(p.shape):
                st[f"exp_avg_sq_max{k}"] = torch.zeros(size, **f32)
        elif kind == "block":
            st["exp_avg_sq_codes"] = torch.zeros(quant.packed_bytes(n), device=dev, dtype=torch.uint8)
            st["exp_avg_sq_scale"] = torch.zeros(nb, **scales)
        else:  # factor
            st["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], **f32)
            st["exp_avg_sq_col"] = torch.zeros((*p.shape[:-2], p.shape[-1]), **f32)
        return st

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, batch = [], []
        for group, p, kind, backend in self._routes():
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
            plan = self._pass_stats(p, g, group, kind, backend)
            work.append((group, p, g, kind, backend, plan))
        if not work and not batch:
            return loss
        self._run_stats_kernels([w[5] for w in work])
        runs, batch_ok = self._triton_check(batch)
        ok = _all_flags([w[5]["finite"] for w in work]) + batch_ok
        if not all(ok):
            self._triton_abort(runs)
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
            self._pass_update(p, g, group, kind, backend, plan, calls)
        if calls["fused"] or calls["fp32"]:
            from plasticity.optim import _cpu

            if calls["fused"]:
                _cpu.load().fused_step_many(*_by_argument(calls["fused"]))
            if calls["fp32"]:
                _cpu.load().fp32_step_many(*_by_argument(calls["fp32"]))
        for _group, p, _g, kind, _backend, plan in work:
            self._finish_update(p, kind, plan)
        self._triton_apply(batch, runs)
        return loss

    # ------------------------------------------------------------------ Triton (multi-tensor)
    def _triton_check(self, batch: list[tuple]) -> tuple[list[tuple], list[bool]]:
        """Pass 1 of the Triton path, per device: whether each tensor of `batch` is finite, and
        what `_triton_apply` needs. A device's `_triton.Plan` is kept while its addresses stay
        the same. Creates the states of tensors stepped for the first time; `_triton_abort`
        removes them again if the step is not taken."""
        from plasticity.optim import _triton

        runs, ok = [], [True] * len(batch)
        plans = self.__dict__.setdefault("_triton_plans", {})
        for dev, idx in _by_device(batch).items():
            created, grads = [], []
            for i in idx:
                group, p, g, kind = batch[i]
                grads.append((g if g.dtype in _triton.KINDS else g.float()).contiguous())
                st = self.state[p]
                if not st:
                    st.update(self._init_state(p, kind, group["block_size"],
                                               group.get("scale_dtype", "float32")))
                    created.append(p)
            key = tuple((id(batch[i][1]), batch[i][1].data_ptr(), g.data_ptr(), g.dtype, batch[i][3],
                         batch[i][0]["block_size"], self.state[batch[i][1]]["step"] == 0)
                        for i, g in zip(idx, grads, strict=True))
            if dev not in plans or plans[dev][0] != key:
                plans[dev] = (key, self._triton_plan([batch[i] for i in idx], grads, dev))
            plan, special, copies = plans[dev][1]
            consts, factor_stats, rows = [], {}, {}
            for i in idx:
                group, t = batch[i][0], self.state[batch[i][1]]["step"] + 1
                row = rows.get((id(group), t))
                if row is None:
                    row = rows[(id(group), t)] = _triton.step_constants(*_step_constants(group, t))
                consts += row
            for j, kind in special.items():  # per-step PyTorch work before pass 1
                group, p, _, _ = batch[idx[j]]
                st, item = self.state[p], plan.items[j]
                if kind == "factor":
                    fs = self._pass_stats(p, grads[j], group, "factor", "triton")
                    item.row_new.copy_(fs["row_factor"])
                    item.col_new.copy_(fs["c_new"].reshape(-1))
                    factor_stats[j] = fs
                elif st["step"] > 0:  # rank1, ndim >= 3: the old row scale
                    item.row_old.copy_(self._old_rank1_scales(st, p.shape, dev)[0])
            bad = plan.check(consts)
            for j, n_bad in enumerate(bad):
                ok[idx[j]] = n_bad == 0
            for j, good in zip(factor_stats, _all_flags([fs["finite"] for fs in factor_stats.values()]),
                               strict=True):
                ok[idx[j]] = good
            runs.append((dev, idx, grads, created, factor_stats))
        return runs, ok

    def _triton_plan(self, items: list[tuple], grads: list[torch.Tensor], dev: torch.device):
        """A `_triton.Plan` for one device's tensors, and which of them need PyTorch work each
        step (factor statistics; rank-1 scales of tensors with more than two dimensions, kept in
        buffers the plan's tables point to)."""
        from plasticity.optim import _triton

        out, special = [], {}
        for j, ((group, p, _, kind), g) in enumerate(zip(items, grads, strict=True)):
            st = self.state[p]
            item = _triton.Item(p, g, 3 if kind == "fp32" else _MODE[kind], st["step"] == 0,
                                group["block_size"], st.get("exp_avg_codes"), st.get("exp_avg_scale"),
                                st.get("exp_avg_sq_codes"), st.get("exp_avg_sq_scale"))
            if kind == "fp32":
                item.m, item.v = st["exp_avg"], st["exp_avg_sq"]
            elif kind == "rank1":
                item.cols = p.shape[-1]
                col_old = st[f"exp_avg_sq_max{p.dim() - 1}"]
                if p.dim() == 2:
                    item.row_old, item.col_old = st["exp_avg_sq_max0"], col_old
                else:
                    rows = p.numel() // item.cols
                    item.row_old = torch.zeros(rows, device=dev)
                    item.row_new = torch.zeros(rows, device=dev)
                    item.col_old = col_old
                    special[j] = "rank1"
            elif kind == "factor":
                item.cols, item.rows_per_matrix = p.shape[-1], p.shape[-2]
                item.row_new = torch.zeros(p.numel() // p.shape[-1], device=dev)
                item.col_new = torch.zeros(st["exp_avg_sq_col"].numel(), device=dev)
                special[j] = "factor"
            out.append(item)
        plan = _triton.Plan(out, dev)
        for item in out:  # the plan keeps addresses only: no reference to this step's gradients
            item.grad = None
        copy_to, copy_from = [], []  # new rank-1 maxima -> states, after pass 2 (matrices)
        for j, (_, p, _, kind) in enumerate(items):
            if kind == "rank1" and p.dim() == 2:
                copy_to += [self.state[p]["exp_avg_sq_max0"], self.state[p]["exp_avg_sq_max1"]]
                copy_from += list(plan.maxima_of[j])
        return plan, special, (copy_to, copy_from)

    def _triton_apply(self, batch: list[tuple], runs: list[tuple]) -> None:
        """Pass 2 of the Triton path (after every tensor's check passed)."""
        plans = self.__dict__["_triton_plans"]
        for dev, idx, grads, _, factor_stats in runs:
            plan, special, (copy_to, copy_from) = plans[dev][1]
            copy_to, copy_from = list(copy_to), list(copy_from)
            for j, kind in special.items():
                p = batch[idx[j]][1]
                st = self.state[p]
                if kind == "rank1":  # ndim >= 3: 1 / the new row scale, and every dimension's maxima
                    maxes = _dim_maxes(*plan.maxima_of[j], p.shape)
                    plan.items[j].row_new.copy_(quant.inv_or_zero(_row_scale(maxes[:-1], p.shape)))
                    copy_to += [st[f"exp_avg_sq_max{k}"] for k in range(p.dim())]
                    copy_from += maxes
                else:
                    fs = factor_stats[j]
                    copy_to += [st["exp_avg_sq_row"].view(-1), st["exp_avg_sq_col"].view(-1)]
                    copy_from += [fs["r_new"].reshape(-1), fs["c_new"].reshape(-1)]
            plan.step()
            del grads  # (kept alive until the launches above)
            for i in idx:
                self.state[batch[i][1]]["step"] += 1
            if copy_to:  # after pass 2, which reads the old rank-1 scales
                torch._foreach_copy_(copy_to, copy_from)

    def _triton_abort(self, runs: list[tuple]) -> None:
        """The step is not taken: forget the states `_triton_check` created."""
        for dev, _, _, created, _ in runs:
            for p in created:
                del self.state[p]
            if created:
                self.__dict__["_triton_plans"].pop(dev, None)

    def _squares_scratch(self, g3: torch.Tensor) -> torch.Tensor | None:
        """A reusable CPU buffer for `_mean_squares` (not optimizer state: never saved)."""
        if g3.device.type != "cpu":
            return None
        if getattr(self, "_scratch", None) is None:
            self._scratch = torch.empty(_SQUARES_CHUNK, dtype=torch.float32)
        return self._scratch

    def _old_rank1_scales(self, st: dict[str, Any] | None, shape: torch.Size, dev: torch.device):
        if st is None or st["step"] == 0:
            rows = math.prod(shape[:-1])
            z = torch.zeros(0, device=dev, dtype=torch.float32)
            return torch.zeros(rows, device=dev), torch.zeros(shape[-1], device=dev), z
        maxes = [st[f"exp_avg_sq_max{k}"] for k in range(len(shape))]
        return _row_scale(maxes[:-1], shape), maxes[-1], None

    def _pass_stats(self, p, g, group, kind, backend) -> dict[str, Any]:
        """Pass 1: statistics of the new second moment and a finiteness flag; writes nothing."""
        st = self.state.get(p) or None
        fresh = st is None or st["step"] == 0
        b2 = group["betas"][1]
        if kind == "rank1":
            shape = p.shape
            cols = shape[-1]
            row_old, col_old, _ = self._old_rank1_scales(st, shape, p.device)
            vcodes = st["exp_avg_sq_codes"] if st else torch.zeros(0, dtype=torch.uint8, device=p.device)
            if backend == "cpp":  # run by _run_stats_kernels, with the other tensors'
                return {"rank1_args": (g.contiguous(), vcodes, row_old, col_old, cols, fresh, b2),
                        "row_old": row_old, "col_old": col_old, "shape": shape}
            else:
                gf = g.reshape(-1).float()
                vnew = self._v_new_torch(gf, vcodes, row_old, col_old, cols, fresh, b2)
                finite = bool(torch.isfinite(vnew).all())
                v2 = vnew.view(-1, cols)
                row_max, col_max = v2.amax(dim=1), v2.amax(dim=0)
            return {"finite": finite, "row_old": row_old, "col_old": col_old,
                    "maxes": _dim_maxes(row_max, col_max, shape), "row_max": row_max,
                    "col_max": col_max}
        if kind == "factor":
            shape = p.shape
            rows, cols = shape[-2], shape[-1]
            g3 = g.reshape(-1, rows, cols).float()
            r_old = st["exp_avg_sq_row"].reshape(-1, rows) if not fresh else torch.zeros(
                g3.shape[0], rows, device=p.device)
            c_old = st["exp_avg_sq_col"].reshape(-1, cols) if not fresh else torch.zeros(
                g3.shape[0], cols, device=p.device)
            if backend == "cpp":  # run by _run_stats_kernels, with the other tensors'
                return {"factor_args": (g.contiguous(), rows, cols), "r_old": r_old,
                        "c_old": c_old, "b2": b2}
            row_msq, col_msq = _mean_squares(g3, self._squares_scratch(g3))
            return _factor_plan(r_old, c_old, row_msq, col_msq, b2, p.is_cuda)
        # fp32 and block: only the finiteness check.
        if backend == "cpp":  # run by _run_stats_kernels, with the other tensors'
            return {"finite_of": g.contiguous()}
        finite = torch.isfinite(g).all()
        return {"finite": finite if p.is_cuda else bool(finite)}

    @staticmethod
    def _run_stats_kernels(plans: list[dict[str, Any]]) -> None:
        """Complete the plans `_pass_stats` left to the C++ kernel, in one call per kind."""
        r1 = [pl for pl in plans if "rank1_args" in pl]
        fin = [pl for pl in plans if "finite_of" in pl]
        fac = [pl for pl in plans if "factor_args" in pl]
        if not r1 and not fin and not fac:
            return
        from plasticity.optim import _cpu

        if fin:
            flags = _cpu.load().all_finite_many([pl.pop("finite_of") for pl in fin])
            for pl, f in zip(fin, flags, strict=True):
                pl["finite"] = f
        if r1:
            args = [pl.pop("rank1_args") for pl in r1]
            row_max, col_max, finite = _cpu.load().rank1_stats_many(*_by_argument(args))
            for pl, rm, cm, f in zip(r1, row_max, col_max, finite, strict=True):
                pl.update(finite=f, maxes=_dim_maxes(rm, cm, pl.pop("shape")), row_max=rm,
                          col_max=cm)
        if fac:
            args = [pl.pop("factor_args") for pl in fac]
            row_sum, col_sum = _cpu.load().factor_stats_many(*_by_argument(args))
            for pl, (_, rows, cols), rs, cs in zip(fac, args, row_sum, col_sum, strict=True):
                pl.update(_factor_plan(pl.pop("r_old"), pl.pop("c_old"), rs / cols, cs / rows,
                                       pl.pop("b2"), False))

    def _v_new_torch(self, gf, vcodes, row_old, col_old, cols, fresh, b2) -> torch.Tensor:
        n = gf.numel()
        if fresh:
            vo = torch.zeros_like(gf)
        else:
            s_old = torch.minimum(row_old[:, None], col_old[None, :]).reshape(-1)
            vo = self.v_map.to(gf.device)[quant.unpack_nibbles(vcodes, n)] * s_old
        return vo * b2 + (gf * gf) * (1.0 - b2)

    def _pass_update(self, p, g, group, kind, backend, plan, calls) -> None:
        """Pass 2 for one tensor: PyTorch updates run here, C++ ones are queued in `calls`
        (arguments of fused_step and fp32_step) to run together; `_finish_update` follows."""
        block = group["block_size"]
        st = self.state[p]
        if not st:
            st.update(self._init_state(p, kind, block, group.get("scale_dtype", "float32")))
        t = st["step"] + 1
        sc = dict(zip(("decay", "beta1", "beta2", "inv_bc2_sqrt", "eps", "step_size"),
                      _step_constants(group, t), strict=True))
        if kind == "fp32" and backend == "cpp" and g.dtype == torch.float32:
            calls["fp32"].append((p.data, g.contiguous(), st["exp_avg"], st["exp_avg_sq"],
                                  sc["decay"], sc["beta1"], sc["beta2"], sc["inv_bc2_sqrt"],
                                  sc["eps"], sc["step_size"]))
        elif kind == "fp32":
            self._update_fp32(p, g, st, sc)
        elif backend == "torch":
            self._update_quantized_torch(p, g, st, kind, plan, sc, block)
        else:
            calls["fused"].append(self._kernel_args(p, g, st, kind, plan, sc, block))

    def _finish_update(self, p, kind, plan) -> None:
        """After pass 2: the new second-moment statistics into the state, and the step count
        (the kernels read the old statistics, so not before they ran)."""
        st = self.state[p]
        if kind == "rank1":
            for k, mx in enumerate(plan["maxes"]):
                st[f"exp_avg_sq_max{k}"].copy_(mx)
        elif kind == "factor":
            st["exp_avg_sq_row"].copy_(plan["r_new"].view_as(st["exp_avg_sq_row"]))
            st["exp_avg_sq_col"].copy_(plan["c_new"].view_as(st["exp_avg_sq_col"]))
        st["step"] += 1

    @staticmethod
    def _update_fp32(p, g, st, sc) -> None:
        gf = g.float()
        m = st["exp_avg"] * sc["beta1"] + gf * (1.0 - sc["beta1"])
        v = st["exp_avg_sq"] * sc["beta2"] + (gf * gf) * (1.0 - sc["beta2"])
        den = _sqrt(v) * sc["inv_bc2_sqrt"] + sc["eps"]
        pf = p.float() * sc["decay"]
        pf = pf - (m / den) * sc["step_size"]
        st["exp_avg"].copy_(m)
        st["exp_avg_sq"].copy_(v)
        p.copy_(pf)

    @staticmethod
    def _kernel_args(p, g, st, kind, plan, sc, block) -> tuple:
        """The arguments of the C++ fused_step for one tensor."""
        fresh = st["step"] == 0
        empty = torch.zeros(0, device=p.device, dtype=torch.float32)
        empty_u8 = torch.zeros(0, device=p.device, dtype=torch.uint8)
        if kind == "rank1":
            cols, rpb = p.shape[-1], 1
            row_old, col_old = plan["row_old"], plan["col_old"]
            row_new = _row_scale(plan["maxes"][:-1], p.shape)
            col_new = plan["maxes"][-1]
            v_codes, v_scale = st["exp_avg_sq_codes"], empty
        elif kind == "block":
            cols, rpb = 1, 1
            row_old = col_old = row_new = col_new = empty
            v_codes, v_scale = st["exp_avg_sq_codes"], st["exp_avg_sq_scale"]
        else:
            cols, rpb = p.shape[-1], p.shape[-2]
            row_old = col_old = empty
            row_new = plan["row_factor"]
            col_new = plan["c_new"].reshape(-1).contiguous()
            v_codes, v_scale = empty_u8, empty
        return (p.data, g.contiguous(), st["exp_avg_codes"], st["exp_avg_scale"], v_codes, v_scale,
                row_old, col_old, row_new, col_new, _MODE[kind], cols, rpb, fresh, sc["decay"],
                sc["beta1"], sc["beta2"], sc["inv_bc2_sqrt"], sc["eps"], sc["step_size"], block)

    def _update_quantized_torch(self, p, g, st, kind, plan, sc, block) -> None:
        n = p.numel()
        dev = p.device
        fresh = st["step"] == 0
        gf = g.reshape(-1).float()
        smap, umap = quant.SIGNED_MAP.to(dev), self.v_map.to(dev)
        if fresh:
            mo = torch.zeros_like(gf)
        else:
            mo = smap[quant.unpack_nibbles(st["exp_avg_codes"], n)] * quant.expand_blocks(
                st["exp_avg_scale"].float(), block, n)
        m = mo * sc["beta1"] + gf * (1.0 - sc["beta1"])
        if kind == "factor":
            rows, cols = p.shape[-2], p.shape[-1]
            rf = plan["row_factor"].view(-1, rows)
            v = (rf[:, :, None] * plan["c_new"].view(-1, 1, cols)).reshape(-1)
        elif kind == "rank1":
            v = self._v_new_torch(gf, st["exp_avg_sq_codes"], plan["row_old"], plan["col_old"],
                                  p.shape[-1], fresh, sc["beta2"])
        else:
            if fresh:
                vo = torch.zeros_like(gf)
            else:
                vo = umap[quant.unpack_nibbles(st["exp_avg_sq_codes"], n)] * quant.expand_blocks(
                    st["exp_avg_sq_scale"].float(), block, n)
            v = vo * sc["beta2"] + (gf * gf) * (1.0 - sc["beta2"])
        den = _sqrt(v) * sc["inv_bc2_sqrt"] + sc["eps"]
        pf = p.reshape(-1).float() * sc["decay"]
        pf = pf - (m / den) * sc["step_size"]
        # Requantize, against the scales as stored (float32, or rounded to bfloat16).
        m_scale = quant.block_absmax(m, block).clamp_min(quant.SCALE_FLOOR)
        m_scale = m_scale.to(st["exp_avg_scale"].dtype).float()
        inv_m = torch.ones_like(m_scale) / m_scale
        m_codes = quant.quantize_signed(m * quant.expand_blocks(inv_m, block, n))
        st["exp_avg_scale"].copy_(m_scale)
        st["exp_avg_codes"].copy_(quant.pack_nibbles(m_codes))
        if kind != "factor":
            # x = v * (1 / s); 1 / min(r, c) == max(1 / r, 1 / c) in floating point too.
            if kind == "rank1":
                inv = torch.maximum(
                    quant.inv_or_zero(_row_scale(plan["maxes"][:-1], p.shape))[:, None],
                    quant.inv_or_zero(plan["maxes"][-1])[None, :]).reshape(-1)
            else:
                v_scale = quant.block_absmax(v, block).to(st["exp_avg_sq_scale"].dtype).float()
                st["exp_avg_sq_scale"].copy_(v_scale)
                inv = quant.expand_blocks(quant.inv_or_zero(v_scale), block, n)
            x = v * inv
            st["exp_avg_sq_codes"].copy_(quant.pack_nibbles(self.v_quantize(x)))
        p.copy_(pf.view_as(p))

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
        self.__dict__.pop("_triton_plans", None)  # they point at the states being replaced
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
