"""Cases for test_optim_triton_interpret.py, which runs them in a child process.

Triton reads TRITON_INTERPRET when `triton.language` is imported, so these run only in a
process that set it first; pytest does not collect this file on its own (no `test_` prefix).
"""

from __future__ import annotations

import os

import pytest
import torch

from plasticity.optim import AdamW4bit, _triton
from tests.unit.optim_inputs import count_plan_builds, outlier_grad

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by test_optim_triton_interpret.py with TRITON_INTERPRET=1",
                allow_module_level=True)
pytest.importorskip("triton")

# Odd sizes: partial last blocks, partial tiles, a block count that is no multiple of the
# blocks per program, 3-D tensors (rank-1 maxima over every dimension, factor statistics over
# the last two), a 1-D tensor (block-wise second moment) and one kept in fp32 (numel <= 100).
# Rows a multiple of the block (24, 256), (2, 8, 128) take the kernel's per-row scale path.
SHAPES = [(40, 257), (64, 96), (3, 7, 130), (1001,), (50, 50), (9, 11), (24, 256), (2, 8, 128)]
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, min_quantized_numel=100)


@pytest.fixture
def interpreter(monkeypatch):
    """Counts the (interpreted) kernel launches, by kernel."""
    assert _triton.interpreted()
    calls: dict[str, int] = {}
    original = _triton._launch

    def counted(kernel, grid, *args, **kwargs):
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        calls[name] = calls.get(name, 0) + 1
        return original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_triton, "_launch", counted)
    return calls


def _grads(gen, dtype):
    out = []
    for s in SHAPES:
        g = outlier_grad(s, gen)
        g[0] *= 1e-20  # second moments (and their scales) of subnormal size
        out.append(g.to(dtype))
    return out


def _run(backend, steps=3, dtype=torch.float32, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = AdamW4bit(params, backend=backend, **{**HP, **kw})
    for _ in range(steps):
        for p, g in zip(params, _grads(gen, dtype), strict=True):
            p.grad = g
        opt.step()
    return params, opt


def _assert_identical(ref, ref_opt, got, got_opt):
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a.detach(), b.detach()), a.shape
        sa, sb = ref_opt.state[a], got_opt.state[b]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if torch.is_tensor(value):
                assert sb[key].dtype == value.dtype, key
                assert torch.equal(sb[key], value), (key, a.shape)
            else:
                assert sb[key] == value, key


@pytest.mark.parametrize("second_moment,block_size,scale_dtype", [
    ("rank1", 128, "float32"), ("block", 128, "float32"), ("factor", 128, "float32"),
    ("rank1", 32, "float32"), ("rank1", 128, "bfloat16"), ("block", 128, "bfloat16"),
])
def test_interpreted_kernels_equal_the_cpp_kernel(interpreter, second_moment, block_size, scale_dtype):
    ref, ref_opt = _run("cpp", second_moment=second_moment, block_size=block_size,
                        scale_dtype=scale_dtype)
    got, got_opt = _run("triton", second_moment=second_moment, block_size=block_size,
                        scale_dtype=scale_dtype)
    _assert_identical(ref, ref_opt, got, got_opt)
    # Launches per step do not grow with the number of tensors: pass 2 once per layout,
    # alignment (sizes a multiple of 32 take the 16-byte vector path) and whether rows are a
    # multiple of the block, pass 1 once per alignment for the rank-1 maxima and for the
    # other gradients' check.
    layout = {p: got_opt.layout(p, got_opt.param_groups[0]) for p in got}
    step_groups = {(layout[p], p.numel() % 32 == 0,
                    layout[p] in ("rank1", "factor") and p.shape[-1] % block_size == 0) for p in got}
    rank1_groups = {p.shape[-1] % 32 == 0 for p in got if layout[p] == "rank1"}
    flat_groups = {p.numel() % 32 == 0 for p in got if layout[p] in ("block", "fp32")}
    assert len(step_groups) < len(got) == len(SHAPES)
    assert interpreter["step_kernel"] == 3 * len(step_groups)
    assert interpreter.get("rank1_stats_kernel", 0) == 3 * len(rank1_groups)
    assert interpreter["nonfinite_kernel"] == 3 * len(flat_groups)


def _bf16_candidates(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 -> bfloat16 rounded to nearest even, and truncated (the interpreter's cast)."""
    truncated = (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return x.to(torch.bfloat16), truncated


@pytest.mark.parametrize("second_moment", ["rank1", "block", "factor"])
def test_interpreted_kernels_on_bfloat16_params(interpreter, second_moment):
    """bf16 params: the update is computed in float32 and rounded once, the states as in float32.

    Each step starts the float32 C++ reference from the bf16 parameters; the kernel's result
    must be that float32 result rounded to bf16 (the compiled kernel rounds to nearest even;
    the interpreter casts by truncation, so either neighbour is accepted), and every code and
    scale must equal the reference's exactly (the moments do not depend on the parameters).
    """
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.float()) for t in init]
    opt = AdamW4bit(params, backend="triton", second_moment=second_moment, **HP)
    ref_opt = AdamW4bit(ref, backend="cpp", second_moment=second_moment, **HP)
    for _ in range(3):
        for p, r, g in zip(params, ref, _grads(gen, torch.bfloat16), strict=True):
            p.grad, r.grad = g, g.float()
            with torch.no_grad():
                r.copy_(p.float())
        opt.step()
        ref_opt.step()
        for p, r in zip(params, ref, strict=True):
            assert p.dtype == torch.bfloat16
            if p.numel() <= HP["min_quantized_numel"]:
                continue
            nearest, truncated = _bf16_candidates(r.detach())
            assert ((p == nearest) | (p == truncated)).all(), p.shape
            for key, value in ref_opt.state[r].items():
                if torch.is_tensor(value):
                    assert torch.equal(opt.state[p][key], value), (key, p.shape)
    assert interpreter["step_kernel"] > 0


def test_interpreted_non_finite_gradient_changes_nothing(interpreter):
    params, opt = _run("triton", steps=1)
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
              for p in params]
    gen = torch.Generator().manual_seed(1)
    for p, g in zip(params, _grads(gen, torch.float32), strict=True):
        p.grad = g
    params[0].grad[3, 3] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    for p, b, st in zip(params, before, states, strict=True):
        assert torch.equal(p.detach(), b)
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())
        assert opt.state[p]["step"] == 1


def test_a_kept_plan_follows_the_cpp_kernel(interpreter, monkeypatch):
    """Gradients written in place keep every address: the plan is built at the first step and
    again at the second (the moments are no longer fresh), then reused; a learning rate that
    changes every step (a scheduler) still reaches the kernels."""
    builds = count_plan_builds(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    runs = []
    for backend in ("cpp", "triton"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = AdamW4bit(params, backend=backend, **HP)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
        grads = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p, g in zip(params, _grads(grads, torch.float32), strict=True):
                p.grad.copy_(g)
            opt.step()
            sched.step()
        runs.append((params, opt))
    _assert_identical(*runs[0], *runs[1])
    assert len(builds) == 2


def test_a_first_step_with_a_non_finite_gradient_leaves_no_state(interpreter):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    before = [p.detach().clone() for p in params]
    opt = AdamW4bit(params, backend="triton", **HP)
    for p, g in zip(params, _grads(gen, torch.float32), strict=True):
        p.grad = g
    params[3].grad[7] = float("nan")  # the 1-D tensor: block-wise second moment
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))
    assert len(opt.state) == 0
    params[3].grad[7] = 0.0
    opt.step()  # and the next step starts from zero moments, as a first step should
    ref = [torch.nn.Parameter(b.clone()) for b in before]
    for r, p in zip(ref, params, strict=True):
        r.grad = p.grad.clone()
    ref_opt = AdamW4bit(ref, backend="cpp", **HP)
    ref_opt.step()
    _assert_identical(ref, ref_opt, params, opt)


def test_groups_and_missing_gradients_follow_the_cpp_kernel(interpreter):
    """Two parameter groups with their own hyperparameters (rows of the constants table), and
    a tensor without a gradient at every other step (its step count falls behind: the plan
    changes with the set of tensors, and the constants differ per tensor)."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    runs = []
    for backend in ("cpp", "triton"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [{"params": params[:3]},
                  {"params": params[3:], "lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.0,
                   "eps": 1e-6}]
        opt = AdamW4bit(groups, backend=backend, **HP)
        grads = torch.Generator().manual_seed(4)
        for step in range(4):
            for k, (p, g) in enumerate(zip(params, _grads(grads, torch.float32), strict=True)):
                p.grad = None if (k == 1 and step % 2 == 1) else g
            opt.step()
        runs.append((params, opt))
    _assert_identical(*runs[0], *runs[1])
    assert runs[1][1].state[runs[1][0][1]]["step"] == 2
