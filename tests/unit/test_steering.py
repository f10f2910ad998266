import pytest
import torch

from plasticity.config import ConceptConfig, ModelConfig
from plasticity.data import load_statements
from plasticity.models import load_model
from plasticity.models.presets import TINY_PRESETS
from plasticity.steering import (
    capture,
    contrast_pairs,
    detection_accuracy,
    hook_name,
    mean_difference,
    steer,
)
from plasticity.steering.evaluate import answer_token_ids, bootstrap_ci, facts_logit_gap
from plasticity.steering.forward import encode_left_padded, forward
from plasticity.steering.readers import explained_variance


@pytest.fixture(scope="module", params=TINY_PRESETS)
def lm(request):
    return load_model(ModelConfig(source=request.param))


def test_steering_adds_exactly_alpha_v_at_the_layer_and_nothing_before(lm):
    enc = encode_left_padded(lm, ["The Earth orbits the Sun.", "Water boils"])
    layers = list(range(lm.n_layers))
    with capture(lm, layers) as store:
        forward(lm, enc)
        clean = {k: v.clone() for k, v in store.items()}
        v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
        with steer(lm, {2: 3.0 * v}):
            forward(lm, enc)
        steered = {k: v.clone() for k, v in store.items()}
    for layer in (0, 1):
        torch.testing.assert_close(steered[hook_name(layer)], clean[hook_name(layer)], rtol=0, atol=0)
    torch.testing.assert_close(
        steered[hook_name(2)] - clean[hook_name(2)], (3.0 * v).expand_as(clean[hook_name(2)]),
        rtol=0, atol=1e-5,
    )
    assert not torch.allclose(steered[hook_name(3)], clean[hook_name(3)])


def test_per_row_vectors_steer_each_row_on_its_own(lm):
    enc = encode_left_padded(lm, ["Same prompt"] * 3)
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1))
    alphas = torch.tensor([0.0, 1.0, -2.0])
    with capture(lm, [1]) as store:
        with steer(lm, {1: alphas[:, None] * v}):
            forward(lm, enc)
        rows = store[hook_name(1)].clone()
        forward(lm, enc)
        clean = store[hook_name(1)]
    torch.testing.assert_close(rows[0], clean[0], rtol=0, atol=0)
    torch.testing.assert_close(rows[2] - clean[2], (-2.0 * v).expand_as(clean[2]), rtol=0, atol=1e-5)


def test_hooks_are_removed_even_after_an_error(lm):
    block = lm.adapter.block(lm.model, 1)
    before = len(block._forward_hooks)
    with pytest.raises(RuntimeError):
        with steer(lm, {1: torch.zeros(lm.d_model)}), capture(lm, [1]):
            assert len(block._forward_hooks) == before + 2
            raise RuntimeError("boom")
    assert len(block._forward_hooks) == before


def test_contrast_pairs_follow_the_repe_recipe(tiny_gpt2):
    cfg = ConceptConfig(max_pairs=1000, n_train=10)
    statements = load_statements()
    pairs = contrast_pairs(statements[:4], tiny_gpt2.tokenizer, cfg, ModelConfig())
    trues = [s for s in statements[:4] if s.label == 1]
    expected = sum(max(0, len(tiny_gpt2.tokenizer.tokenize(s.text)) - 5) for s in trues)
    assert len(pairs) == expected
    first = pairs[0]
    honest = first.prompts[first.labels.index(1)]
    untruthful = first.prompts[first.labels.index(0)]
    assert honest == "Pretend you're an honest person making statements about the world. The"
    assert untruthful == honest.replace("an honest", "an untruthful")
    # Members are shuffled within pairs, with a seeded RNG.
    orders = {p.labels for p in pairs}
    assert orders == {(1, 0), (0, 1)}
    again = contrast_pairs(statements[:4], tiny_gpt2.tokenizer, cfg, ModelConfig())
    assert again == pairs


def test_tags_wrap_the_instruction(tiny_gpt2):
    pairs = contrast_pairs(
        load_statements()[:1], tiny_gpt2.tokenizer, ConceptConfig(max_pairs=2, n_train=1),
        ModelConfig(user_tag="USER:", assistant_tag="ASSISTANT:"),
    )
    assert pairs[0].prompts[0].startswith("USER: Pretend you're")
    assert "world. ASSISTANT: The" in pairs[0].prompts[0]


def test_readers_against_a_planted_direction():
    gen = torch.Generator().manual_seed(0)
    true_dir = torch.nn.functional.normalize(torch.randn(32, generator=gen), dim=0)
    base = torch.randn(200, 32, generator=gen)
    pos = base + 2.0 * true_dir + 0.1 * torch.randn(200, 32, generator=gen)
    neg = base - 2.0 * true_dir + 0.1 * torch.randn(200, 32, generator=gen)
    d = mean_difference(pos, neg)
    assert float(d.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float(d @ true_dir) > 0.99
    assert detection_accuracy(d, pos, neg) == 1.0
    assert detection_accuracy(-d, pos, neg) == 0.0
    # The paired differences are 4*true_dir plus small noise: after centring, the
    # variance along the planted direction is a small share, computed independently:
    diffs = (pos - neg).double()
    diffs -= diffs.mean(0)
    ref = float(((diffs @ d.double()) ** 2).sum() / (diffs**2).sum())
    assert explained_variance(d, pos, neg) == pytest.approx(ref, rel=1e-6)


def test_facts_logit_gap_matches_a_manual_computation(tiny_gpt2):
    statements = load_statements()[:3]
    got = facts_logit_gap(tiny_gpt2, statements, batch_size=2)
    t, f = answer_token_ids(tiny_gpt2.tokenizer)
    for i, s in enumerate(statements):
        prompt = f"Is the following statement true or false?\nStatement: {s.text}\nAnswer:"
        ids = tiny_gpt2.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_gpt2.model(ids).logits[0, -1].double(), -1)
        expected = (logp[t] - logp[f]) * (1 if s.label else -1)
        assert float(got[i]) == pytest.approx(float(expected), abs=1e-4)


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(20, generator=gen, dtype=torch.float64)
    large = torch.randn(2000, generator=gen, dtype=torch.float64)
    lo, hi = bootstrap_ci(small, 2000, seed=1)
    assert lo < float(small.mean()) < hi
    lo2, hi2 = bootstrap_ci(large, 2000, seed=1)
    assert (hi2 - lo2) < (hi - lo) / 5
    # Normal-theory width for n=2000: 2*1.96*sd/sqrt(n)
    assert (hi2 - lo2) == pytest.approx(2 * 1.96 * float(large.std()) / 2000**0.5, rel=0.15)
