"""Row-wise steering sweeps and the statistics of the plasticity grid, against
independent references (separate steered passes, np.polyfit, scikit-posthocs)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from plasticity.analysis.stats import (
    bootstrap_mean_ci,
    compare_stages,
    critical_windows,
    dunn,
    item_slopes,
    kruskal,
)
from plasticity.steering.forward import encode_left_padded, forward
from plasticity.steering.hooks import RowSteering, steer
from plasticity.steering.sweep import UNSTEERED, Variant, sweep_rows, sweep_scores

PROMPTS = ["The capital of France is", "Water boils at", "The sun rises in the", "Two plus two is"]


def _directions(lm, layers, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(n, lm.d_model, generator=g) for layer in layers}


def test_unsteered_and_alpha_zero_rows_equal_the_unsteered_model_exactly(tiny_gpt2):
    lm = tiny_gpt2
    variants = [UNSTEERED, Variant(0, 0.0), Variant(1, 3.0), Variant(0, -2.0), Variant(1, 0.0)]
    rows = [p for p in PROMPTS for _ in variants]
    batch = encode_left_padded(lm, rows)
    plain = forward(lm, batch, logits_to_keep=0).logits
    index = torch.tensor([v.direction for v in variants] * len(PROMPTS))
    coef = torch.tensor([v.coef for v in variants] * len(PROMPTS))
    with RowSteering(lm, _directions(lm, [1, 2], 2), {1: 1.0, 2: 0.5}, "add") as st:
        st.set_rows(index, coef)
        swept = forward(lm, batch, logits_to_keep=0).logits
    unchanged = (coef == 0).nonzero().flatten()
    changed = (coef != 0).nonzero().flatten()
    assert torch.equal(swept[unchanged], plain[unchanged])  # bit for bit
    assert (swept[changed] - plain[changed]).abs().amax() > 1e-3


@pytest.mark.parametrize("operator", ["add", "piecewise", "ablate", "ablate_add"])
def test_each_row_matches_its_own_steered_pass_in_float64(tiny_gpt2, operator):
    lm = copy.copy(tiny_gpt2)
    lm.model = copy.deepcopy(tiny_gpt2.model).double()
    dirs = {layer: d.double() for layer, d in _directions(lm, [1, 3], 3, seed=1).items()}
    scale = {1: 2.0, 3: 0.5}
    variants = [Variant(2, 1.5), UNSTEERED, Variant(0, -0.7), Variant(1, 0.0)]
    rows = [p for p in PROMPTS for _ in variants]
    with RowSteering(lm, dirs, scale, operator) as st:
        st.set_rows(torch.tensor([v.direction for v in variants] * len(PROMPTS)),
                    torch.tensor([v.coef for v in variants] * len(PROMPTS), dtype=torch.float64))
        swept = forward(lm, encode_left_padded(lm, rows), logits_to_keep=0).logits
    for k, v in enumerate(variants):
        idx = [i * len(variants) + k for i in range(len(PROMPTS))]
        batch = encode_left_padded(lm, PROMPTS)
        if v.direction < 0:
            ref = forward(lm, batch, logits_to_keep=0).logits
        else:
            with steer(lm, {layer: dirs[layer][v.direction] for layer in dirs},
                       {layer: v.coef * scale[layer] for layer in dirs}, operator):
                ref = forward(lm, batch, logits_to_keep=0).logits
        # Rows of other widths are padded differently: compare the real tokens only.
        for j, i in enumerate(idx):
            n = len(lm.tokenizer(PROMPTS[j], add_special_tokens=False)["input_ids"])
            torch.testing.assert_close(swept[i, -n:], ref[j, -n:], rtol=0, atol=1e-9)


def test_sweep_scores_equal_one_steered_evaluation_per_variant(tiny_gpt2):
    from plasticity.data.concepts import load_statements
    from plasticity.data.pubmedqa import load_pubmedqa
    from plasticity.data.truthfulqa import load_truthfulqa
    from plasticity.steering.evaluate import score_metrics

    lm = tiny_gpt2
    facts = load_statements("facts_true_false")[:6]
    questions = load_truthfulqa()[:3]
    pubmed = load_pubmedqa("test")[:3]
    metrics = ["facts_logit_gap", "facts_true_bias", "truthfulqa_mc1", "truthfulqa_mc2", "pubmedqa_accuracy"]
    dirs = _directions(lm, [2], 2, seed=3)
    variants = [UNSTEERED, Variant(0, 4.0), Variant(1, -4.0)]
    with RowSteering(lm, dirs, {2: 1.0}, "add") as st:
        passes: list[int] = []
        got = sweep_scores(lm, metrics, variants, st, facts, questions, pubmed, batch_size=5,
                           on_rows=passes.append)
    # Each forward pass is reported with its rows; they add up to what sweep_rows counts.
    assert passes and max(passes) <= 5
    assert sum(passes) == len(variants) * sweep_rows(metrics, facts, questions, pubmed)
    for k, v in enumerate(variants):
        if v.direction < 0:
            ref = score_metrics(lm, metrics, facts, questions, 4, pubmed)
        else:
            with steer(lm, {2: dirs[2][v.direction]}, v.coef, "add"):
                ref = score_metrics(lm, metrics, facts, questions, 4, pubmed)
        for m in metrics:
            torch.testing.assert_close(got[m][k], ref[m], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got["facts_logit_gap"][1], got["facts_logit_gap"][0])
    # The bias is the unsigned log-odds: the gap with each false statement's sign undone.
    signs = torch.tensor([1.0 if s.label == 1 else -1.0 for s in facts], dtype=torch.float64)
    torch.testing.assert_close(got["facts_true_bias"], got["facts_logit_gap"] * signs)


def test_row_steering_refuses_bad_shapes_and_missing_rows(tiny_gpt2):
    lm = tiny_gpt2
    with pytest.raises(ValueError, match="directions for layer 1"):
        RowSteering(lm, {1: torch.randn(lm.d_model)})
    with pytest.raises(ValueError, match="unknown steering operator"):
        RowSteering(lm, _directions(lm, [1], 1), operator="scale")
    with RowSteering(lm, _directions(lm, [1], 1)) as st, pytest.raises(RuntimeError, match="set_rows"):
        forward(lm, encode_left_padded(lm, PROMPTS[:2]))
    with RowSteering(lm, _directions(lm, [1], 1)) as st:
        st.set_rows(torch.tensor([0, -1, 0]), torch.tensor([1.0, 0.0, 1.0]))
        with pytest.raises(RuntimeError, match="the batch has 2 rows"):
            forward(lm, encode_left_padded(lm, PROMPTS[:2]))


# -- statistics -------------------------------------------------------------------------


def test_item_slopes_are_least_squares_fits():
    rng = np.random.default_rng(0)
    alphas = np.array([-0.5, -0.25, 0.0, 0.25, 0.5])
    effects = rng.normal(size=(5, 7)) + alphas[:, None] * rng.normal(size=7)
    got = item_slopes(alphas, effects)
    ref = [np.polyfit(alphas, effects[:, i], 1)[0] for i in range(7)]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="two distinct alphas"):
        item_slopes(np.zeros(3), np.zeros((3, 2)))


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    lo_s, hi_s = bootstrap_mean_ci(small, 2000, 0)
    lo_l, hi_l = bootstrap_mean_ci(large, 2000, 0)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 5
    # Against the normal approximation on the large sample.
    se = large.std(ddof=1) / np.sqrt(len(large))
    assert (hi_l - lo_l) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_dunn_matches_scikit_posthocs_with_ties():
    sp = pytest.importorskip("scikit_posthocs")
    rng = np.random.default_rng(2)
    # Rounded values: many ties, as accuracy-like effects have.
    groups = [np.round(rng.normal(mu, 1.0, n), 1) for mu, n in ((0.0, 30), (0.4, 25), (1.2, 30), (0.1, 20))]
    got = dunn(groups)
    ref_raw = sp.posthoc_dunn([list(g) for g in groups], p_adjust=None).to_numpy()
    ref_adj = sp.posthoc_dunn([list(g) for g in groups], p_adjust="bonferroni").to_numpy()
    off = ~np.eye(4, dtype=bool)
    np.testing.assert_allclose(got.p[off], ref_raw[off], rtol=1e-9)
    np.testing.assert_allclose(got.p_adjusted[off], ref_adj[off], rtol=1e-9)
    assert np.allclose(got.z, -got.z.T)


def test_kruskal_matches_scipy_and_handles_constant_data():
    from scipy import stats

    rng = np.random.default_rng(3)
    groups = [rng.normal(m, 1, 15) for m in (0, 0.5, 1.0)]
    h, p = kruskal(groups)
    ref = stats.kruskal(*groups)
    assert h == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    h, p = kruskal([np.zeros(5), np.zeros(4)])
    assert np.isnan(h) and p == 1.0


def test_critical_window_is_a_stage_significantly_above_both_neighbours():
    rng = np.random.default_rng(4)
    base = [rng.normal(0.0, 0.3, 40) for _ in range(5)]
    peaked = [b + (2.0 if i == 3 else 0.0) for i, b in enumerate(base)]
    rows = compare_stages([0, 10, 20, 30, 40], peaked)
    flagged = [r["stage_a"] for r in rows if r["test"] == "window" and r["critical_window"]]
    assert flagged == [30]
    assert not any(r["critical_window"] for r in compare_stages([0, 10, 20, 30, 40], base) if r["test"] == "window")
    # A peak at the first stage has one neighbour only: never a window.
    first = [b + (2.0 if i == 0 else 0.0) for i, b in enumerate(base)]
    assert not any(r["critical_window"] for r in compare_stages([0, 10, 20, 30, 40], first) if r["test"] == "window")
    # Stages are put in timeline order whatever order they come in.
    shuffled = compare_stages([30, 0, 40, 10, 20], [peaked[3], peaked[0], peaked[4], peaked[1], peaked[2]])
    assert [r["stage_a"] for r in shuffled if r["test"] == "window" and r["critical_window"]] == [30]
    assert critical_windows(np.array([0.0, 1.0]), np.zeros((2, 2))) == [False, False]
