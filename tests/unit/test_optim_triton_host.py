"""Host work of AdamW4bit's Triton path per step, counted on CPU tensors (no GPU needed).

On a GPU each PyTorch operation and launch costs the host microseconds whatever its size; a
step must not cost more of them for more tensors. The path runs here with its launches
recorded instead of run. Skipped where Triton is not installed.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from plasticity.optim import AdamW4bit, _triton  # noqa: E402
from tests.unit.optim_inputs import count_plan_builds  # noqa: E402


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _steady_step(monkeypatch, layers: int, second_moment: str = "rank1",
                 scale_dtype: str = "float32") -> tuple[int, int]:
    """(PyTorch operations, launches) of the third step of a GPT-2-like stack of `layers`."""
    launches = []
    monkeypatch.setattr(_triton, "interpreted", lambda: True)
    monkeypatch.setattr(_triton, "_launch", lambda kernel, grid, *a, **k: launches.append(kernel))
    shapes = [(512, 64), (128, 64)]
    for _ in range(layers):  # matrices with 4-bit moments, vectors with float32 ones
        shapes += [(64,), (64, 192), (192,), (64, 64), (64,), (64, 256), (256,), (256, 64), (64,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = AdamW4bit(params, backend="triton", second_moment=second_moment, min_quantized_numel=256,
                    scale_dtype=scale_dtype)
    for _ in range(3):
        for p in params:
            if p.grad is None:
                p.grad = torch.randn_like(p)
            else:
                p.grad.normal_()  # in place: the addresses stay, the plan is kept
        launches.clear()
        with _Ops() as ops:
            opt.step()
    assert all(st["step"] == 3 for st in opt.state.values())
    return ops.count, len(launches)


@pytest.mark.parametrize("second_moment,scale_dtype", [
    ("rank1", "float32"), ("block", "float32"), ("rank1", "bfloat16"), ("block", "bfloat16"),
])
def test_host_work_of_a_step_does_not_grow_with_the_tensor_count(monkeypatch, second_moment,
                                                                 scale_dtype):
    small = _steady_step(monkeypatch, 1, second_moment, scale_dtype)
    large = _steady_step(monkeypatch, 12, second_moment, scale_dtype)  # 110 tensors instead of 11
    assert small == large
    # a handful: one launch per layout, dtype, alignment and row-block group
    assert large[0] <= 20 and large[1] <= 8, large


def test_new_gradient_tensors_are_followed(monkeypatch):
    """Gradients replaced by new tensors (zero_grad(set_to_none=True)) move: the plan is built
    again rather than pointing at freed memory."""
    builds = count_plan_builds(monkeypatch)
    monkeypatch.setattr(_triton, "interpreted", lambda: True)
    monkeypatch.setattr(_triton, "_launch", lambda *a, **k: None)
    params = [torch.nn.Parameter(torch.randn(64, 96)), torch.nn.Parameter(torch.randn(64))]
    opt = AdamW4bit(params, backend="triton", min_quantized_numel=100)
    keep = []
    for _ in range(4):
        for p in params:
            keep.append(p.grad)  # so that the allocator cannot hand out the same address
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(builds) == 4
