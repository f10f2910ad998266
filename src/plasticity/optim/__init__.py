"""Optimizers with low-bit states: `AdamW4bit` (4-bit moments, fused CPU and CUDA kernels)."""

from plasticity.optim.adamw4bit import AdamW4bit, optimizer_state_bytes

__all__ = ["AdamW4bit", "optimizer_state_bytes"]
