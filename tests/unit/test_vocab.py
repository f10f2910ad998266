"""Vocabulary-space analysis against brute force: circuit top-k, projections, weight
layouts of every architecture, concept scores, drift, Gram-based circuit cosine and
parameter alignment. Small vocabularies, so the V x V matrices can be built here."""

import math

import pytest
import torch

from plasticity.models.adapters import adapter_for
from plasticity.models.loading import LoadedModel
from plasticity.models.presets import load_gpt2_tokenizer, tiny_config
from plasticity.vocab import weights as W
from plasticity.vocab.project import project, topk_columns
from plasticity.vocab.scores import (
    align_layers,
    circuit_cosine,
    concept_scores,
    null_percentile,
    spearman,
    vocab_correlation,
)
from plasticity.vocab.topk import balanced_factors, product_topk, product_topk_dense

V = 400


def _brute(a: torch.Tensor, b: torch.Tensor, k: int):
    full = a.float().double() @ b.float().double().t()
    flat = full.reshape(-1)
    out = {}
    for sign in (1, -1):
        vals, idx = torch.topk(flat * sign, k)
        out[sign] = (vals * sign, idx // full.shape[1], idx % full.shape[1])
    return out


def _assert_matches(res, brute, k, atol=1e-9):
    for sign, vals, rows, cols in (
        (1, res.top_values, res.top_rows, res.top_cols),
        (-1, res.bottom_values, res.bottom_rows, res.bottom_cols),
    ):
        bv, br, bc = brute[sign]
        assert len(vals) == k
        torch.testing.assert_close(vals, bv, atol=atol, rtol=1e-6)
        assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == set(
            zip(br.tolist(), bc.tolist(), strict=True)
        )


@pytest.mark.parametrize("screen", ["bfloat16", "float32"])
@pytest.mark.parametrize("dist", ["gaussian", "lognormal", "lowrank"])
def test_product_topk_equals_brute_force(screen, dist):
    g = torch.Generator().manual_seed(hash((screen, dist)) % 1000)
    n, m, r = 700, 900, 24
    a, b = torch.randn(n, r, generator=g), torch.randn(m, r, generator=g)
    if dist == "lognormal":
        a = a * torch.exp(torch.randn(n, 1, generator=g))
        b = b * torch.exp(torch.randn(m, 1, generator=g))
    elif dist == "lowrank":
        a[:, 4:] *= 1e-3
    k = 37
    res = product_topk(a, b, k, screen=screen, row_block=64, col_block=128)
    _assert_matches(res, _brute(a, b, k), k)
    assert res.blocks_exact < res.blocks_total or dist == "gaussian"


def test_product_topk_in_parallel_threads_equals_brute_force():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(900, 20, generator=g) * torch.exp(0.5 * torch.randn(900, 1, generator=g))
    b = torch.randn(800, 20, generator=g)
    want = _brute(a, b, 25)
    threads = torch.get_num_threads()
    for workers in (1, 3):
        res = product_topk(a, b, 25, row_block=32, col_block=128, workers=workers)
        _assert_matches(res, want, 25)
        assert res.blocks_exact <= res.blocks_total
        assert torch.get_num_threads() == threads  # torch's thread count is restored


def test_product_topk_prunes_norm_heterogeneous_factors():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3000, 16, generator=g) * torch.exp(1.5 * torch.randn(3000, 1, generator=g))
    b = torch.randn(3000, 16, generator=g) * torch.exp(1.5 * torch.randn(3000, 1, generator=g))
    res = product_topk(a, b, 20, row_block=128, col_block=256)
    _assert_matches(res, _brute(a, b, 20), 20)
    assert res.blocks_exact < 0.2 * res.blocks_total


def test_delta_circuit_topk_equals_brute_force():
    # A small difference of two large products: balanced factors make it prunable.
    g = torch.Generator().manual_seed(2)
    e = torch.randn(500, 32, generator=g)
    wv, wo = torch.randn(32, 8, generator=g), torch.randn(8, 32, generator=g)
    dv = 1e-3 * torch.randn(32, 8, generator=g)
    a1, b1 = e @ (wv + dv), e @ wo.t()
    a0, b0 = e @ wv, e @ wo.t()
    a, b = torch.cat([a1, a0], 1), torch.cat([b1, -b0], 1)
    full = (a1.double() @ b1.double().t()) - (a0.double() @ b0.double().t())
    res = product_topk(a, b, 10)
    top = torch.topk(full.reshape(-1), 10)
    torch.testing.assert_close(res.top_values, top.values, rtol=1e-4, atol=1e-6)
    assert set((res.top_rows * 500 + res.top_cols).tolist()) == set(top.indices.tolist())
    bal_a, bal_b = balanced_factors(a, b)
    assert bal_a.shape[1] <= 16  # the difference has rank <= 2 * 8
    torch.testing.assert_close(bal_a.double() @ bal_b.double().t(), full, rtol=0, atol=1e-4)


def test_dense_baseline_agrees_and_k_beyond_entries():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(30, 5, generator=g), torch.randn(20, 5, generator=g)
    dense = product_topk_dense(a, b, 15, row_block=7)
    _assert_matches(dense, _brute(a, b, 15), 15)
    tiny = product_topk(a[:2], b[:3], 50)
    assert len(tiny.top_values) == 6 and len(tiny.bottom_values) == 6


def test_product_topk_rejects_bad_input():
    a = torch.randn(5, 3)
    with pytest.raises(ValueError, match="inner dimensions"):
        product_topk(a, torch.randn(5, 4), 3)
    with pytest.raises(ValueError, match="k:"):
        product_topk(a, a, 0)
    with pytest.raises(ValueError, match="screen"):
        product_topk(a, a, 2, screen="int8")


# -- weight layouts ------------------------------------------------------------------------


def _small(name: str, seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(name)
    cfg.vocab_size = V
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, attr, None) is not None:
            setattr(cfg, attr, V - 1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial final-norm gains and biases
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or "ln_f" in n or "layer_norm.weight" in n:
                p.mul_(0).add_(1 + 0.3 * torch.randn_like(p))
    tok = load_gpt2_tokenizer()
    tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, adapter_for(model))


PRESETS = ["tiny-gpt2", "tiny-llama", "tiny-gpt-neox", "tiny-biogpt"]


@pytest.fixture(scope="module", params=PRESETS)
def small(request):
    return request.param, _small(request.param)


def _heads_from_modules(lm: LoadedModel, layer: int):
    """Per-head Q/K/V/O maps read off the modules' forward passes, split the way each
    architecture's attention code splits them (independent of vocab.weights)."""
    block = lm.adapter.block(lm.model, layer)
    cfg = lm.model.config
    d = cfg.hidden_size
    h = cfg.num_attention_heads
    dh = d // h
    eye = torch.eye(d)
    kind = lm.adapter.model_type
    with torch.no_grad():
        if kind == "gpt2":
            attn = block.attn
            q, k, v = (attn.c_attn(eye) - attn.c_attn.bias).split(d, dim=1)
            q, k, v = (t.reshape(d, h, dh) for t in (q, k, v))
            out = attn.c_proj
        elif kind == "gpt_neox":
            attn = block.attention
            qkv = (attn.query_key_value(eye) - attn.query_key_value.bias).view(d, h, 3 * dh)
            q, k, v = qkv.chunk(3, dim=-1)
            out = attn.dense
        else:
            attn = block.self_attn
            n_kv = getattr(cfg, "num_key_value_heads", None) or h

            def proj(m, n):
                y = m(eye) - (m.bias if m.bias is not None else 0)
                return y.reshape(d, n, dh).repeat_interleave(h // n, dim=1)

            q, k, v = proj(attn.q_proj, h), proj(attn.k_proj, n_kv), proj(attn.v_proj, n_kv)
            out = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
        bias = out.bias if out.bias is not None else 0
        o = torch.stack([
            out(torch.nn.functional.pad(torch.eye(dh), (hh * dh, d - (hh + 1) * dh))) - bias
            for hh in range(h)
        ])
    return q.permute(1, 0, 2), k.permute(1, 0, 2), v.permute(1, 0, 2), o


def test_head_weights_match_the_modules(small):
    name, lm = small
    hw = W.head_weights(lm, 1)
    q, k, v, o = _heads_from_modules(lm, 1)
    for mine, ref in ((hw.q, q), (hw.k, k), (hw.v, v), (hw.o, o)):
        torch.testing.assert_close(mine.float(), ref.float(), rtol=1e-5, atol=1e-6)


def test_ov_sum_over_heads_matches_a_one_token_attention_pass(small):
    # With one token, attention attends to itself: output = sum_h x W_V^h W_O^h + biases.
    name, lm = small
    hw = W.head_weights(lm, 0)
    block = lm.adapter.block(lm.model, 0)
    attn = getattr(block, "attn", None) or getattr(block, "attention", None) or block.self_attn
    x = torch.randn(1, 1, lm.model.config.hidden_size)
    zero = torch.zeros_like(x)
    pos = torch.zeros(1, 1, dtype=torch.long)
    kwargs = {}
    if hasattr(lm.model, "model") and hasattr(lm.model.model, "rotary_emb"):
        kwargs["position_embeddings"] = lm.model.model.rotary_emb(x, pos)
    elif hasattr(lm.model, "gpt_neox"):
        kwargs["position_embeddings"] = lm.model.gpt_neox.rotary_emb(x, pos)
    with torch.no_grad():
        try:
            y = attn(x, attention_mask=None, **kwargs)[0] - attn(zero, attention_mask=None, **kwargs)[0]
        except TypeError:
            pytest.skip(f"{name}: attention module call signature differs")
    expected = sum(x[0, 0] @ hw.v[h] @ hw.o[h] for h in range(hw.n_heads))
    torch.testing.assert_close(y[0, 0], expected, rtol=1e-4, atol=1e-5)


def test_ff_vectors_match_the_modules(small):
    name, lm = small
    block = lm.adapter.block(lm.model, 2)
    ff = W.ff_weights(lm, 2)
    d = lm.model.config.hidden_size
    with torch.no_grad():
        first = {"gpt2": lambda b: b.mlp.c_fc, "gpt_neox": lambda b: b.mlp.dense_h_to_4h,
                 "biogpt": lambda b: b.fc1, "llama": lambda b: b.mlp.gate_proj}[lm.adapter.model_type](block)
        second = {"gpt2": lambda b: b.mlp.c_proj, "gpt_neox": lambda b: b.mlp.dense_4h_to_h,
                  "biogpt": lambda b: b.fc2, "llama": lambda b: b.mlp.down_proj}[lm.adapter.model_type](block)
        keys = first(torch.eye(d)) - (first.bias if first.bias is not None else 0)  # (d, d_ff)
        d_ff = keys.shape[1]
        values = second(torch.eye(d_ff)) - (second.bias if second.bias is not None else 0)
    torch.testing.assert_close(ff["ff_key"], keys.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ff["ff_value"], values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("circuit", ["ov", "qk", "delta_ov"])
def test_circuit_topk_equals_brute_force_for_every_layout(small, circuit):
    from plasticity.vocab.readings import circuit_factors

    name, lm = small
    base = _small(name, seed=1) if circuit.startswith("delta") else None
    e_in, e_out, _ = W.embeddings(lm)
    hw = W.head_weights(lm, 1)
    h = hw.n_heads - 1
    if circuit == "ov":
        full = e_in.double() @ hw.v[h].double() @ hw.o[h].double() @ e_out.double().t()
    elif circuit == "qk":
        full = e_in.double() @ hw.q[h].double() @ hw.k[h].double().t() @ e_in.double().t()
    else:
        b_in, b_out, _ = W.embeddings(base)
        hb = W.head_weights(base, 1)
        full = (e_in.double() @ hw.v[h].double() @ hw.o[h].double() @ e_out.double().t()
                - b_in.double() @ hb.v[h].double() @ hb.o[h].double() @ b_out.double().t())
    a, b = circuit_factors(lm, 1, h, circuit, base)
    res = product_topk(a, b, 25, row_block=64, col_block=64)
    for sign, vals, rows, cols in ((1, res.top_values, res.top_rows, res.top_cols),
                                   (-1, res.bottom_values, res.bottom_rows, res.bottom_cols)):
        ref = torch.topk(full.reshape(-1) * sign, 25)
        torch.testing.assert_close(vals, ref.values * sign, rtol=1e-4, atol=1e-6)
        assert set((rows * V + cols).tolist()) == set(ref.indices.tolist())


@pytest.mark.parametrize("variant", ["raw", "lnf", "raw_in"])
def test_projection_topk_equals_brute_force(small, variant):
    name, lm = small
    e_in, e_out, tied = W.embeddings(lm)
    norm = W.final_norm(lm)
    vecs = W.layer_vectors(lm, 1)["ff_value"][:6]
    emb = e_in if variant == "raw_in" else e_out
    scores = project(emb, vecs, "raw" if variant == "raw_in" else variant, norm)
    # Independent reference: the final norm module on a huge-norm input is gain * centred
    # direction (LayerNorm) or gain * direction (RMSNorm), up to a positive factor.
    x = vecs.double()
    if variant == "lnf":
        mod = lm.adapter.norm(lm.model).double()
        with torch.no_grad():
            bias = mod.bias if getattr(mod, "bias", None) is not None else 0
            y = mod(x * 1e3) - bias
        lm.adapter.norm(lm.model).float()
        x = y
    ref = emb.double() @ x.t()
    top_v, top_i, bot_v, bot_i = topk_columns(scores, 10)
    for j in range(len(vecs)):
        assert top_i[:, j].tolist() == torch.topk(ref[:, j], 10).indices.tolist()
        assert bot_i[:, j].tolist() == torch.topk(-ref[:, j], 10).indices.tolist()
    assert norm.centre == isinstance(lm.adapter.norm(lm.model), torch.nn.LayerNorm)
    assert tied == (name != "tiny-gpt-neox")


def test_param_matrices_and_layer_vectors_agree(small):
    name, lm = small
    pm, lv = W.param_matrices(lm, 0), W.layer_vectors(lm, 0)
    torch.testing.assert_close(pm["ff_out"], lv["ff_value"])
    torch.testing.assert_close(pm["ff_in"].t(), lv["ff_key"])
    torch.testing.assert_close(pm["attn_o"], lv["attn_out"])
    torch.testing.assert_close(pm["attn_q"].t(), lv["attn_q"])


# -- scores --------------------------------------------------------------------------------


def test_concept_scores_against_brute_force():
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(300, 5, generator=g)
    scores[:50, 0] = scores[:50, 0].round()  # ties
    ids = torch.tensor([3, 17, 40, 41, 120, 299])
    prec, auc, mean_rank = concept_scores(scores, ids, 10)
    for j in range(5):
        s = scores[:, j].double().tolist()
        inside = [s[i] for i in ids.tolist()]
        outside = [s[i] for i in range(300) if i not in set(ids.tolist())]
        pairs = sum((x > y) + 0.5 * (x == y) for x in inside for y in outside)
        assert auc[j] == pytest.approx(pairs / (len(inside) * len(outside)))
        top = sorted(range(300), key=lambda i: -s[i])[:10]
        assert prec[j] == pytest.approx(len(set(top) & set(ids.tolist())) / 10)
        ranks = [1 + sum(y > x for y in s) + 0.5 * (sum(y == x for y in s) - 1) for x in inside]
        assert mean_rank[j] == pytest.approx(sum(ranks) / len(ranks))
    from plasticity.vocab.scores import RankedScores

    _, auc_neg, _ = RankedScores(scores, 10).concept(ids, -1)
    _, auc_ref, _ = concept_scores(-scores, ids, 10)
    torch.testing.assert_close(auc_neg, auc_ref)
    assert null_percentile(torch.tensor([0.5, 2.0]), torch.tensor([0.1, 0.5, 0.9, 1.0])).tolist() == [37.5, 100.0]
    with pytest.raises(ValueError, match="concept_ids"):
        concept_scores(scores, torch.tensor([], dtype=torch.long), 5)


def test_spearman_against_scipy():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 3, generator=g)
    y = x + torch.randn(200, 3, generator=g)
    y[:20, 1] = 0.0  # ties
    rho = spearman(x, y)
    for j in range(3):
        assert float(rho[j]) == pytest.approx(spearmanr(x[:, j], y[:, j]).statistic, abs=1e-10)


def test_average_ranks_equal_scipy_with_and_without_ties():
    from scipy.stats import rankdata

    from plasticity.vocab.scores import average_ranks

    g = torch.Generator().manual_seed(8)
    s = torch.randn(1000, 5, generator=g)
    s[:40, 1] = 0.5  # one long tie
    s[::7, 3] = s[::7, 3].round()  # many short ties
    s[:, 4] = torch.randint(0, 6, (1000,), generator=g).float()  # ties everywhere
    r = average_ranks(s)
    assert r.dtype == torch.float32
    for j in range(5):
        torch.testing.assert_close(r[:, j].double(), torch.from_numpy(rankdata(s[:, j].numpy())),
                                   rtol=0, atol=0)


def test_centred_gram_equals_the_float64_product_of_the_centred_matrices():
    from plasticity.vocab.scores import CentredGrams, centred_gram

    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(1001, 6, generator=g) + 3.0, torch.randn(1001, 4, generator=g) - 1.0
    xd, yd = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    for chunk in (7, 1000, 5000):  # blocks that do and do not divide the rows
        torch.testing.assert_close(centred_gram(x, y, chunk), xd.t() @ yd, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(centred_gram(x, x, chunk), xd.t() @ xd, rtol=1e-12, atol=1e-9)
    grams = CentredGrams()
    assert grams(x, y) is grams(x, y)
    torch.testing.assert_close(grams(y, x), (xd.t() @ yd).t(), rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="the same rows"):
        centred_gram(x, y[:10])


def test_circuit_cosine_equals_the_materialised_matrices():
    g = torch.Generator().manual_seed(6)
    e1, e2 = torch.randn(150, 12, generator=g), torch.randn(150, 12, generator=g)
    f1, f2 = torch.randn(150, 12, generator=g), torch.randn(150, 12, generator=g)
    a1, b1 = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    a2, b2 = a1 + 0.5 * torch.randn(12, 4, generator=g), b1.clone()
    m1 = e1.double() @ a1.double() @ b1.double().t() @ f1.double().t()
    m2 = e2.double() @ a2.double() @ b2.double().t() @ f2.double().t()
    ref = float((m1 * m2).sum() / (m1.norm() * m2.norm()))
    assert circuit_cosine((a1, b1), (a2, b2), e1, f1, e2, f2) == pytest.approx(ref, rel=1e-9)


def test_parameter_alignment_recovers_a_permutation():
    g = torch.Generator().manual_seed(7)
    e = torch.randn(300, 16, generator=g)
    layers = {i: torch.randn(10, 16, generator=g) for i in range(4)}
    perm = torch.randperm(10, generator=g)
    # Model y: the same layers in another order, neurons permuted, a little noise.
    order = {0: 2, 1: 0, 2: 3, 3: 1}
    other = {order[i]: layers[i][perm] + 0.01 * torch.randn(10, 16, generator=g) for i in layers}
    corr = vocab_correlation(layers[0], other[2], e, e)
    # The reference in float64, as vocab_correlation computes (a float32 one is only good
    # to about 1e-6, which a float32 matmul on some CPUs exceeds).
    ed = e.double()
    ref = torch.corrcoef(torch.cat([ed @ layers[0].double().t(), ed @ other[2].double().t()], 1).t())[:10, 10:]
    torch.testing.assert_close(corr, ref, rtol=1e-9, atol=1e-12)
    al = align_layers(layers, other, e, e)
    assert al.layer_match == order
    for i, j in order.items():
        assert al.score[i, j] > 0.99
    assert math.isfinite(float(al.score.min()))


def test_balanced_factors_keep_the_product_on_both_factorizations():
    """Well-conditioned factors take the Cholesky route, rank-deficient ones Householder
    QR; both give factors of the same product."""
    from plasticity.vocab.topk import _triangular_factor

    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(300, 12, generator=g), torch.randn(200, 12, generator=g)
    assert _triangular_factor(a.double()) is not None
    deficient = torch.cat([a[:, :6], a[:, :6]], 1)  # rank 6 of 12 columns
    assert _triangular_factor(deficient.double()) is None
    for x in (a, deficient):
        want = x.double() @ b.double().t()
        bal_a, bal_b = balanced_factors(x, b)
        torch.testing.assert_close(bal_a.double() @ bal_b.double().t(), want, rtol=0, atol=1e-4)
        # Columns of the balanced factors are orthogonal with equal weight on both sides.
        ga, gb = bal_a.double().t() @ bal_a.double(), bal_b.double().t() @ bal_b.double()
        torch.testing.assert_close(ga, torch.diag(ga.diagonal()), rtol=0, atol=1e-3 * float(ga.max()))
        torch.testing.assert_close(ga.diagonal(), gb.diagonal(), rtol=1e-3, atol=0)
    assert balanced_factors(deficient, b)[0].shape[1] == 6
