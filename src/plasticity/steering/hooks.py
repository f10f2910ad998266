"""Scoped, named forward hooks on decoder block outputs: read (capture) and write (steer).

A block may return a Tensor (transformers 5) or a tuple whose first element is the
hidden state (older versions and some architectures); both are handled.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from plasticity.models.loading import LoadedModel

Operator = Literal["add", "piecewise", "ablate", "ablate_add"]
OPERATORS: tuple[str, ...] = ("add", "piecewise", "ablate", "ablate_add")


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.out"


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def apply_operator(
    hidden: torch.Tensor, direction: torch.Tensor, alpha: float | torch.Tensor, operator: str
) -> torch.Tensor:
    """Steer hidden states (batch, positions, d) along `direction` (d,).

    - add: h + alpha*u
    - piecewise: h + sign(<h, u>)*alpha*u
    - ablate: h - <h, u>*u (alpha unused)
    - ablate_add: h - <h, u>*u + alpha*u
    with u the unit vector along `direction`. `alpha` is a number or one value per row
    of the batch (shape (batch,)), and `direction` one vector (d,) or one per row
    (batch, d), so a coefficient sweep over several directions fits in one pass.
    """
    u = direction.to(device=hidden.device, dtype=hidden.dtype)
    u = u / u.norm(dim=-1, keepdim=True)
    if u.dim() == 2:
        u = u[:, None, :]  # one direction per row, broadcast over positions
    a = alpha
    if torch.is_tensor(a):
        a = a.to(device=hidden.device, dtype=hidden.dtype)
        if a.dim() == 1:
            a = a[:, None, None]
    if operator == "add":
        return hidden + a * u
    proj = (hidden * u).sum(-1, keepdim=True) if u.dim() == 3 else (hidden @ u)[..., None]
    if operator == "piecewise":
        return hidden + torch.sign(proj) * a * u
    if operator == "ablate":
        return hidden - proj * u
    if operator == "ablate_add":
        return hidden - proj * u + a * u
    raise ValueError(f"unknown steering operator {operator!r}; known: {OPERATORS}")


@contextmanager
def capture(lm: LoadedModel, layers: list[int]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each layer's block output of the latest forward pass, keyed by hook name."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for layer in layers:
            name = hook_name(layer)

            def hook(_module, _inputs, output, name=name):
                store[name] = _hidden(output).detach()

            handles.append(lm.adapter.block(lm.model, layer).register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


POSITIONS: tuple[str, ...] = ("all", "prompt", "generated", "last_k")


class _PositionTracker:
    """Knows the absolute positions of the tokens in the current forward pass, with or
    without a KV cache, so position-restricted steering treats a token the same in
    cached and uncached generation. The prompt is what the first pass in the context saw.
    """

    def __init__(self) -> None:
        self.prompt_len: int | None = None
        self.start = 0
        self.length = 0

    def pre_hook(self, _module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        # transformers 5 names the KV cache `cache`; earlier versions `past_key_values`.
        past = kwargs.get("cache")
        if past is None:
            past = kwargs.get("past_key_values")
        past_len = int(past.get_seq_length()) if hasattr(past, "get_seq_length") else 0
        self.start, self.length = past_len, int(ids.shape[1])
        if self.prompt_len is None:
            self.prompt_len = self.length

    def mask(self, positions: str, last_k: int | None, device) -> torch.Tensor:
        pos = torch.arange(self.start, self.start + self.length, device=device)
        p = self.prompt_len or 0
        if positions == "prompt":
            return pos < p
        if positions == "generated":
            return pos >= p
        return (pos < p) & (pos >= p - (last_k or 0))


@contextmanager
def steer(
    lm: LoadedModel,
    directions: dict[int, torch.Tensor],
    alpha: float | torch.Tensor | dict[int, float | torch.Tensor] = 1.0,
    operator: str = "add",
    positions: str = "all",
    last_k: int | None = None,
) -> Iterator[None]:
    """Steer the block output of each layer in `directions`.

    `alpha` is one coefficient for all layers or one per layer; each may be a number or a
    (batch,) tensor giving every row of the batch its own coefficient. The direction is
    used as a unit vector, so `alpha` is the length of what `add` adds.

    `positions`: 'all' tokens, the 'prompt' only, 'generated' tokens only, or the
    'last_k' tokens of the prompt. Works inside `generate`, with or without the KV cache.

    Write hooks run before any read hook on the same block, whatever the order the
    contexts were opened in: a captured activation is always the steered one.
    """
    if operator not in OPERATORS:
        raise ValueError(f"unknown steering operator {operator!r}; known: {OPERATORS}")
    if positions not in POSITIONS:
        raise ValueError(f"unknown steering positions {positions!r}; known: {POSITIONS}")
    if positions == "last_k" and (last_k is None or last_k < 1):
        raise ValueError(f"positions='last_k' needs last_k >= 1, got {last_k}")
    tracker = _PositionTracker()
    handles = []
    try:
        if positions != "all":
            handles.append(
                lm.model.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True, prepend=True)
            )
        for layer, direction in directions.items():
            if direction.shape[-1] != lm.d_model:
                raise ValueError(
                    f"steering vector for layer {layer} has width {direction.shape[-1]}, "
                    f"the model's is {lm.d_model}"
                )
            a = alpha[layer] if isinstance(alpha, dict) else alpha

            def hook(_module, _inputs, output, direction=direction, a=a):
                hidden = _hidden(output)
                steered = apply_operator(hidden, direction, a, operator)
                if positions != "all":
                    keep = tracker.mask(positions, last_k, hidden.device)
                    steered = torch.where(keep[None, :, None], steered, hidden)
                return _replace_hidden(output, steered)

            # Prepended, so a read hook on the same block sees the steered output.
            handles.append(
                lm.adapter.block(lm.model, layer).register_forward_hook(hook, prepend=True)
            )
        yield
    finally:
        for h in handles:
            h.remove()


class RowSteering:
    """Steer each row of a batch with its own direction and coefficient, in one pass.

    `directions[layer]` stacks the candidate directions of that layer (n_directions, d);
    `scale[layer]` multiplies every row's coefficient at that layer (the residual norm,
    for relative alphas). Before each forward pass, `set_rows(index, coef)` says which
    direction (an index, or -1 for none) and which coefficient each row of the batch
    gets. A row with index -1 is left exactly as the unsteered model computes it.

    Use as a context manager around the forward passes; hooks are removed on exit.
    """

    def __init__(
        self,
        lm: LoadedModel,
        directions: dict[int, torch.Tensor],
        scale: dict[int, float] | None = None,
        operator: str = "add",
    ) -> None:
        if operator not in OPERATORS:
            raise ValueError(f"unknown steering operator {operator!r}; known: {OPERATORS}")
        for layer, stack in directions.items():
            if stack.dim() != 2 or stack.shape[-1] != lm.d_model:
                raise ValueError(
                    f"directions for layer {layer}: expected (n_directions, {lm.d_model}), "
                    f"got {tuple(stack.shape)}"
                )
        self.lm = lm
        self.operator = operator
        self.scale = {layer: float((scale or {}).get(layer, 1.0)) for layer in directions}
        # Unit vectors once, in float64; each hook casts them to the hidden dtype.
        self.units = {
            layer: (stack.double() / stack.double().norm(dim=-1, keepdim=True))
            for layer, stack in directions.items()
        }
        self._cast: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._index: torch.Tensor | None = None
        self._coef: torch.Tensor | None = None
        self._handles: list = []

    def set_rows(self, index: torch.Tensor, coef: torch.Tensor) -> None:
        if index.shape != coef.shape or index.dim() != 1:
            raise ValueError("set_rows: index and coef must be 1-D and of the same length")
        self._index, self._coef = index.long(), coef.double()

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            if self._index is None:
                raise RuntimeError("RowSteering: set_rows() was not called before the forward pass")
            hidden = _hidden(output)
            if hidden.shape[0] != len(self._index):
                raise RuntimeError(
                    f"RowSteering: the batch has {hidden.shape[0]} rows, set_rows gave {len(self._index)}"
                )
            index = self._index.to(hidden.device)
            active = index >= 0
            if not bool(active.any()):
                return output
            key = (layer, hidden.dtype, hidden.device)
            if key not in self._cast:
                self._cast[key] = self.units[layer].to(hidden.device, hidden.dtype)
            u = self._cast[key][index.clamp(min=0)]
            a = (self._coef * self.scale[layer]).to(hidden.device, hidden.dtype)
            steered = apply_operator(hidden, u, a, self.operator)
            steered = torch.where(active[:, None, None], steered, hidden)
            return _replace_hidden(output, steered)

        return hook

    def __enter__(self) -> RowSteering:
        for layer in self.units:
            block = self.lm.adapter.block(self.lm.model, layer)
            self._handles.append(block.register_forward_hook(self._hook(layer), prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
