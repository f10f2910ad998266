"""Scoped, named forward hooks on decoder block outputs: read (capture) and write (steer).

A block may return a Tensor (transformers 5) or a tuple whose first element is the
hidden state (older versions and some architectures); both are handled.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from plasticity.models.loading import LoadedModel


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.out"


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


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
def steer(lm: LoadedModel, vectors: dict[int, torch.Tensor]) -> Iterator[None]:
    """Add `vectors[layer]` to the block output of each layer, at every position.

    Write hooks run before any read hook on the same block, whatever the order the
    contexts were opened in: a captured activation is always the steered one.

    A vector of shape (d,) is added to every row; shape (batch, d) gives each row of the
    batch its own vector (used to sweep coefficients in one pass).
    """
    handles = []
    try:
        for layer, vec in vectors.items():

            def hook(_module, _inputs, output, vec=vec):
                hidden = _hidden(output)
                v = vec.to(device=hidden.device, dtype=hidden.dtype)
                if v.dim() == 2:
                    v = v[:, None, :]
                return _replace_hidden(output, hidden + v)

            # Prepended, so a read hook on the same block sees the steered output.
            handles.append(
                lm.adapter.block(lm.model, layer).register_forward_hook(hook, prepend=True)
            )
        yield
    finally:
        for h in handles:
            h.remove()
