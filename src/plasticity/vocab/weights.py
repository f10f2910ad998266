"""Per-layer weights of each architecture in one canonical layout.

Every matrix is returned in the "x @ W" orientation (input features x output features),
whatever the module stores (GPT-2's Conv1D keeps in x out, ``nn.Linear`` out x in):

- attention, per head h: ``W_Q[h]``, ``W_K[h]``, ``W_V[h]`` (d x d_head), ``W_O[h]``
  (d_head x d). With grouped-query attention the K/V head that query head h reads is
  repeated, so every tensor has n_heads entries. GPT-NeoX's fused QKV is interleaved per
  head ([q_h, k_h, v_h] blocks of d_head rows), GPT-2's ``c_attn`` is q | k | v.
- feed-forward: ``ff_key`` (d_ff x d: the vectors the first layer reads, one per
  neuron), ``ff_value`` (d_ff x d: the vectors the second layer writes), and for gated
  MLPs ``ff_up`` (d_ff x d).

Biases, the per-block norms, rotary embeddings and the attention scale are left out, as
in "Analyzing Transformers in Embedding Space" (Dar et al., 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plasticity.models.loading import LoadedModel

# Residual-space objects are read through the unembedding as they are written to the
# residual stream; reading-side objects are the vectors a layer takes dot products with.
RESIDUAL_OBJECTS = ("ff_value", "attn_out")
READING_OBJECTS = ("ff_key", "ff_up", "attn_q", "attn_k", "attn_v")
WEIGHT_OBJECTS = RESIDUAL_OBJECTS + READING_OBJECTS


@dataclass
class HeadWeights:
    """Per-head attention factors, each (n_heads, ...) in the x @ W orientation."""

    q: torch.Tensor  # (H, d, dh)
    k: torch.Tensor  # (H, d, dh), K/V heads repeated for grouped-query attention
    v: torch.Tensor  # (H, d, dh)
    o: torch.Tensor  # (H, dh, d)

    @property
    def n_heads(self) -> int:
        return int(self.q.shape[0])


def _xw(module: nn.Module) -> torch.Tensor:
    """The module's weight as (in, out): Conv1D stores it so, nn.Linear transposed."""
    w = module.weight.detach()
    if isinstance(module, nn.Linear):
        return w.t()
    return w  # transformers' Conv1D


def _heads_in(w: torch.Tensor, n: int) -> torch.Tensor:
    """(d, n*dh) -> (n, d, dh)."""
    d, width = w.shape
    return w.reshape(d, n, width // n).permute(1, 0, 2)


def _repeat_kv(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    n_kv = w.shape[0]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key/value heads")
    return w.repeat_interleave(n_heads // n_kv, dim=0)


def _config_heads(config) -> tuple[int, int]:
    n_heads = getattr(config, "num_attention_heads", None) or config.n_head
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    return int(n_heads), int(n_kv)


def head_weights(lm: LoadedModel, layer: int) -> HeadWeights:
    """The attention factors of one layer, per head."""
    block = lm.adapter.block(lm.model, layer)
    kind = lm.adapter.model_type
    n_heads, n_kv = _config_heads(lm.model.config)
    if kind == "gpt2":
        w = _xw(block.attn.c_attn)  # (d, 3d): q | k | v
        d = w.shape[0]
        q, k, v = (_heads_in(w[:, i * d : (i + 1) * d], n_heads) for i in range(3))
        o_w = _xw(block.attn.c_proj)
    elif kind == "gpt_neox":
        w = _xw(block.attention.query_key_value)  # (d, 3d), columns per head [q_h k_h v_h]
        d = w.shape[0]
        dh = d // n_heads
        per_head = w.reshape(d, n_heads, 3, dh).permute(2, 1, 0, 3)  # (3, H, d, dh)
        q, k, v = per_head[0], per_head[1], per_head[2]
        o_w = _xw(block.attention.dense)
    elif kind in ("llama", "mistral", "qwen2", "gemma3_text", "biogpt"):
        attn = block.self_attn
        q = _heads_in(_xw(attn.q_proj), n_heads)
        k = _repeat_kv(_heads_in(_xw(attn.k_proj), n_kv), n_heads)
        v = _repeat_kv(_heads_in(_xw(attn.v_proj), n_kv), n_heads)
        o_w = _xw(attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj)
    else:
        raise ValueError(f"no attention layout for model_type {kind!r}")
    dh = q.shape[-1]
    o = o_w.reshape(n_heads, dh, o_w.shape[1])  # rows of W_O grouped by head
    return HeadWeights(q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), o=o.contiguous())


def ff_weights(lm: LoadedModel, layer: int) -> dict[str, torch.Tensor]:
    """Feed-forward vectors of one layer: name -> (d_ff, d), one row per neuron."""
    block = lm.adapter.block(lm.model, layer)
    kind = lm.adapter.model_type
    if kind == "gpt2":
        return {"ff_key": _xw(block.mlp.c_fc).t(), "ff_value": _xw(block.mlp.c_proj)}
    if kind == "gpt_neox":
        return {
            "ff_key": _xw(block.mlp.dense_h_to_4h).t(),
            "ff_value": _xw(block.mlp.dense_4h_to_h),
        }
    if kind == "biogpt":
        return {"ff_key": _xw(block.fc1).t(), "ff_value": _xw(block.fc2)}
    if kind in ("llama", "mistral", "qwen2", "gemma3_text"):
        return {
            "ff_key": _xw(block.mlp.gate_proj).t(),
            "ff_up": _xw(block.mlp.up_proj).t(),
            "ff_value": _xw(block.mlp.down_proj),
        }
    raise ValueError(f"no feed-forward layout for model_type {kind!r}")


def layer_vectors(lm: LoadedModel, layer: int) -> dict[str, torch.Tensor]:
    """Every weight object of a layer as rows of d-vectors: name -> (n, d).

    Attention objects stack the heads: row ``h * d_head + j`` is column j of head h's
    W_Q/W_K/W_V, or row j of head h's W_O (``attn_out``).
    """
    hw = head_weights(lm, layer)
    out = dict(ff_weights(lm, layer))
    out["attn_out"] = hw.o.reshape(-1, hw.o.shape[-1])
    for name, t in (("attn_q", hw.q), ("attn_k", hw.k), ("attn_v", hw.v)):
        out[name] = t.permute(0, 2, 1).reshape(-1, t.shape[1])
    return {k: v.float() for k, v in out.items()}


def embeddings(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(input embedding, unembedding, tied): both V x d."""
    e_out = lm.adapter.unembedding_matrix(lm.model).detach()
    e_in = lm.model.get_input_embeddings().weight.detach()
    tied = e_in.data_ptr() == e_out.data_ptr() or (
        e_in.shape == e_out.shape and torch.equal(e_in, e_out)
    )
    return e_in, e_out, tied


@dataclass(frozen=True)
class FinalNorm:
    """The final norm's gain and whether it centres (LayerNorm) or not (RMSNorm)."""

    gain: torch.Tensor
    centre: bool

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Gain times the (centred) vectors, row-wise; no division by the norm."""
        if self.centre:
            x = x - x.mean(dim=-1, keepdim=True)
        return x * self.gain.to(x.dtype)


def final_norm(lm: LoadedModel) -> FinalNorm:
    norm = lm.adapter.norm(lm.model)
    gain = norm.weight.detach().float()
    if str(getattr(lm.model.config, "model_type", "")).startswith("gemma"):
        gain = gain + 1.0  # Gemma's RMSNorm scales by (1 + weight)
    return FinalNorm(gain=gain, centre=isinstance(norm, nn.LayerNorm))


def param_matrices(lm: LoadedModel, layer: int) -> dict[str, torch.Tensor]:
    """Whole weight matrices of a layer, x @ W orientation, keyed by a canonical name:
    attn_q, attn_k, attn_v (d x n*dh, K/V not repeated), attn_o (n*dh x d), ff_in
    (d x d_ff), ff_up (gated MLPs), ff_out (d_ff x d)."""
    block = lm.adapter.block(lm.model, layer)
    kind = lm.adapter.model_type
    n_heads, n_kv = _config_heads(lm.model.config)
    out: dict[str, torch.Tensor] = {}
    if kind in ("gpt2", "gpt_neox"):
        hw = head_weights(lm, layer)
        n = hw.n_heads
        for name, t in (("attn_q", hw.q), ("attn_k", hw.k), ("attn_v", hw.v)):
            out[name] = t.permute(1, 0, 2).reshape(t.shape[1], -1)
        out["attn_o"] = hw.o.reshape(n * hw.o.shape[1], -1)
    else:
        attn = block.self_attn
        out["attn_q"], out["attn_k"], out["attn_v"] = (
            _xw(attn.q_proj), _xw(attn.k_proj), _xw(attn.v_proj)
        )
        out["attn_o"] = _xw(attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj)
    ff = ff_weights(lm, layer)
    out["ff_in"] = ff["ff_key"].t()
    if "ff_up" in ff:
        out["ff_up"] = ff["ff_up"].t()
    out["ff_out"] = ff["ff_value"]
    return {k: v.float() for k, v in out.items()}


# The side of each canonical matrix that lives in the residual stream (d wide):
# 0 = rows (the matrix reads the residual), 1 = columns (it writes the residual).
RESIDUAL_SIDE = {"attn_q": 0, "attn_k": 0, "attn_v": 0, "attn_o": 1, "ff_in": 0, "ff_up": 0, "ff_out": 1}
