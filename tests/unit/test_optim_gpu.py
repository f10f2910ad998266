"""The Triton path of AdamW4bit against the CPU path (marked gpu; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from plasticity.optim import AdamW4bit
from tests.unit.optim_inputs import outlier_grad

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SHAPES = [(300, 257), (1024, 768), (6, 7, 130), (5001,), (4096, 64), (50, 50)]
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, min_quantized_numel=100)


def _grads(gen):
    return [outlier_grad(s, gen) for s in SHAPES]


def _run(device, backend, second_moment, dtype=torch.float32, steps=3, scale_dtype="float32"):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
              for s in SHAPES]
    opt = AdamW4bit(params, second_moment=second_moment, backend=backend, scale_dtype=scale_dtype,
                    **HP)
    for _ in range(steps):
        for p, g in zip(params, _grads(gen), strict=True):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("second_moment", ["rank1", "block", "factor"])
def test_triton_matches_the_cpu_kernel(second_moment):
    from plasticity.optim import _triton

    assert _triton.available()
    cpu_p, cpu_o = _run("cpu", "auto", second_moment)
    gpu_p, gpu_o = _run("cuda", "triton", second_moment)
    for a, b in zip(cpu_p, gpu_p, strict=True):
        bc = b.detach().cpu()
        torch.testing.assert_close(bc, a.detach(), rtol=1e-5, atol=1e-5 * HP["lr"])
        sa, sb = cpu_o.state[a], gpu_o.state[b]
        assert sa.keys() == sb.keys() and sa["step"] == sb["step"] == 3
        for key, value in sa.items():
            if not torch.is_tensor(value):
                continue
            other = sb[key].cpu()
            assert other.dtype == value.dtype, key
            if value.dtype == torch.uint8:
                lo = lambda t: torch.stack([t & 15, t >> 4])  # noqa: E731
                agree = (lo(value) == lo(other)).float().mean().item()
                assert agree > 0.999, (key, a.shape, agree)
            else:
                torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-12)
        ma, va = cpu_o.dequantized_state(a)
        mb, vb = gpu_o.dequantized_state(b)
        scale = ma.abs().max().item()
        assert (mb.cpu() - ma).abs().max().item() <= 0.25 * scale
        assert (vb.cpu() - va).abs().max().item() <= 0.1 * va.abs().max().item() + 1e-30


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("second_moment", ["rank1", "block"])
def test_triton_equals_the_cpu_path_bit_for_bit(second_moment, dtype, scale_dtype):
    """No fused multiply-adds, correctly rounded division and square root: the same bits as
    the CPU (float32: the C++ kernel; bf16: the PyTorch path, which rounds the float32 update
    once), with float32 or bfloat16 block scales. `factor` is left out: its row and column
    means of g^2 are PyTorch's reductions on CUDA, which sum in another order than the
    CPU's pairwise trees."""
    backend = "auto" if dtype == torch.float32 else "torch"
    cpu_p, cpu_o = _run("cpu", backend, second_moment, dtype=dtype, scale_dtype=scale_dtype)
    gpu_p, gpu_o = _run("cuda", "triton", second_moment, dtype=dtype, scale_dtype=scale_dtype)
    differ = {}
    for a, b in zip(cpu_p, gpu_p, strict=True):
        bc = b.detach().cpu()
        if not torch.equal(bc, a.detach()):
            differ[(tuple(a.shape), "param")] = (bc != a.detach()).sum().item()
        for key, value in cpu_o.state[a].items():
            if torch.is_tensor(value) and not torch.equal(gpu_o.state[b][key].cpu(), value):
                differ[(tuple(a.shape), key)] = (gpu_o.state[b][key].cpu() != value).sum().item()
    assert not differ, differ


@pytest.mark.parametrize("second_moment", ["rank1", "block", "factor"])
def test_bf16_params_on_cuda_follow_the_pytorch_path(second_moment):
    ref_p, _ = _run("cpu", "torch", second_moment, dtype=torch.bfloat16)
    gpu_p, gpu_o = _run("cuda", "triton", second_moment, dtype=torch.bfloat16)
    for a, b in zip(ref_p, gpu_p, strict=True):
        assert b.dtype == torch.bfloat16
        diff = (b.detach().cpu().float() - a.detach().float()).abs()
        # bf16 rounding of the parameter (2^-8 relative), occasionally one step apart.
        assert (diff <= 2 ** -7 * a.detach().float().abs() + 1e-3).float().mean().item() > 0.999
    for st in gpu_o.state.values():
        for key, value in st.items():
            if key.endswith("codes"):
                assert value.dtype == torch.uint8


def test_non_finite_gradient_on_cuda_changes_nothing():
    params, opt = _run("cuda", "auto", "rank1", steps=1)
    before = [p.detach().clone() for p in params]
    codes = [opt.state[p]["exp_avg_codes"].clone() for p in params if "exp_avg_codes" in opt.state[p]]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[3, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)
    after = [opt.state[p]["exp_avg_codes"] for p in params if "exp_avg_codes" in opt.state[p]]
    assert all(torch.equal(a, b) for a, b in zip(after, codes, strict=True))


def test_state_dict_moves_between_cpu_and_cuda():
    params, opt = _run("cpu", "auto", "rank1", steps=2)
    gpu_params = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    gpu_opt = AdamW4bit(gpu_params, second_moment="rank1", **HP)
    gpu_opt.load_state_dict(opt.state_dict())
    for p in gpu_params:
        for key, value in gpu_opt.state[p].items():
            if torch.is_tensor(value):
                assert value.is_cuda
                if key.endswith("codes"):
                    assert value.dtype == torch.uint8
