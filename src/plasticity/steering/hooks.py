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
    of the batch (shape (batch,)), so a coefficient sweep fits in one pass.
    """
    u = direction.to(device=hidden.device, dtype=hidden.dtype)
    u = u / u.norm()
    a = alpha
    if torch.is_tensor(a):
        a = a.to(device=hidden.device, dtype=hidden.dtype)
        if a.dim() == 1:
            a = a[:, None, None]
    if operator == "add":
        return hidden + a * u
    proj = (hidden @ u)[..., None]
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


@contextmanager
def steer(
    lm: LoadedModel,
    directions: dict[int, torch.Tensor],
    alpha: float | torch.Tensor | dict[int, float | torch.Tensor] = 1.0,
    operator: str = "add",
) -> Iterator[None]:
    """Steer the block output of each layer in `directions` at every position.

    `alpha` is one coefficient for all layers or one per layer; each may be a number or a
    (batch,) tensor giving every row of the batch its own coefficient. The direction is
    used as a unit vector, so `alpha` is the length of what `add` adds.

    Write hooks run before any read hook on the same block, whatever the order the
    contexts were opened in: a captured activation is always the steered one.
    """
    if operator not in OPERATORS:
        raise ValueError(f"unknown steering operator {operator!r}; known: {OPERATORS}")
    handles = []
    try:
        for layer, direction in directions.items():
            if direction.shape[-1] != lm.d_model:
                raise ValueError(
                    f"steering vector for layer {layer} has width {direction.shape[-1]}, "
                    f"the model's is {lm.d_model}"
                )
            a = alpha[layer] if isinstance(alpha, dict) else alpha

            def hook(_module, _inputs, output, direction=direction, a=a):
                return _replace_hidden(
                    output, apply_operator(_hidden(output), direction, a, operator)
                )

            # Prepended, so a read hook on the same block sees the steered output.
            handles.append(
                lm.adapter.block(lm.model, layer).register_forward_hook(hook, prepend=True)
            )
        yield
    finally:
        for h in handles:
            h.remove()
