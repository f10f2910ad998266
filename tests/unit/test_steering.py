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
from plasticity.steering.hooks import apply_operator
from plasticity.steering.readers import (
    explained_variance,
    pca_direction,
    random_direction,
    vote_sign,
)


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
        with steer(lm, {2: v}, 3.0):
            forward(lm, enc)
        steered = {k: h.clone() for k, h in store.items()}
    v = v / v.norm()
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
    v = v / v.norm()
    with capture(lm, [1]) as store:
        with steer(lm, {1: v}, alphas):
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


def test_default_builds_every_pair_and_trains_on_the_first_512(tiny_gpt2):
    cfg = ConceptConfig()
    assert cfg.max_pairs is None and cfg.n_train == 512
    statements = load_statements()
    pairs = contrast_pairs(statements, tiny_gpt2.tokenizer, cfg, ModelConfig())
    expected = sum(
        max(0, len(tiny_gpt2.tokenizer.tokenize(s.text)) - 5) for s in statements if s.label == 1
    )
    assert len(pairs) == expected > 512


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
    # Explained variance of the centred paired differences, computed independently:
    diffs = (pos - neg).double()
    diffs -= diffs.mean(0)
    ref = float(((diffs @ d.double()) ** 2).sum() / (diffs**2).sum())
    assert explained_variance(d, pos, neg) == pytest.approx(ref, rel=1e-6)


def _shuffled(pos, neg, seed=0):
    """Pairs in a random presentation order, as RepE shows them."""
    flip = torch.rand(len(pos), generator=torch.Generator().manual_seed(seed)) < 0.5
    first = torch.where(flip[:, None], neg, pos)
    second = torch.where(flip[:, None], pos, neg)
    return first, second


def test_pca_finds_the_planted_direction_and_matches_an_independent_pca():
    gen = torch.Generator().manual_seed(1)
    true_dir = torch.nn.functional.normalize(torch.randn(48, generator=gen), dim=0)
    base = 3.0 * torch.randn(300, 48, generator=gen)
    pos = base + 1.5 * true_dir + 0.2 * torch.randn(300, 48, generator=gen)
    neg = base - 1.5 * true_dir + 0.2 * torch.randn(300, 48, generator=gen)
    first, second = _shuffled(pos, neg)
    d, ev = pca_direction(first, second)
    d = d * vote_sign(d, pos, neg)
    assert float(d @ true_dir) > 0.99
    assert detection_accuracy(d, pos, neg) == 1.0
    # Independent PCA: the top eigenvector of the covariance of the differences.
    diffs = (first - second).double()
    cov = torch.cov(diffs.T)
    evals, evecs = torch.linalg.eigh(cov)
    ref = evecs[:, -1] * torch.sign(evecs[:, -1] @ d.double())
    assert float(ref @ d.double()) == pytest.approx(1.0, abs=1e-6)  # d is float32
    assert ev == pytest.approx(float(evals[-1] / evals.sum()), rel=1e-9)
    assert explained_variance(d, first, second) == pytest.approx(ev, rel=1e-6)


def test_pca_on_unshuffled_differences_loses_the_signal():
    # Taking positive - negative always and centring removes the shared offset, which
    # is why the pairs are shuffled (see DESIGN.md).
    gen = torch.Generator().manual_seed(2)
    true_dir = torch.nn.functional.normalize(torch.randn(48, generator=gen), dim=0)
    nuisance = torch.nn.functional.normalize(torch.randn(48, generator=gen), dim=0)
    n = 300
    base = torch.randn(n, 48, generator=gen)
    wobble = torch.randn(n, 1, generator=gen) * nuisance
    pos = base + 1.5 * true_dir + wobble
    neg = base - 1.5 * true_dir - wobble
    d_unshuffled, _ = pca_direction(pos, neg)
    d_shuffled, _ = pca_direction(*_shuffled(pos, neg))
    assert abs(float(d_unshuffled @ true_dir)) < 0.3
    assert abs(float(d_shuffled @ true_dir)) > 0.9


def test_random_direction_is_unit_and_seeded():
    a, b, c = random_direction(64, 3), random_direction(64, 3), random_direction(64, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.norm()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("operator", ["add", "piecewise", "ablate", "ablate_add"])
def test_operators_against_a_float64_reference(operator):
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(3, 7, 16, generator=gen)
    v = torch.randn(16, generator=gen) * 4.0
    alpha = torch.tensor([0.0, 1.5, -2.0])
    got = apply_operator(h, v, alpha, operator)
    hd, u = h.double(), (v / v.norm()).double()
    out = torch.empty_like(hd)
    for b in range(3):
        for t in range(7):
            x = hd[b, t]
            p = float(x @ u)
            a = float(alpha[b])
            out[b, t] = {
                "add": x + a * u,
                "piecewise": x + (1 if p > 0 else -1 if p < 0 else 0) * a * u,
                "ablate": x - p * u,
                "ablate_add": x - p * u + a * u,
            }[operator]
    torch.testing.assert_close(got.double(), out, rtol=1e-5, atol=1e-5)
    if operator.startswith("ablate"):
        # Nothing is left along v but the added part.
        torch.testing.assert_close(got.double() @ u, alpha.double()[:, None].expand(3, 7)
                                   if operator == "ablate_add" else torch.zeros(3, 7, dtype=torch.float64),
                                   rtol=0, atol=1e-5)


def test_steer_rejects_a_vector_of_the_wrong_width_and_unknown_operators(tiny_gpt2):
    with pytest.raises(ValueError, match="width 32, the model's is 64"):
        with steer(tiny_gpt2, {1: torch.ones(32)}):
            pass
    with pytest.raises(ValueError, match="unknown steering operator 'multiply'"):
        with steer(tiny_gpt2, {1: torch.ones(64)}, 1.0, "multiply"):
            pass


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
