"""4-bit quantization maps and nibble packing shared by every path of `AdamW4bit`.

- First moment: signed dynamic-exponent map (`SIGNED_MAP`), blocks of `block_size`
  elements of the row-major flattened tensor, an fp32 scale per block = the block's absmax
  clamped at 1e-12, round to nearest (ties go to the lower value).
- Second moment: the zero-free linear map (i + 1) / 16, i = 0..15 (`UNSIGNED_MAP`), round
  to nearest (ties go down), with a scale of 0 meaning "all zero" (the code is 0 then).
- Packing: two codes per uint8 byte; element 2k in the low nibble of byte k, element
  2k + 1 in the high nibble; an odd tensor's last high nibble is 0.
"""

from __future__ import annotations

import torch

SIGNED_MAP_VALUES = (
    -0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0.0,
    0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0,
)
UNSIGNED_MAP_VALUES = tuple((i + 1) / 16 for i in range(16))
SCALE_FLOOR = 1e-12  # first-moment block scales are clamped here
# Second-moment scales below the smallest normal float are taken as it when inverted, so
# the inverse, and every value times it, stays finite (the kernels do the same).
TINY = torch.finfo(torch.float32).tiny

SIGNED_MAP = torch.tensor(SIGNED_MAP_VALUES, dtype=torch.float32)
# Decision boundaries, halfway between neighbours (computed in float64, then rounded).
SIGNED_MIDS = torch.tensor(
    [(a + b) / 2 for a, b in zip(SIGNED_MAP_VALUES, SIGNED_MAP_VALUES[1:], strict=False)],
    dtype=torch.float32,
)
UNSIGNED_MAP = torch.tensor(UNSIGNED_MAP_VALUES, dtype=torch.float32)


def packed_bytes(numel: int) -> int:
    return (numel + 1) // 2


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes (any integer dtype, values 0..15, flat) -> uint8, two per byte (low first)."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    c = c.view(-1, 2)
    return c[:, 0] | (c[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bytes -> int64 codes of the first `numel` elements."""
    lo = packed & 15
    hi = packed >> 4
    return torch.stack([lo, hi], dim=1).reshape(-1)[:numel].long()


def quantize_signed(x: torch.Tensor) -> torch.Tensor:
    """Nearest code of `SIGNED_MAP` for values already divided by their scale."""
    return torch.bucketize(x, SIGNED_MIDS.to(x.device))


def quantize_unsigned(x: torch.Tensor) -> torch.Tensor:
    """Nearest code of `UNSIGNED_MAP` for values in [0, 1] (ceil(16x - 1/2) - 1, clamped)."""
    return (torch.ceil(x * 16.0 - 0.5) - 1.0).clamp_(0.0, 15.0).long()


def inv_or_zero(s: torch.Tensor) -> torch.Tensor:
    """1 / s (with s floored at `TINY`), or 0 where s == 0."""
    return torch.where(s > 0, torch.ones_like(s) / s.clamp_min(TINY), torch.zeros_like(s))


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Absmax of each block of `block` elements of flat `x` (the last block padded)."""
    n = x.numel()
    nb = -(-n // block)
    pad = nb * block - n
    xp = torch.nn.functional.pad(x.reshape(-1), (0, pad)) if pad else x.reshape(-1)
    return xp.view(nb, block).abs().amax(dim=1)


def expand_blocks(scale: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    return scale.repeat_interleave(block)[:numel]
