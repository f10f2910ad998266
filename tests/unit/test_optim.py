"""AdamW4bit against an independent float64 reference, its two CPU paths against each other,
state round trips, and bad input."""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plasticity.optim import AdamW4bit, optimizer_state_bytes
from tests.unit.optim_inputs import outlier_grad

# The paper's maps, written out again here (not imported) for an independent reference.
SIGNED = np.array([-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0.0,
                   0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0])
UNSIGNED = (np.arange(16) + 1) / 16.0
ROOT = Path(__file__).resolve().parents[2]
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
SHAPES = [(300, 257), (64, 96), (6, 7, 130), (5001,), (3, 4, 5, 67), (40, 50)]


def _unpack(packed: torch.Tensor, n: int) -> np.ndarray:
    b = packed.numpy().astype(np.int64)
    return np.stack([b & 15, b >> 4], axis=1).reshape(-1)[:n]


def _nearest(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    return np.abs(x[:, None] - table[None, :]).argmin(axis=1)  # ties: the lower value


def _boundary_distance(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    mids = (table[1:] + table[:-1]) / 2
    return np.abs(x[:, None] - mids[None, :]).min(axis=1)


def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    n = x.size
    nb = -(-n // block)
    return np.pad(x.reshape(-1), (0, nb * block - n)).reshape(nb, block)


def _rank1_scale(v: np.ndarray) -> np.ndarray:
    """min over dimensions of each dimension's max vector, broadcast to v's shape."""
    s = np.full(v.shape, np.inf)
    maxes = []
    for k in range(v.ndim):
        others = tuple(d for d in range(v.ndim) if d != k)
        mk = v.max(axis=others)
        maxes.append(mk)
        shape = [1] * v.ndim
        shape[k] = v.shape[k]
        s = np.minimum(s, mk.reshape(shape))
    return s, maxes


def _kind(shape, second_moment, min_numel=100):
    if math.prod(shape) <= min_numel:
        return "fp32"
    if len(shape) < 2 and second_moment != "block":
        return "block"
    return second_moment


def _decode(st: dict, shape, kind: str, block: int = 128):
    """(m, v, extra) in float64 from an optimizer state, decoded independently."""
    n = math.prod(shape)
    if st.get("step", 0) == 0:
        z = np.zeros(shape)
        if kind == "factor":
            return z, z, (np.zeros(shape[:-1]), np.zeros((*shape[:-2], shape[-1])))
        return z, z, None
    if kind == "fp32":
        return st["exp_avg"].double().numpy(), st["exp_avg_sq"].double().numpy(), None
    ms = np.repeat(st["exp_avg_scale"].double().numpy(), block)[:n]
    m = (SIGNED[_unpack(st["exp_avg_codes"], n)] * ms).reshape(shape)
    if kind == "factor":
        r, c = st["exp_avg_sq_row"].double().numpy(), st["exp_avg_sq_col"].double().numpy()
        return m, None, (r, c)
    codes = UNSIGNED[_unpack(st["exp_avg_sq_codes"], n)]
    if kind == "rank1":
        s = np.full(shape, np.inf)
        for k in range(len(shape)):
            view = [1] * len(shape)
            view[k] = shape[k]
            s = np.minimum(s, st[f"exp_avg_sq_max{k}"].double().numpy().reshape(view))
        v = codes.reshape(shape) * s
    else:
        v = (codes * np.repeat(st["exp_avg_sq_scale"].double().numpy(), block)[:n]).reshape(shape)
    return m, v, None


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16 (ties to even), from float32 bits."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def _reference_step(p, g, st, kind, t, block=128, bf16_scales=False, **hp):
    """One step in float64 from the optimizer's own (decoded) state before the step; with
    `bf16_scales`, block scales rounded to bfloat16 (of their float32 value) first."""
    rnd = _bf16 if bf16_scales else (lambda x: x)
    lr, (b1, b2), eps, wd = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
    shape = tuple(p.shape)
    p, g = p.double().numpy(), g.double().numpy()
    m_old, v_old, extra = _decode(st, shape, kind, block)
    p = p * (1 - lr * wd)
    m = b1 * m_old + (1 - b1) * g
    out = {}
    if kind == "factor":
        r_old, c_old = extra
        g2 = (g * g).reshape(-1, shape[-2], shape[-1])
        r = b2 * r_old.reshape(g2.shape[0], -1) + (1 - b2) * g2.mean(axis=2)
        c = b2 * c_old.reshape(g2.shape[0], -1) + (1 - b2) * g2.mean(axis=1)
        v = ((r / r.mean(axis=1, keepdims=True))[:, :, None] * c[:, None, :]).reshape(shape)
        out["exp_avg_sq_row"], out["exp_avg_sq_col"] = r.reshape(shape[:-1]), c.reshape(*shape[:-2], shape[-1])
    else:
        v = b2 * v_old + (1 - b2) * g * g
    p = p - lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
    out["p"], out["m"], out["v"] = p, m, v
    if kind != "fp32":
        mb = _blocks(m, block)
        scale = rnd(np.maximum(np.abs(mb).max(axis=1), 1e-12))
        out["exp_avg_scale"] = scale
        out["m_x"] = (mb / scale[:, None]).reshape(-1)[: m.size]
        if kind == "rank1":
            s, maxes = _rank1_scale(v)
            for k, mk in enumerate(maxes):
                out[f"exp_avg_sq_max{k}"] = mk
            out["v_x"] = np.where(s > 0, v / np.where(s > 0, s, 1), 0).reshape(-1)
        elif kind == "block":
            vb = _blocks(v, block)
            vs = rnd(vb.max(axis=1))
            out["exp_avg_sq_scale"] = vs
            out["v_x"] = np.where(vs[:, None] > 0, vb / np.where(vs > 0, vs, 1)[:, None], 0).reshape(-1)[: v.size]
    return out


def _check_against_reference(p, st, ref, kind, tag):
    got = p.detach().double().numpy()
    np.testing.assert_allclose(got, ref["p"], rtol=2e-6, atol=1e-5 * HP["lr"], err_msg=tag)
    if kind == "fp32":
        np.testing.assert_allclose(st["exp_avg"].numpy(), ref["m"], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(st["exp_avg_sq"].numpy(), ref["v"], rtol=1e-5, atol=1e-18)
        return
    assert st["exp_avg_codes"].dtype == torch.uint8
    n = p.numel()
    np.testing.assert_allclose(st["exp_avg_scale"].double().numpy(), ref["exp_avg_scale"], rtol=1e-6,
                               err_msg=tag)
    codes = _unpack(st["exp_avg_codes"], n)
    want = _nearest(ref["m_x"], SIGNED)
    near = _boundary_distance(ref["m_x"], SIGNED) < 1e-5
    assert ((codes == want) | near).all(), f"{tag}: first-moment codes differ away from a boundary"
    assert (codes == want).mean() > 0.999
    if kind == "factor":
        for key in ("exp_avg_sq_row", "exp_avg_sq_col"):
            np.testing.assert_allclose(st[key].numpy(), ref[key], rtol=1e-5, err_msg=f"{tag} {key}")
        return
    for key in [k for k in ref if k.startswith("exp_avg_sq_max") or k == "exp_avg_sq_scale"]:
        np.testing.assert_allclose(st[key].double().numpy(), ref[key], rtol=1e-5, err_msg=f"{tag} {key}")
    vcodes = _unpack(st["exp_avg_sq_codes"], n)
    want = _nearest(ref["v_x"], UNSIGNED)
    near = _boundary_distance(ref["v_x"], UNSIGNED) < 1e-5
    assert ((vcodes == want) | near).all(), f"{tag}: second-moment codes differ away from a boundary"
    # The dequantized states are the maps' values times the scales.
    m_deq, v_deq, _ = _decode(st, tuple(p.shape), kind)
    m_scale = np.repeat(ref["exp_avg_scale"], 128)[:n].reshape(p.shape)
    assert np.abs(m_deq - ref["m"]).max() <= (m_scale * 0.2251).max()  # widest half-gap of the map


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("second_moment", ["rank1", "block", "factor"])
def test_steps_match_a_float64_reference(second_moment, backend, scale_dtype):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = AdamW4bit(params, second_moment=second_moment, min_quantized_numel=100,
                    backend=backend, scale_dtype=scale_dtype, **HP)
    for t in range(1, 4):
        refs = []
        for p in params:
            p.grad = outlier_grad(tuple(p.shape), gen)
            kind = _kind(tuple(p.shape), second_moment)
            st = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
            refs.append((kind, _reference_step(p.detach(), p.grad, st, kind, t,
                                               bf16_scales=scale_dtype == "bfloat16", **HP)))
        opt.step()
        for p, (kind, ref) in zip(params, refs, strict=True):
            _check_against_reference(p, opt.state[p], ref, kind, f"{second_moment} {tuple(p.shape)} t={t}")
            assert opt.state[p]["step"] == t


def test_small_tensors_and_unquantized_groups_keep_fp32_states():
    big, small, flagged = (torch.nn.Parameter(torch.randn(80, 80)) for _ in range(3))
    small = torch.nn.Parameter(torch.randn(64))
    opt = AdamW4bit([{"params": [big, small]}, {"params": [flagged], "quantize": False}],
                    min_quantized_numel=4096, lr=1e-3)
    for p in (big, small, flagged):
        p.grad = torch.randn_like(p)
    opt.step()
    assert set(opt.state[big]) >= {"exp_avg_codes", "exp_avg_sq_codes"}  # 6400 > 4096
    for p in (small, flagged):
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_avg"].shape == p.shape


def test_first_step_starts_from_exact_zeros():
    """With zero initial moments the first update is lr * g / (|g| + eps) (plus decay)."""
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(256, 64, generator=gen))
    p0 = p.detach().double().clone()
    g = torch.randn(256, 64, generator=gen) * 1e-3
    g[0, :5] = 0.0
    p.grad = g
    AdamW4bit([p], lr=1e-3, eps=1e-8, weight_decay=0.0).step()
    want = p0 - 1e-3 * g.double() / (g.double().abs() + 1e-8)
    torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-6)
    # A zero gradient leaves its entry alone (a dequantized zero state would not).
    assert torch.equal(p.detach()[0, :5], p0[0, :5].float())


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [64, 128])
def test_cpp_and_pytorch_paths_give_identical_bits(block_size, scale_dtype):
    _check_identical_bits(block_size, scale_dtype)


def _check_identical_bits(block_size, scale_dtype="float32"):
    from plasticity.optim import _cpu

    assert _cpu.available(), "the C++ kernel did not build"
    # Rows that are multiples of 16 (the kernel's vector path), rows that are not, blocks
    # that straddle rows, odd sizes, tensors of three or four dimensions and tensors small
    # enough to keep fp32 moments.
    shapes = SHAPES + [(7, 9, 11), (129,), (33, 1000), (24, 512), (3, 16, 64), (4096,), (5, 7), (33,),
                       (16, 256)]
    for sm in ("rank1", "block", "factor"):
        runs = []
        for backend in ("cpp", "torch"):
            gen = torch.Generator().manual_seed(5)
            ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
            opt = AdamW4bit(ps, second_moment=sm, min_quantized_numel=64, backend=backend,
                            block_size=block_size, scale_dtype=scale_dtype, **HP)
            for _ in range(4):
                for i, p in enumerate(ps):
                    g = outlier_grad(tuple(p.shape), gen)
                    if g.dim() >= 2 and g.shape[0] > 2 and i % 2 == 0:
                        # Second moments of subnormal size (their scales too) and of zero
                        # (in every other tensor: the others keep scales that the kernel
                        # divides by 16 exactly, and dequantizes without a table).
                        g[0] *= 1e-20
                        g[1] = 0.0
                    p.grad = g
                opt.step()
            runs.append((ps, opt))
        (pa, oa), (pb, ob) = runs
        for a, b in zip(pa, pb, strict=True):
            assert torch.equal(a, b), (sm, a.shape)
            for key, value in oa.state[a].items():
                other = ob.state[b][key]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (sm, key)


def test_tiny_old_scales_dequantize_alike_in_both_paths():
    """Where every old second-moment scale s has an exact s / 16 (0, or at least 2^-122)
    the kernel dequantizes without a table; below that it must not. Old scales set to
    2^-122 itself, to values just below it (full mantissas, whose sixteenths round), to
    subnormals and zeros: the next step equals the PyTorch path's bit for bit."""
    from plasticity.optim import _cpu

    assert _cpu.available(), "the C++ kernel did not build"
    edge = 2.0 ** -122
    below = torch.tensor([edge * (1 - 2.0 ** -24) * f for f in (1.0, 0.93, 0.71, 0.52, 0.37)])
    variants = {
        "at 2^-122": lambda n, gen: torch.where(torch.rand(n, generator=gen) < 0.5, edge, 1e-3),
        "just below": lambda n, gen: below[torch.randint(0, len(below), (n,), generator=gen)],
        "subnormal and zero": lambda n, gen: torch.where(torch.rand(n, generator=gen) < 0.5, 1e-40, 0.0),
    }
    for sm in ("rank1", "block"):
        for name, make in variants.items():
            runs = []
            for backend in ("cpp", "torch"):
                gen = torch.Generator().manual_seed(11)
                ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(24, 512), (16, 256)]]
                opt = AdamW4bit(ps, second_moment=sm, min_quantized_numel=64, backend=backend, **HP)
                for step in range(3):
                    for p in ps:
                        p.grad = outlier_grad(tuple(p.shape), gen) * 1e-18
                    if step == 2:  # the old scales the last step dequantizes with
                        for p in ps:
                            st = opt.state[p]
                            if sm == "rank1":
                                rows = st["exp_avg_sq_max0"]
                                rows.copy_(make(rows.numel(), gen).to(rows.dtype))
                            else:
                                sc = st["exp_avg_sq_scale"]
                                sc.copy_(make(sc.numel(), gen).to(sc.dtype))
                    opt.step()
                runs.append((ps, opt))
            (pa, oa), (pb, ob) = runs
            for a, b in zip(pa, pb, strict=True):
                assert torch.equal(a, b), (sm, name, a.shape)
                for key, value in oa.state[a].items():
                    other = ob.state[b][key]
                    same = torch.equal(value, other) if torch.is_tensor(value) else value == other
                    assert same, (sm, name, key)


def test_kernel_quantizers_match_the_pytorch_path_on_every_boundary():
    _check_quantizers()


def _check_quantizers():
    """The kernel's quantizers (its vector code where the CPU has it, the scalar loop for
    a ragged tail) give the PyTorch path's codes on each decision boundary, one float
    either side of it, signed zeros, the ends of the range, subnormals and random values."""
    from plasticity.optim import _cpu, quant

    mod = _cpu.load()
    assert mod is not None, "the C++ kernel did not build"
    gen = torch.Generator().manual_seed(11)
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))

    def around(points: torch.Tensor) -> torch.Tensor:
        return torch.cat([points, torch.nextafter(points, up), torch.nextafter(points, down)])

    sub = torch.tensor([1e-45, 1e-40, 1.1754942e-38, 1.1754944e-38, 1e-30])
    signed = torch.cat([around(quant.SIGNED_MIDS), around(quant.SIGNED_MAP), sub, -sub,
                        torch.tensor([0.0, -0.0, 1.0, -1.0]),
                        torch.rand(500, generator=gen) * 2 - 1,
                        (torch.rand(200, generator=gen) * 2 - 1) * 1e-2])
    mids_u = torch.tensor([(k + 0.5) / 16 for k in range(16)], dtype=torch.float32)
    linear = torch.cat([around(mids_u), around(quant.UNSIGNED_MAP)[:-1], sub,
                        torch.tensor([0.0, 1.0]), torch.rand(500, generator=gen)])
    linear = linear[(linear >= 0) & (linear <= 1)]
    for x, is_signed, ref in ((signed, True, quant.quantize_signed),
                              (linear, False, quant.quantize_unsigned)):
        for n in (x.numel(), x.numel() - 7):  # a ragged tail, or none, for the scalar loop
            for perm in (torch.arange(n), torch.randperm(n, generator=gen)):
                xs = x[:n][perm].contiguous()
                got = mod.quantize_codes(xs, is_signed)
                assert got.dtype == torch.uint8
                bad = (got.long() != ref(xs)).nonzero().flatten()
                assert bad.numel() == 0, (is_signed, xs[bad[:8]].tolist(), got[bad[:8]].tolist())
    # NaN gets code 0 from the signed quantizer in every lane and in the scalar loop.
    x = signed[:37].clone()
    x[::3] = float("nan")
    x[1::5] = -float("nan")
    got = mod.quantize_codes(x, True)
    nan = torch.isnan(x)
    assert torch.all(got[nan] == 0)
    assert torch.equal(got[~nan].long(), quant.quantize_signed(x[~nan]))


def test_factor_statistics_in_chunks_match_float64():
    """`factor`'s row and column means of g^2, formed a chunk at a time in a small buffer
    (whole batches per chunk, or rows of one batch, or one row), equal float64 means."""
    from plasticity.optim._numerics import _mean_squares

    gen = torch.Generator().manual_seed(3)
    for shape in [(5, 7, 9), (2, 50, 33), (1, 300, 17), (40, 3, 3)]:
        g3 = torch.randn(shape, generator=gen) * torch.rand(shape[-1], generator=gen)
        ref_r = (g3.double() ** 2).mean(-1)
        ref_c = (g3.double() ** 2).mean(-2)
        for cap in [16, 64, 200, 10**6, None]:
            scratch = torch.full((cap,), float("nan")) if cap else None
            r, c = _mean_squares(g3, scratch)
            assert r.shape == ref_r.shape and c.shape == ref_c.shape
            torch.testing.assert_close(r.double(), ref_r, rtol=1e-5, atol=0)
            torch.testing.assert_close(c.double(), ref_c, rtol=1e-5, atol=0)


def test_factor_statistics_of_the_kernel_equal_the_pytorch_path():
    _check_factor_statistics()


def _check_factor_statistics():
    """The C++ kernel's row and column sums of g^2 (`factor_stats`) equal the PyTorch
    path's pairwise sums bit for bit: odd and power-of-two lengths, one row or column,
    batches, rows split among threads, the PyTorch path in chunks (of whole batches, of
    rows, of one row, a row longer than its buffer), gradients with outliers, subnormal
    squares and zeros. A plain sum in another order differs in these bits."""
    from plasticity.optim import _cpu
    from plasticity.optim._numerics import _mean_squares

    mod = _cpu.load()
    assert mod is not None, "the C++ kernel did not build"
    gen = torch.Generator().manual_seed(4)
    differs = 0
    for shape in [(1, 1, 1), (1, 1, 9), (1, 7, 1), (3, 7, 13), (1, 33, 1000), (2, 100, 33),
                  (4, 17, 64), (1, 1024, 48), (1, 513, 40)]:
        g3 = torch.randn(shape, generator=gen) * torch.rand(shape[-1], generator=gen)
        flat = g3.view(-1)
        flat[::97] *= 1e12
        flat[::89] *= 1e-22
        flat[::53] = 0.0
        rs, cs = mod.factor_stats(g3.contiguous(), shape[1], shape[2])
        for cap in [16, 64, 1000, 10**6]:
            r, c = _mean_squares(g3, torch.full((cap,), float("nan")))
            assert torch.equal(r, rs / shape[2]) and torch.equal(c, cs / shape[1]), (shape, cap)
        plain = (g3 * g3).sum(-2)
        differs += int(not torch.equal(plain, cs))
    assert differs > 0  # (the bits above are the order's, not any sum's)


def test_the_many_tensor_kernel_calls_check_their_argument_lists():
    """A step makes one kernel call per pass, with a list per argument: lists of different
    lengths are an error naming the function, raised before any tensor is written."""
    from plasticity.optim import _cpu

    mod = _cpu.load()
    assert mod is not None, "the C++ kernel did not build"
    g = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="rank1_stats_many: argument lists differ"):
        mod.rank1_stats_many([g], [], [torch.zeros(4)], [torch.zeros(16)], [16], [True], [0.999])
    p = torch.randn(4, 16)
    before = p.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="fp32_step_many: argument lists differ"):
        mod.fp32_step_many([p, p], [g, g], [m, m], [v, v], [1.0] * 2, [0.9] * 2, [0.999] * 2,
                           [1.0] * 2, [1e-8] * 2, [1e-3])
    assert torch.equal(p, before) and not m.any()
    mod.fp32_step_many([p], [g], [m], [v], [1.0], [0.9], [0.999], [1.0], [1e-8], [1e-3])
    assert not torch.equal(p, before) and m.any()


@pytest.mark.parametrize("flag", ["-mno-avx512f", "-mno-avx512vbmi", "-mno-avx2"])
def test_the_portable_kernel_loops_give_the_same_bits_too(flag):
    """The kernel built without AVX-512 (its scalar and AVX2 loops, what CPUs without
    AVX-512 run), with AVX-512 but without VBMI (nibbles unpacked by shifts), or without
    AVX2 (the scalar loops alone), also equals the PyTorch path bit for bit. Built in a
    subprocess, since the compiler flags are read at import."""
    script = (
        "import sys; sys.path.insert(0, 'tests/unit'); import test_optim as t; "
        "from plasticity.optim import _cpu; "
        f"assert '{flag}' in _cpu.CFLAGS; "
        "t._check_quantizers(); t._check_factor_statistics(); t._check_identical_bits(128); "
        "t._check_identical_bits(64); "
        "t._check_identical_bits(128, 'bfloat16'); print('ok')"
    )
    env = dict(os.environ, PLASTICITY_KERNEL_FLAGS=flag)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_the_kernel_builds_into_plasticity_cache(monkeypatch, tmp_path):
    from plasticity.optim import _cpu

    monkeypatch.setenv("PLASTICITY_CACHE", str(tmp_path))
    assert _cpu.cache_dir() == tmp_path / "optim-kernels"
    monkeypatch.delenv("PLASTICITY_CACHE")
    assert str(_cpu.cache_dir()).endswith(".cache/plasticity/optim-kernels")


def _trained(second_moment="rank1", dtype=torch.float32, steps=3, seed=0, scale_dtype="float32"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.GELU(), torch.nn.Linear(80, 5))
    model = model.to(dtype)
    opt = AdamW4bit(model.parameters(), lr=1e-2, second_moment=second_moment, min_quantized_numel=128,
                    scale_dtype=scale_dtype)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    data = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)).to(dtype)

    def closure():
        opt.zero_grad()
        loss = model(data).float().pow(2).mean()
        loss.backward()
        return loss

    def run(n):
        losses = []
        for _ in range(n):
            losses.append(float(opt.step(closure).detach()))
            sched.step()
        return losses

    losses = run(steps)
    return model, opt, sched, run, losses


@pytest.mark.parametrize(("second_moment", "scale_dtype"), [
    ("rank1", "float32"), ("block", "float32"), ("factor", "float32"), ("rank1", "bfloat16"),
    ("block", "bfloat16")])
def test_save_load_continue_is_bit_identical(second_moment, scale_dtype, tmp_path):
    model, opt, sched, run, losses = _trained(second_moment, scale_dtype=scale_dtype)
    assert losses[-1] < losses[0]
    path = tmp_path / "opt.pt"
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(),
                "model": model.state_dict()}, path)
    run(3)
    want = [p.detach().clone() for p in model.parameters()]

    model2, opt2, sched2, run2, _ = _trained(second_moment, steps=0, scale_dtype=scale_dtype)
    saved = torch.load(path, weights_only=True)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for p in model2.parameters():
        for key, value in opt2.state[p].items():
            if key.endswith("codes"):
                assert value.dtype == torch.uint8
            if key.endswith("_scale"):
                assert value.dtype == getattr(torch, scale_dtype)
    run2(3)
    for a, b in zip(want, model2.parameters(), strict=True):
        assert torch.equal(a, b.detach())


def test_a_deep_copy_keeps_its_settings_and_steps_alike():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 96, generator=gen)),
              torch.nn.Parameter(torch.randn(50, generator=gen))]
    opt = AdamW4bit(params, min_quantized_numel=100, backend="torch", nonfinite="skip")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    twin = copy.deepcopy({"params": params, "opt": opt})
    assert (twin["opt"].backend, twin["opt"].nonfinite) == ("torch", "skip")
    for a, b in zip(params, twin["params"], strict=True):
        a.grad = torch.randn(a.shape, generator=gen)
        b.grad = a.grad.clone()
    opt.step()
    twin["opt"].step()
    for a, b in zip(params, twin["params"], strict=True):
        assert torch.equal(a, b)


def test_load_keeps_uint8_codes_and_fp32_scales_for_bf16_params():
    model, opt, _, _, _ = _trained(dtype=torch.bfloat16)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2, opt2, _, _, _ = _trained(dtype=torch.bfloat16, steps=0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        for key, value in opt.state[p].items():
            other = opt2.state[q][key]
            if torch.is_tensor(value):
                assert other.dtype == value.dtype and torch.equal(other, value), key
                assert value.dtype in (torch.uint8, torch.float32)


def test_safetensors_checkpoint_round_trip(tmp_path):
    import copy

    from plasticity.train.checkpoint import optimizer_from_safetensors, optimizer_to_safetensors

    model, opt, sched, run, _ = _trained()
    optimizer_to_safetensors(opt, tmp_path / "optimizer.safetensors")
    model_state, sched_state = copy.deepcopy(model.state_dict()), sched.state_dict()
    run(2)
    want = [p.detach().clone() for p in model.parameters()]
    model2, opt2, sched2, run2, _ = _trained(steps=0)
    model2.load_state_dict(model_state)
    optimizer_from_safetensors(opt2, tmp_path / "optimizer.safetensors")
    sched2.load_state_dict(sched_state)
    for p in model2.parameters():
        for key, value in opt2.state[p].items():
            if key.endswith("codes"):
                assert value.dtype == torch.uint8
    run2(2)
    for a, b in zip(want, model2.parameters(), strict=True):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize(("scale_dtype", "sb"), [("float32", 4), ("bfloat16", 2)])
def test_state_bytes_count_codes_scales_and_small_states(scale_dtype, sb):
    shapes = [(1000, 300), (513, 129), (4096,), (77,), (5000,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for sm in ("rank1", "block", "factor"):
        opt = AdamW4bit(params, second_moment=sm, min_quantized_numel=4096, scale_dtype=scale_dtype)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        want = 0
        for s in shapes:
            n = math.prod(s)
            if n <= 4096:
                want += 8 * n
                continue
            first = (n + 1) // 2 + sb * -(-n // 128)
            if len(s) == 1 or sm == "block":
                second = (n + 1) // 2 + sb * -(-n // 128)
            elif sm == "rank1":
                second = (n + 1) // 2 + 4 * sum(s)
            else:
                second = 4 * (s[0] + s[1])
            want += first + second
        assert opt.optimizer_state_bytes() == want == optimizer_state_bytes(opt), sm


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -1e-3}, "lr"),
        ({"eps": -1.0}, "eps"),
        ({"betas": (1.0, 0.999)}, "betas[0]"),
        ({"betas": (0.9, -0.1)}, "betas[1]"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"second_moment": "rank2"}, "second_moment"),
        ({"block_size": 127}, "block_size"),
        ({"min_quantized_numel": -1}, "min_quantized_numel"),
        ({"scale_dtype": "float16"}, "scale_dtype"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        AdamW4bit([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_bad_group_values_complex_params_and_sparse_grads():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="second_moment"):
        AdamW4bit([{"params": [p], "second_moment": "nope"}])
    with pytest.raises(ValueError, match="params"):
        AdamW4bit([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="grad"):
        AdamW4bit(emb.parameters()).step()


@pytest.mark.parametrize("bad", [float("nan"), float("-nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("second_moment", ["rank1", "block", "factor"])
def test_a_non_finite_gradient_changes_nothing(bad, second_moment, caplog):
    model, opt, _, _, _ = _trained(second_moment)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    states = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[-2].grad[0, 0] = bad  # a later tensor: earlier ones must not have moved either
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    opt.nonfinite = "skip"
    with caplog.at_level(logging.WARNING):
        opt.step()
    assert "non-finite gradient" in caplog.text and opt.skipped_steps == 2
    for p, b, st in zip(params, before, states, strict=True):
        assert torch.equal(p.detach(), b)
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v


def test_it_trains_like_fp32_adamw_on_a_small_regression():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen)
    w_true = torch.randn(64, 128, generator=gen)
    y = x @ w_true + 0.1 * torch.randn(512, 128, generator=gen)
    finals = {}
    for name in ("adamw", "rank1", "block", "factor"):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 128)
        if name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
        else:
            opt = AdamW4bit(model.parameters(), lr=3e-2, weight_decay=0.0, second_moment=name,
                            min_quantized_numel=1000)
        for _ in range(150):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        finals[name] = loss.item()
    assert finals["adamw"] < 0.5
    # Every variant converges; the factored second moment (no 4-bit v) tracks fp32 AdamW,
    # the 4-bit v ones lag on this full-batch problem (small v entries round up to s/16, so
    # their steps are smaller while the gradients shrink).
    initial = torch.nn.functional.mse_loss(torch.zeros_like(y), y).item()
    for name in ("rank1", "block", "factor"):
        assert finals[name] < 0.05 * initial, finals
    assert finals["factor"] < 1.5 * finals["adamw"], finals


def test_a_reloaded_optimizer_writes_the_same_checkpoint_metadata(tmp_path):
    """The resume test compares optimizer.safetensors metadata of a resumed and an
    uninterrupted run: the order in which a load fills the state must not show."""
    from safetensors import safe_open

    from plasticity.train.checkpoint import optimizer_from_safetensors, optimizer_to_safetensors

    model, opt, _, _, _ = _trained()
    optimizer_to_safetensors(opt, tmp_path / "a.safetensors")
    model2, opt2, _, _, _ = _trained(steps=0)
    optimizer_from_safetensors(opt2, tmp_path / "a.safetensors")
    optimizer_to_safetensors(opt2, tmp_path / "b.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as a, safe_open(str(tmp_path / "b.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
