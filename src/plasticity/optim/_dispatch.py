"""Which backend steps each tensor of an `AdamW4bit`, and how each backend's work is batched.

A step has two passes. Pass 1 takes the statistics of the new second moment and checks
every gradient (and second moment) for non-finite values; pass 2 updates parameters and
moments, and runs only when every check passed. Per backend:

- "torch": both passes in PyTorch operations, one tensor at a time (`_numerics`);
- "cpp": each pass queues its tensors' arguments and makes one call into the C++ kernel
  per kind of work (`*_many`), so a step costs a few calls however many tensors it has;
- "triton": one `_triton.Plan` per device, kept while the addresses it holds stay the same,
  runs both passes in a fixed number of launches (`_triton_check`, `_triton_apply`).

The functions take the optimizer for its `state` and for the caches it carries between
steps (routes, Triton plans, a CPU scratch buffer), none of which is optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch

from plasticity.optim import quant
from plasticity.optim._numerics import (
    _SQUARES_CHUNK,
    _dim_maxes,
    _factor_plan,
    _init_state,
    _mean_squares,
    _old_rank1_scales,
    _row_scale,
    _step_constants,
    _update_fp32,
    _update_quantized_torch,
    _v_new_torch,
)

_MODE = {"rank1": 0, "block": 1, "factor": 2}  # the kernels' second-moment modes


# ------------------------------------------------------------------ routes
def _backend_for(opt, p: torch.Tensor, block: int) -> str:
    if not opt._kernel_maps():
        return "torch"
    if opt.backend in ("auto", "triton"):
        from plasticity.optim import _triton

        on_device = p.is_cuda and _triton.available()
        # Forced "triton" on CPU tensors under TRITON_INTERPRET=1: the kernels, interpreted.
        interpreted = (opt.backend == "triton" and p.device.type == "cpu"
                       and _triton.interpreted())
        if (on_device or interpreted) and _triton.supports(block) and _triton.handles(p):
            return "triton"
    if (p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
            and opt.backend in ("auto", "cpp")):
        from plasticity.optim import _cpu

        if _cpu.available():
            return "cpp"
    return "torch"


def _routes(opt) -> list[tuple[dict[str, Any], torch.Tensor, str, str]]:
    """(group, parameter, layout, backend) of every parameter, in order; worked out again
    when a parameter's storage, dtype or strides, a group's storage settings or `backend`
    change."""
    sig = (opt.backend,
           *((id(p), p.data_ptr(), p.dtype, p.stride()) for group in opt.param_groups
             for p in group["params"]),
           *((group["second_moment"], group["block_size"], group["min_quantized_numel"],
              group.get("quantize", True), group.get("scale_dtype", "float32"))
             for group in opt.param_groups))
    cached = opt.__dict__.get("_route_cache")
    if cached is None or cached[0] != sig:
        routes = [(group, p, opt.layout(p, group), _backend_for(opt, p, group["block_size"]))
                  for group in opt.param_groups for p in group["params"]]
        cached = opt.__dict__["_route_cache"] = (sig, routes)
    return cached[1]


# ------------------------------------------------------------------ batching helpers
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


def _by_device(batch: list[tuple]) -> dict[torch.device, list[int]]:
    out: dict[torch.device, list[int]] = {}
    for i, item in enumerate(batch):
        out.setdefault(item[1].device, []).append(i)
    return out


def _by_argument(calls: list[tuple]) -> list[list[Any]]:
    """Argument tuples of several calls -> one list per argument (the C++ `*_many` form)."""
    return [list(column) for column in zip(*calls, strict=True)]


# ------------------------------------------------------------------ PyTorch and C++ (per tensor)
def _squares_scratch(opt, g3: torch.Tensor) -> torch.Tensor | None:
    """A reusable CPU buffer for `_mean_squares` (not optimizer state: never saved)."""
    if g3.device.type != "cpu":
        return None
    if getattr(opt, "_scratch", None) is None:
        opt._scratch = torch.empty(_SQUARES_CHUNK, dtype=torch.float32)
    return opt._scratch


def _pass_stats(opt, p, g, group, kind, backend) -> dict[str, Any]:
    """Pass 1: statistics of the new second moment and a finiteness flag; writes nothing."""
    st = opt.state.get(p) or None
    fresh = st is None or st["step"] == 0
    b2 = group["betas"][1]
    if kind == "rank1":
        shape = p.shape
        cols = shape[-1]
        row_old, col_old, _ = _old_rank1_scales(st, shape, p.device)
        vcodes = st["exp_avg_sq_codes"] if st else torch.zeros(0, dtype=torch.uint8, device=p.device)
        if backend == "cpp":  # run by _run_stats_kernels, with the other tensors'
            return {"rank1_args": (g.contiguous(), vcodes, row_old, col_old, cols, fresh, b2),
                    "row_old": row_old, "col_old": col_old, "shape": shape}
        else:
            gf = g.reshape(-1).float()
            vnew = _v_new_torch(opt.v_map, gf, vcodes, row_old, col_old, cols, fresh, b2)
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
        row_msq, col_msq = _mean_squares(g3, _squares_scratch(opt, g3))
        return _factor_plan(r_old, c_old, row_msq, col_msq, b2, p.is_cuda)
    # fp32 and block: only the finiteness check.
    if backend == "cpp":  # run by _run_stats_kernels, with the other tensors'
        return {"finite_of": g.contiguous()}
    finite = torch.isfinite(g).all()
    return {"finite": finite if p.is_cuda else bool(finite)}


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


def _pass_update(opt, p, g, group, kind, backend, plan, calls) -> None:
    """Pass 2 for one tensor: PyTorch updates run here, C++ ones are queued in `calls`
    (arguments of fused_step and fp32_step) for `_run_update_kernels`; `_finish_update`
    follows."""
    block = group["block_size"]
    st = opt.state[p]
    if not st:
        st.update(_init_state(p, kind, block, group.get("scale_dtype", "float32")))
    t = st["step"] + 1
    sc = dict(zip(("decay", "beta1", "beta2", "inv_bc2_sqrt", "eps", "step_size"),
                  _step_constants(group, t), strict=True))
    if kind == "fp32" and backend == "cpp" and g.dtype == torch.float32:
        calls["fp32"].append((p.data, g.contiguous(), st["exp_avg"], st["exp_avg_sq"],
                              sc["decay"], sc["beta1"], sc["beta2"], sc["inv_bc2_sqrt"],
                              sc["eps"], sc["step_size"]))
    elif kind == "fp32":
        _update_fp32(p, g, st, sc)
    elif backend == "torch":
        _update_quantized_torch(p, g, st, kind, plan, sc, block, opt.v_map, opt.v_quantize)
    else:
        calls["fused"].append(_kernel_args(p, g, st, kind, plan, sc, block))


def _run_update_kernels(calls: dict[str, list[tuple]]) -> None:
    """The queued C++ updates of pass 2, one call per kind."""
    if calls["fused"] or calls["fp32"]:
        from plasticity.optim import _cpu

        if calls["fused"]:
            _cpu.load().fused_step_many(*_by_argument(calls["fused"]))
        if calls["fp32"]:
            _cpu.load().fp32_step_many(*_by_argument(calls["fp32"]))


def _finish_update(st: dict[str, Any], kind: str, plan: dict[str, Any]) -> None:
    """After pass 2: the new second-moment statistics into the state, and the step count
    (the kernels read the old statistics, so not before they ran)."""
    if kind == "rank1":
        for k, mx in enumerate(plan["maxes"]):
            st[f"exp_avg_sq_max{k}"].copy_(mx)
    elif kind == "factor":
        st["exp_avg_sq_row"].copy_(plan["r_new"].view_as(st["exp_avg_sq_row"]))
        st["exp_avg_sq_col"].copy_(plan["c_new"].view_as(st["exp_avg_sq_col"]))
    st["step"] += 1


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


# ------------------------------------------------------------------ Triton (multi-tensor)
def _triton_check(opt, batch: list[tuple]) -> tuple[list[tuple], list[bool]]:
    """Pass 1 of the Triton path, per device: whether each tensor of `batch` is finite, and
    what `_triton_apply` needs. A device's `_triton.Plan` is kept while its addresses stay
    the same. Creates the states of tensors stepped for the first time; `_triton_abort`
    removes them again if the step is not taken."""
    from plasticity.optim import _triton

    runs, ok = [], [True] * len(batch)
    plans = opt.__dict__.setdefault("_triton_plans", {})
    for dev, idx in _by_device(batch).items():
        created, grads = [], []
        for i in idx:
            group, p, g, kind = batch[i]
            grads.append((g if g.dtype in _triton.KINDS else g.float()).contiguous())
            st = opt.state[p]
            if not st:
                st.update(_init_state(p, kind, group["block_size"],
                                      group.get("scale_dtype", "float32")))
                created.append(p)
        key = tuple((id(batch[i][1]), batch[i][1].data_ptr(), g.data_ptr(), g.dtype, batch[i][3],
                     batch[i][0]["block_size"], opt.state[batch[i][1]]["step"] == 0)
                    for i, g in zip(idx, grads, strict=True))
        if dev not in plans or plans[dev][0] != key:
            plans[dev] = (key, _triton_plan(opt, [batch[i] for i in idx], grads, dev))
        plan, special, copies = plans[dev][1]
        consts, factor_stats, rows = [], {}, {}
        for i in idx:
            group, t = batch[i][0], opt.state[batch[i][1]]["step"] + 1
            row = rows.get((id(group), t))
            if row is None:
                row = rows[(id(group), t)] = _triton.step_constants(*_step_constants(group, t))
            consts += row
        for j, kind in special.items():  # per-step PyTorch work before pass 1
            group, p, _, _ = batch[idx[j]]
            st, item = opt.state[p], plan.items[j]
            if kind == "factor":
                fs = _pass_stats(opt, p, grads[j], group, "factor", "triton")
                item.row_new.copy_(fs["row_factor"])
                item.col_new.copy_(fs["c_new"].reshape(-1))
                factor_stats[j] = fs
            elif st["step"] > 0:  # rank1, ndim >= 3: the old row scale
                item.row_old.copy_(_old_rank1_scales(st, p.shape, dev)[0])
        bad = plan.check(consts)
        for j, n_bad in enumerate(bad):
            ok[idx[j]] = n_bad == 0
        for j, good in zip(factor_stats, _all_flags([fs["finite"] for fs in factor_stats.values()]),
                           strict=True):
            ok[idx[j]] = good
        runs.append((dev, idx, grads, created, factor_stats))
    return runs, ok


def _triton_plan(opt, items: list[tuple], grads: list[torch.Tensor], dev: torch.device):
    """A `_triton.Plan` for one device's tensors, and which of them need PyTorch work each
    step (factor statistics; rank-1 scales of tensors with more than two dimensions, kept in
    buffers the plan's tables point to)."""
    from plasticity.optim import _triton

    out, special = [], {}
    for j, ((group, p, _, kind), g) in enumerate(zip(items, grads, strict=True)):
        st = opt.state[p]
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
            copy_to += [opt.state[p]["exp_avg_sq_max0"], opt.state[p]["exp_avg_sq_max1"]]
            copy_from += list(plan.maxima_of[j])
    return plan, special, (copy_to, copy_from)


def _triton_apply(opt, batch: list[tuple], runs: list[tuple]) -> None:
    """Pass 2 of the Triton path (after every tensor's check passed)."""
    plans = opt.__dict__["_triton_plans"]
    for dev, idx, grads, _, factor_stats in runs:
        plan, special, (copy_to, copy_from) = plans[dev][1]
        copy_to, copy_from = list(copy_to), list(copy_from)
        for j, kind in special.items():
            p = batch[idx[j]][1]
            st = opt.state[p]
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
            opt.state[batch[i][1]]["step"] += 1
        if copy_to:  # after pass 2, which reads the old rank-1 scales
            torch._foreach_copy_(copy_to, copy_from)


def _triton_abort(opt, runs: list[tuple]) -> None:
    """The step is not taken: forget the states `_triton_check` created."""
    for dev, _, _, created, _ in runs:
        for p in created:
            del opt.state[p]
        if created:
            opt.__dict__["_triton_plans"].pop(dev, None)


def _forget_plans(opt) -> None:
    """Drop the Triton plans (they point at state tensors about to be replaced)."""
    opt.__dict__.pop("_triton_plans", None)
