"""Steering during generation: cached and uncached decoding agree, for every position mode."""

import pytest
import torch

from plasticity.config import ModelConfig
from plasticity.models import load_model
from plasticity.steering import steer


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def lm64(request):
    # float64, so cached and uncached decoding can be compared token for token.
    lm = load_model(ModelConfig(source=request.param, seed=7))
    lm.model.double()
    lm.tokenizer.padding_side = "left"
    return lm


PROMPTS = ["The capital of France is", "Water", "In 1905 Einstein published four papers on"]


def _generate(lm, use_cache: bool, alpha: float = 8.0, **steer_kw):
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with steer(lm, {1: direction, 2: -direction}, alpha, **steer_kw):
        out = lm.model.generate(
            **enc, max_new_tokens=6, do_sample=False, use_cache=use_cache,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    return out[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize(
    "mode", [{"positions": "all"}, {"positions": "prompt"}, {"positions": "generated"},
             {"positions": "last_k", "last_k": 2}],
    ids=lambda m: m["positions"],
)
def test_cached_and_uncached_generation_agree_under_steering(lm64, mode):
    cached = _generate(lm64, True, **mode)
    uncached = _generate(lm64, False, **mode)
    assert torch.equal(cached, uncached)


def test_steering_changes_generation_and_modes_differ(lm64):
    plain = _generate(lm64, True, alpha=0.0)
    outs = {m: _generate(lm64, True, alpha=30.0, positions=m) for m in ("all", "prompt", "generated")}
    # Every mode moves the generated tokens away from the unsteered ones somewhere.
    for mode, out in outs.items():
        assert not torch.equal(out, plain), mode
    assert len({tuple(o.flatten().tolist()) for o in outs.values()}) > 1


def test_bad_position_arguments_are_named(lm64):
    with pytest.raises(ValueError, match="unknown steering positions 'middle'"):
        with steer(lm64, {1: torch.ones(64)}, positions="middle"):
            pass
    with pytest.raises(ValueError, match="needs last_k >= 1"):
        with steer(lm64, {1: torch.ones(64)}, positions="last_k"):
            pass
