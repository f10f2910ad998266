"""The code Triton generates for AdamW4bit's kernels, read without a GPU.

The optimizer's Triton path runs here on CPU tensors with its launches recorded instead of run;
each recorded launch (the same kernels, argument types and compile-time constants a GPU step
would use) is then compiled for an H100/H200 (sm_90) and its PTX read:

- no fused multiply-adds and no approximate division, reciprocal or square root: the
  arithmetic the bit-for-bit comparison with the CPU path relies on (fp fusion is on by
  default in Triton, and `/` compiles to an approximate division);
- 16-byte vector loads in every launch the host marked ALIGNED (the kernels read the tensors'
  addresses from a table, so without the hints every access would be 4 bytes or less).

Skipped where Triton is not installed.
"""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")

from plasticity.optim import AdamW4bit, _triton  # noqa: E402

FORBIDDEN = {
    "fused multiply-add": r"\bfma\.rn(\.ftz)?(\.sat)?\.f32\b",
    "approximate division": r"\bdiv\.(full|approx)(\.ftz)?\.f32\b",
    "approximate reciprocal": r"\brcp\.approx(\.ftz)?\.f32\b",
    "approximate square root": r"\bsqrt\.approx(\.ftz)?\.f32\b",
}
# Aligned (sizes a multiple of 32) and ragged shapes, rows a multiple of the block (16, 256);
# 1-D tensors take the block-wise second moment; (9, 11) keeps float32 moments (numel <=
# min_quantized_numel).
SHAPES = [(64, 96), (40, 257), (2, 32, 64), (16, 256), (4096,), (1001,), (9, 11)]


def _record(monkeypatch, second_moment: str, dtype: torch.dtype, scale_dtype: str = "float32"):
    launches = []
    monkeypatch.setattr(_triton, "interpreted", lambda: True)
    monkeypatch.setattr(_triton, "_launch",
                        lambda kernel, grid, *args, **consts: launches.append((kernel, args, consts)))
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = AdamW4bit(params, backend="triton", second_moment=second_moment, min_quantized_numel=100,
                    scale_dtype=scale_dtype)
    for _ in range(2):  # a fresh step, then one that reads the moments
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return launches


_TYPES = {torch.float32: "*fp32", torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8"}


def _ptx(kernel, args, consts, **options) -> str:
    """PTX for sm_90, specialised as Triton's launcher would (16-byte aligned pointers)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    names = kernel.arg_names
    signature = {name: _TYPES[a.dtype] for name, a in zip(names, args, strict=False)}
    attrs = {(names.index(name),): [["tt.divisibility", 16]]
             for name, a in zip(names, args, strict=False) if a.data_ptr() % 16 == 0}
    signature.update({name: "constexpr" for name in consts})
    src = ASTSource(kernel, signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={**_triton.LAUNCH, **options})
    return compiled.asm["ptx"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every distinct launch of two steps of each configuration (second moment, parameter
    dtype, scale dtype), compiled."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
    out = {}
    try:
        cases = [(sm, dtype, "float32") for sm in ("rank1", "block", "factor")
                 for dtype in (torch.float32, torch.bfloat16)]
        cases += [("rank1", torch.float32, "bfloat16"), ("block", torch.float32, "bfloat16"),
                  ("rank1", torch.bfloat16, "bfloat16")]
        for second_moment, dtype, scale_dtype in cases:
            for kernel, args, consts in _record(mp, second_moment, dtype, scale_dtype):
                key = (kernel.fn.__name__, tuple(sorted(consts.items())))
                if key not in out:
                    out[key] = (kernel, args, consts, _ptx(kernel, args, consts))
    finally:
        mp.undo()
    return out


def test_every_kernel_variant_was_compiled(compiled):
    names = {name for name, _ in compiled}
    assert names == {"rank1_stats_kernel", "nonfinite_kernel", "step_kernel"}
    step = [dict(c) for name, c in compiled if name == "step_kernel"]
    assert {c["MODE"] for c in step} == {0, 1, 2, 3}
    assert {c["P_KIND"] for c in step} == {0, 1}
    assert {c["ALIGNED"] for c in step} == {False, True}
    assert {c["ROWBLK"] for c in step if c["MODE"] in (0, 2)} == {False, True}
    assert {c["SCALE_BF16"] for c in step if c["MODE"] in (0, 1)} == {False, True}


def test_no_fused_or_approximate_arithmetic(compiled):
    for (name, consts), (_, _, _, ptx) in compiled.items():
        for what, pattern in FORBIDDEN.items():
            found = re.findall(pattern, ptx)
            assert not found, f"{name} {dict(consts)}: {len(found)} x {what}"
        if name == "step_kernel":
            assert re.search(r"\bsqrt\.rn\.f32\b", ptx) and re.search(r"\bdiv\.rn\.f32\b", ptx)


def test_the_check_sees_fused_multiply_adds_when_fusion_is_on(compiled):
    kernel, args, consts, _ = next(v for (name, c), v in compiled.items()
                                   if name == "step_kernel" and dict(c)["MODE"] == 0)
    ptx = _ptx(kernel, args, consts, enable_fp_fusion=True)
    assert re.findall(FORBIDDEN["fused multiply-add"], ptx)


def test_aligned_launches_use_16_byte_loads(compiled):
    for (name, consts), (_, _, _, ptx) in compiled.items():
        if dict(consts).get("ALIGNED"):
            assert re.search(r"\bld\.global(\.\w+)*\.v4\.", ptx), (name, dict(consts))
            if name == "step_kernel":
                assert re.search(r"\bst\.global(\.\w+)*\.v4\.", ptx), (name, dict(consts))
