"""The vocab stages end to end on a tiny GPT-2 run (in-process, no Prefect or Ray)."""

from pathlib import Path

import pytest
import torch

from plasticity import stages
from plasticity.storage import Storage, read_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from plasticity.config import load_config

    root = tmp_path_factory.mktemp("store")
    cfg = load_config(
        ROOT / "configs/smoke.yaml",
        [f"storage.uri=file://{root}", "train.max_steps=3", "train.snapshot_steps=[0, 3]",
         "train.lr=0.01", "concept.max_pairs=40", "concept.n_train=24", "concept.layers=[1, 2]",
         "vocab.layers=[2]", "vocab.circuit_heads=[3]", "vocab.circuit_top_k=5",
         "vocab.null_samples=20", "vocab.vectors_per_object=3", "vocab.align_vectors=16"],
    )
    refs, _ = stages.finetune_stage(cfg, "v1")
    for r in refs:
        stages.extract_stage(cfg, "v1", r)
    results = [stages.vocab_stage(cfg, "v1", r) for r in refs]
    from plasticity.stages.vocab import vocab_similarity_stage

    sim = vocab_similarity_stage(cfg, "v1")
    return cfg, refs, results, sim


def _model(cfg, ref):
    from plasticity.train.checkpoint import load_checkpoint

    return load_checkpoint(Storage.from_config(cfg.storage), ref.path, cfg.model)


def test_vocab_topk_of_directions_and_weights_match_brute_force(run):
    from plasticity.vocab import weights as W

    cfg, refs, _, _ = run
    storage = Storage.from_config(cfg.storage)
    lm, base = _model(cfg, refs[-1]), _model(cfg, refs[0])
    table = [r for r in read_table(storage, "vocab_topk", ["v1"]).to_pylist()
             if r["checkpoint_step"] == refs[-1].step]
    e = lm.adapter.unembedding_matrix(lm.model).detach().double()
    gain = lm.adapter.norm(lm.model).weight.detach().double()

    def tokens(obj, variant, layer, head, index, sign):
        rows = [r for r in table if (r["object"], r["variant"], r["layer"], r["head"], r["index"], r["sign"])
                == (obj, variant, layer, head, index, sign)]
        return [r["token_id"] for r in sorted(rows, key=lambda r: r["rank"])]

    k = cfg.vocab.top_k
    vec = stages.load_vectors(storage, "v1", refs[-1].step, "honesty").direction("pca", 1).double()
    for variant, x in (("raw", vec), ("lnf", gain * (vec - vec.mean()))):
        s = e @ x
        assert tokens("direction_pca", variant, 1, None, 0, 1) == torch.topk(s, k).indices.tolist()
        assert tokens("direction_pca", variant, 1, None, 0, -1) == torch.topk(-s, k).indices.tolist()
    # FF value rows: the largest-norm rows of the base model; their deltas by delta norm.
    cur, ref = W.ff_weights(lm, 2)["ff_value"].double(), W.ff_weights(base, 2)["ff_value"].double()
    picked = sorted(torch.topk(ref.norm(dim=1), 3).indices.tolist())
    got = sorted({r["index"] for r in table if r["object"] == "ff_value"})
    assert got == picked
    i = picked[0]
    assert tokens("ff_value", "raw", 2, None, i, 1) == torch.topk(e @ cur[i], k).indices.tolist()
    delta = cur - ref
    j = int(delta.norm(dim=1).argmax())
    assert tokens("ff_value_delta", "raw", 2, None, j, 1) == torch.topk(e @ delta[j], k).indices.tolist()
    # Attention output rows carry their head.
    heads = {r["head"] for r in table if r["object"] == "attn_out"}
    assert heads and heads <= {0, 1, 2, 3}


def test_circuit_topk_of_the_stage_matches_brute_force(run):
    from plasticity.vocab import weights as W

    cfg, refs, _, _ = run
    storage = Storage.from_config(cfg.storage)
    table = read_table(storage, "circuit_topk", ["v1"]).to_pylist()
    assert {r["circuit"] for r in table if r["checkpoint_step"] == 0} == {"ov", "qk"}
    assert {r["circuit"] for r in table if r["checkpoint_step"] == refs[-1].step} == {
        "ov", "qk", "delta_ov", "delta_qk"}
    assert {r["head"] for r in table} == {3}
    lm = _model(cfg, refs[-1])
    hw = W.head_weights(lm, 2)
    e = lm.adapter.unembedding_matrix(lm.model).detach()
    # The OV matrix of a 50,257-token vocabulary is too big to build; check the found
    # entries against exact values and against the maximum of sampled row blocks.
    a, b = (e @ hw.v[3]).double(), (e @ hw.o[3].t()).double()
    rows = sorted((r for r in table if r["checkpoint_step"] == refs[-1].step and r["circuit"] == "ov"
                   and r["head"] == 3 and r["sign"] == 1), key=lambda r: r["rank"])
    for r in rows:
        assert r["score"] == pytest.approx(float(a[r["src_token_id"]] @ b[r["dst_token_id"]]), rel=1e-9)
    kth = rows[-1]["score"]
    g = torch.Generator().manual_seed(0)
    for start in torch.randint(0, e.shape[0] - 512, (4,), generator=g).tolist():
        block = a[start : start + 512] @ b.t()
        assert float(block.max()) <= rows[0]["score"] + 1e-9
        top_in_block = {(start + int(i) // e.shape[0], int(i) % e.shape[0])
                        for i in torch.nonzero(block.reshape(-1) >= kth).squeeze(1)}
        assert top_in_block <= {(r["src_token_id"], r["dst_token_id"]) for r in rows}


def test_concept_scores_and_delta_stats(run):
    cfg, refs, _, _ = run
    storage = Storage.from_config(cfg.storage)
    cs = read_table(storage, "concept_scores", ["v1"]).to_pylist()
    assert {r["concept"] for r in cs} == {"honesty", "deception"}
    assert all(0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["null_percentile"] <= 100.0 for r in cs)
    # The two signs of the same vector are mirror images: AUROC(+) + AUROC(-) = 1.
    by = {(r["checkpoint_step"], r["object"], r["layer"], r["index"], r["concept"], r["variant"], r["sign"]): r
          for r in cs}
    for key, r in by.items():
        if key[-1] == 1:
            assert r["auroc"] + by[(*key[:-1], -1)]["auroc"] == pytest.approx(1.0)
    ds = read_table(storage, "delta_stats", ["v1"]).to_pylist()
    assert {r["checkpoint_step"] for r in ds} == {refs[-1].step}
    lm, base = _model(cfg, refs[-1]), _model(cfg, refs[0])
    w, w0 = (m.model.transformer.h[1].mlp.c_proj.weight.detach().double() for m in (lm, base))
    row = next(r for r in ds if r["param"] == "ff_out" and r["layer"] == 1 and r["head"] is None)
    assert row["delta_norm"] == pytest.approx(float((w - w0).norm()), rel=1e-6)
    assert row["relative_delta_norm"] == pytest.approx(float((w - w0).norm() / w0.norm()), rel=1e-6)
    sv = torch.linalg.svdvals(w - w0)[:5].tolist()
    assert row["top_singular_values"] == pytest.approx(sv, rel=1e-4)
    heads = [r for r in ds if r["param"] == "attn_v" and r["layer"] == 1 and r["head"] is not None]
    assert len(heads) == 4
    assert sum(r["delta_norm"] ** 2 for r in heads) == pytest.approx(
        next(r for r in ds if r["param"] == "attn_v" and r["layer"] == 1 and r["head"] is None)["delta_norm"] ** 2,
        rel=1e-6)


def test_vocab_similarity_alignment_and_token_meta(run):
    cfg, refs, _, sim = run
    storage = Storage.from_config(cfg.storage)
    rows = read_table(storage, "vocab_similarity", ["v1"]).to_pylist()
    assert {(r["step_a"], r["step_b"]) for r in rows} == {(0, refs[-1].step)}
    d = next(r for r in rows if r["object"] == "direction_pca" and r["variant"] == "raw" and r["layer"] == 1)
    # Recompute from the two checkpoints' own unembeddings and directions.
    s = []
    for ref in refs:
        lm = _model(cfg, ref)
        v = stages.load_vectors(storage, "v1", ref.step, "honesty").direction("pca", 1)
        s.append(lm.adapter.unembedding_matrix(lm.model).detach().double() @ v.double())
    k = cfg.vocab.top_k
    top = [set(torch.topk(x, k).indices.tolist()) for x in s]
    assert d["jaccard_at_k"] == pytest.approx(len(top[0] & top[1]) / len(top[0] | top[1]))
    assert d["vocab_cosine"] == pytest.approx(float(s[0] @ s[1] / (s[0].norm() * s[1].norm())), rel=1e-5)
    from scipy.stats import spearmanr

    assert d["spearman"] == pytest.approx(spearmanr(s[0], s[1]).statistic, abs=1e-6)
    ov = [r for r in rows if r["object"] == "ov"]
    assert {r["head"] for r in ov} == {3}
    assert all(0.0 < r["vocab_cosine"] <= 1.0 + 1e-9 for r in ov)
    al = read_table(storage, "vocab_alignment", ["v1"]).to_pylist()
    n_layers = 4
    assert len([r for r in al if r["object"] == "ff_key"]) == n_layers * n_layers
    # A few steps of fine-tuning keep each layer its own best match.
    assert all(r["layer_a"] == r["layer_b"] for r in al if r["layer_match"])
    meta = read_table(storage, "token_meta", ["v1"]).to_pylist()
    assert len(meta) == 50257
    honest = [r for r in meta if r["token"] == " honest"]
    assert honest and "honesty" in honest[0]["concept"] and honest[0]["leading_space"]


def test_vocab_summary_markdown(run):
    from plasticity.analysis.vocab_report import vocab_summary_markdown

    cfg, refs, _, _ = run
    md = vocab_summary_markdown(Storage.from_config(cfg.storage), "v1")
    assert md.startswith("## Vocabulary space")
    for ref in refs:
        assert f"### Step {ref.step}" in md
    assert "honesty direction" in md and "| weight delta |" in md
    # The steered layer's direction is read too, when it is not the best layer.
    storage = Storage.from_config(cfg.storage)
    dirs = [r for r in read_table(storage, "directions", ["v1"]).to_pylist()
            if r["checkpoint_step"] == refs[-1].step and r["method"] != "random"]
    best = max(dirs, key=lambda r: (r["detection_accuracy"], -{"pca": 0, "mean_diff": 1}[r["method"]], -r["layer"]))
    other = next(x for x in (1, 2) if x != best["layer"])
    md = vocab_summary_markdown(storage, "v1", steered=("pca", other))
    last = md.split(f"### Step {refs[-1].step}")[1]
    assert f"At the steered layer (`pca`, layer {other}, test detection accuracy" in last
    top = sorted((r for r in read_table(storage, "vocab_topk", ["v1"]).to_pylist()
                  if r["checkpoint_step"] == refs[-1].step and r["object"] == "direction_pca"
                  and r["layer"] == other and r["sign"] == 1 and r["variant"] == "raw"),
                 key=lambda r: r["rank"])
    assert f"promotes `{top[0]['token']!r}`" in last.split("At the steered layer")[1]
    same = vocab_summary_markdown(storage, "v1", steered=(best["method"], best["layer"]))
    assert "At the steered layer" not in same.split(f"### Step {refs[-1].step}")[1]
    with pytest.raises(FileNotFoundError):
        vocab_summary_markdown(Storage.from_config(cfg.storage), "no-such-run")


def test_vocab_stage_rejects_bad_layers_and_heads(run):
    import dataclasses

    cfg, refs, _, _ = run
    bad = dataclasses.replace(cfg, vocab=dataclasses.replace(cfg.vocab, layers=[9]))
    with pytest.raises(ValueError, match="vocab.layers"):
        stages.vocab_stage(bad, "v1", refs[0])
    bad = dataclasses.replace(cfg, vocab=dataclasses.replace(cfg.vocab, circuit_heads=[7]))
    with pytest.raises(ValueError, match="vocab.circuit_heads"):
        stages.vocab_stage(bad, "v1", refs[0])


def test_vocab_config_is_validated():
    from plasticity.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="vocab.concepts"):
        config_from_dict({"vocab": {"concepts": ["no-such-list"]}})
    with pytest.raises(ConfigError, match="vocab.variants"):
        config_from_dict({"vocab": {"variants": ["raw", "raw"]}})
    with pytest.raises(ConfigError, match="vocab.circuit_screen"):
        config_from_dict({"vocab": {"circuit_screen": "int4"}})


def test_a_tied_embedding_is_held_once_across_checkpoints(run):
    from plasticity.stages.vocab import _load_checkpoint_vocab
    cfg, refs, _, _ = run
    storage = Storage.from_config(cfg.storage)
    ck = _load_checkpoint_vocab(cfg, storage, "v1", refs[-1])
    assert ck.e_in is ck.e_out  # tiny-gpt2 ties them: one copy, not two
    lm = _model(cfg, refs[-1])
    torch.testing.assert_close(ck.e_out, lm.model.get_input_embeddings().weight.detach().float(),
                               rtol=0, atol=0)
