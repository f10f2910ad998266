"""Each stage of the timeline on tiny-gpt2, in-process (no Prefect, no Ray)."""

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from plasticity import stages
from plasticity.models import load_model
from plasticity.storage import Storage, read_table
from plasticity.storage.schemas import TABLES
from plasticity.train.checkpoint import CheckpointRef

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from plasticity.config import load_config

    root = tmp_path_factory.mktemp("store")
    cfg = load_config(
        ROOT / "configs/smoke.yaml",
        [f"storage.uri=file://{root}", "train.max_steps=4", "train.snapshot_steps=[0, 4]",
         "plasticity.n_items=16", "concept.max_pairs=40", "concept.n_train=24",
         "plasticity.metrics=[facts_logit_gap, facts_accuracy, truthfulqa_mc2, pubmedqa_accuracy]"],
    )
    observed: list[dict] = []
    passes: dict[str, list[tuple[int, int]]] = {"extract": [], "plasticity": []}
    refs, ft = stages.finetune_stage(cfg, "t1", observe=observed.append)
    ex = [stages.extract_stage(cfg, "t1", r, observe=lambda d, t: passes["extract"].append((d, t)))
          for r in refs]
    pl = [stages.plasticity_stage(cfg, "t1", r, refs,
                                  observe=lambda d, t: passes["plasticity"].append((d, t)))
          for r in refs]
    vo = [stages.vocab_stage(cfg, "t1", r) for r in refs]
    return cfg, refs, {"finetune": ft, "extract": ex, "plasticity": pl, "vocab": vo,
                       "observed": observed, "passes": passes}


@pytest.mark.parametrize("stage", ["extract", "plasticity"])
def test_extract_and_plasticity_report_their_forward_passes_up_to_the_total(run, stage):
    _, refs, results = run
    seen = results["passes"][stage]
    # One run per checkpoint: each counts up from its first pass to exactly its total.
    starts = [i for i, (done, _) in enumerate(seen) if i == 0 or done < seen[i - 1][0]]
    assert len(starts) == len(refs)
    for a, b in zip(starts, starts[1:] + [len(seen)], strict=True):
        mine = seen[a:b]
        assert len(mine) > 1 and len({t for _, t in mine}) == 1
        assert all(x < y for (x, _), (y, _) in zip(mine, mine[1:], strict=False))
        assert mine[-1][0] == mine[-1][1]


def test_finetune_writes_checkpoints_and_metrics(run):
    cfg, refs, results = run
    storage = Storage.from_config(cfg.storage)
    assert [r.step for r in refs] == [0, 4]
    metrics = read_table(storage, "train_metrics", ["t1"]).sort_by("step")
    assert metrics.column("step").to_pylist() == [1, 2, 3, 4]
    # AdamW4bit (the default), rank-1: per tensor over 4096 elements, 4-bit codes for both
    # moments, an fp32 scale per 128-element block of the first moment and fp32 max vectors
    # (one per dimension) for the second; 1-D tensors: fp32 block scales for both; smaller
    # tensors: two fp32 moments.
    from plasticity.models import load_model

    want = 0
    for p in load_model(cfg.model).model.parameters():
        n = p.numel()
        if n <= 4096:
            want += 8 * n
        elif p.dim() >= 2:
            want += 2 * ((n + 1) // 2) + 4 * -(-n // 128) + 4 * sum(p.shape)
        else:
            want += 2 * ((n + 1) // 2) + 8 * -(-n // 128)
    assert cfg.train.optimizer == "adamw4bit"
    assert metrics.column("optimizer").to_pylist() == ["adamw4bit"] * 4
    assert metrics.column("optimizer_state_bytes")[0].as_py() == want
    ckpts = read_table(storage, "checkpoints", ["t1"]).sort_by("step")
    assert ckpts.column("sha256").to_pylist() == [r.sha256 for r in refs]
    assert refs[0].sha256 != refs[1].sha256
    # `observe` saw each row as it was recorded, the same rows the shards hold.
    observed = results["observed"]
    assert [r["step"] for r in observed] == [1, 2, 3, 4]
    assert [r["loss"] for r in observed] == metrics.column("loss").to_pylist()


def test_activations_and_directions_agree(run):
    cfg, refs, _ = run
    storage = Storage.from_config(cfg.storage)
    acts = read_table(storage, "activations", ["t1"])
    dirs = read_table(storage, "directions", ["t1"])
    assert acts.schema.field("hidden").type == pa.list_(pa.float16(), 64)
    assert dirs.num_rows == len(refs) * 4 * 3
    assert sorted(set(dirs.column("method").to_pylist())) == ["mean_diff", "pca", "random"]
    assert all(0.0 <= a <= 1.0 for a in dirs.column("detection_accuracy").to_pylist())
    for v in dirs.column("vector").to_pylist():
        assert float(torch.tensor(v).norm()) == pytest.approx(1.0, abs=1e-5)


def _direction(dirs, step, layer, method):
    f = pa.compute.field
    row = dirs.filter((f("checkpoint_step") == step) & (f("layer") == layer) & (f("method") == method))
    assert row.num_rows == 1
    return torch.tensor(row.column("vector")[0].as_py(), dtype=torch.float64), row.to_pylist()[0]


def test_directions_are_recomputed_from_the_parquet_alone(run):
    """An independent PCA (eigenvectors of the covariance) and mean difference over the
    `activations` table agree with the `directions` table."""
    cfg, _, _ = run
    storage = Storage.from_config(cfg.storage)
    acts = read_table(storage, "activations", ["t1"])
    dirs = read_table(storage, "directions", ["t1"])
    f = pa.compute.field
    for layer in (1, 3):
        sel = acts.filter(
            (f("checkpoint_step") == 4) & (f("layer") == layer) & (f("split") == "train")
        ).sort_by("example_id").to_pydict()
        hidden = torch.tensor(sel["hidden"], dtype=torch.float64)
        labels = torch.tensor(sel["label"])
        assert sel["pair_id"][:4] == [0, 0, 1, 1]
        pos, neg = hidden[labels == 1], hidden[labels == 0]
        # PCA of the differences in presentation order (example_id order within a pair).
        diffs = hidden[0::2] - hidden[1::2]
        evals, evecs = torch.linalg.eigh(torch.cov(diffs.T))
        ref = evecs[:, -1]
        ref = ref if float(((pos - neg) @ ref > 0).double().mean()) >= 0.5 else -ref
        got, row = _direction(dirs, 4, layer, "pca")
        # float16 storage of the activations bounds the agreement.
        assert float(got @ ref) > 0.999
        assert row["explained_variance"] == pytest.approx(float(evals[-1] / evals.sum()), rel=1e-2)
        md = pos.mean(0) - neg.mean(0)
        got, _ = _direction(dirs, 4, layer, "mean_diff")
        assert float(got @ (md / md.norm())) > 0.999


def test_directions_are_reproducible(run, tmp_path):
    cfg, refs, _ = run
    import dataclasses

    other = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, uri=f"file://{tmp_path}"))
    stages.extract_stage(other, "t1", refs[-1])
    a = read_table(Storage.from_config(cfg.storage), "directions", ["t1"])
    a = a.filter(pa.compute.field("checkpoint_step") == refs[-1].step)
    b = read_table(Storage.from_config(other.storage), "directions", ["t1"])
    assert a.sort_by([("layer", "ascending"), ("method", "ascending")]).equals(
        b.sort_by([("layer", "ascending"), ("method", "ascending")])
    )


def test_plasticity_grid_is_complete_and_alpha_zero_is_the_baseline(run):
    cfg, refs, _ = run
    storage = Storage.from_config(cfg.storage)
    table = read_table(storage, "plasticity", ["t1"]).to_pylist()
    steps = [r.step for r in refs]
    p = cfg.plasticity
    metrics = p.metrics
    n_dirs = len(steps) + p.null_seeds
    assert p.null_seeds >= 1
    assert len(table) == len(steps) * n_dirs * len(p.alphas) * len(metrics)
    real = [r for r in table if r["direction"] == p.method]
    nulls = [r for r in table if r["direction"] == "random"]
    assert {(r["source_step"], r["target_step"]) for r in real} == {(i, j) for i in steps for j in steps}
    assert {r["source_step"] for r in nulls} == {stages.NULL_SOURCE_STEP}
    assert {(r["target_step"], r["null_seed"]) for r in nulls} == {
        (j, k) for j in steps for k in range(p.null_seeds)
    }
    keys = [(r["source_step"], r["target_step"], r["null_seed"], r["alpha_rel"], r["metric"]) for r in table]
    assert len(keys) == len(set(keys))
    for r in table:
        assert r["n"] == 16
        if r["alpha_rel"] == 0:
            assert r["delta"] == 0 and r["value"] == r["baseline"]
        assert r["ci_low"] <= r["delta"] <= r["ci_high"]
        assert r["slope_ci_low"] <= r["slope"] <= r["slope_ci_high"]
        if r["metric"] in ("facts_accuracy", "truthfulqa_mc2", "pubmedqa_accuracy"):
            assert 0.0 <= r["value"] <= 1.0
    # Steering must move the metric somewhere in the grid.
    for metric in ("facts_logit_gap", "truthfulqa_mc2"):
        assert max(abs(r["delta"]) for r in table if r["metric"] == metric) > 1e-4, metric


def test_plasticity_items_agree_with_the_summary_rows(run):
    import numpy as np

    cfg, refs, _ = run
    storage = Storage.from_config(cfg.storage)
    summary = read_table(storage, "plasticity", ["t1"]).to_pylist()
    items = read_table(storage, "plasticity_items", ["t1"]).to_pylist()
    groups: dict = {}
    for r in items:
        key = (r["source_step"], r["target_step"], r["null_seed"], r["metric"])
        groups.setdefault(key, {}).setdefault(r["alpha_rel"], {})[r["item"]] = (r["delta"], r["item_slope"])
    assert len(groups) == len({(r["source_step"], r["target_step"], r["null_seed"], r["metric"]) for r in summary})
    for r in summary:
        by_item = groups[(r["source_step"], r["target_step"], r["null_seed"], r["metric"])]
        deltas = [d for d, _ in by_item[r["alpha_rel"]].values()]
        assert len(deltas) == r["n"]
        assert np.mean(deltas) == pytest.approx(r["delta"], abs=1e-12)
        # Each item's slope is its own least-squares fit over the alphas (np.polyfit).
        alphas = sorted(by_item)
        for item in range(r["n"]):
            ys = [by_item[a][item][0] for a in alphas]
            assert by_item[alphas[0]][item][1] == pytest.approx(np.polyfit(alphas, ys, 1)[0], abs=1e-9)
        slopes = [by_item[alphas[0]][i][1] for i in range(r["n"])]
        assert np.mean(slopes) == pytest.approx(r["slope"], abs=1e-9)


def test_vocab_topk_matches_brute_force(run):
    cfg, refs, _ = run
    storage = Storage.from_config(cfg.storage)
    from plasticity.train.checkpoint import load_checkpoint

    lm = load_checkpoint(storage, refs[-1].path, cfg.model)
    vecs = stages.load_vectors(storage, "t1", refs[-1].step, "honesty").tensors
    key = f"{cfg.plasticity.method}.1"
    scores = lm.adapter.unembedding_matrix(lm.model).detach().double() @ vecs[key].double()
    top = torch.topk(scores, cfg.vocab.top_k).indices.tolist()
    bottom = torch.topk(-scores, cfg.vocab.top_k).indices.tolist()
    table = read_table(storage, "vocab_topk", ["t1"])
    rows = [r for r in table.to_pylist() if r["checkpoint_step"] == refs[-1].step and r["layer"] == 1
            and r["object"] == f"direction_{cfg.plasticity.method}" and r["variant"] == "raw"]
    assert [r["token_id"] for r in sorted(rows, key=lambda r: r["rank"]) if r["sign"] == 1] == top
    assert [r["token_id"] for r in sorted(rows, key=lambda r: r["rank"]) if r["sign"] == -1] == bottom
    assert rows[0]["token"] == lm.tokenizer.decode([rows[0]["token_id"]])


def test_report_writes_stats_figures_and_summary(run):
    import numpy as np

    cfg, refs, _ = run
    stages.similarity_stage(cfg, "t1")
    result = stages.report_stage(cfg, "t1")
    storage = Storage.from_config(cfg.storage)
    for name in ("plasticity_matrix", "self_plasticity", "effect_vs_alpha", "detection_by_layer",
                 "direction_similarity"):
        png = storage.path("runs", "t1", "report", f"{name}.png")
        assert storage.read_bytes(png)[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = storage.read_bytes(storage.path("runs", "t1", "report", "summary.md")).decode()
    assert "Kruskal-Wallis" in summary and "| source \\ target |" in summary
    m = np.array(result.summary["matrix"])
    assert m.shape == (2, 2) and np.isfinite(m).all()
    # The slope of the mean effect is the least-squares fit of delta on alpha_rel.
    table = read_table(storage, "plasticity", ["t1"]).to_pylist()
    pts = [
        (r["alpha_rel"], r["delta"]) for r in table
        if r["source_step"] == 0 and r["target_step"] == 4 and r["metric"] == "facts_logit_gap"
    ]
    slope, _ = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
    assert float(m[0, 1]) == pytest.approx(float(slope), rel=1e-9)
    stats = read_table(storage, "plasticity_stats", ["t1"]).to_pylist()
    scopes = {(r["scope"], r["test"]) for r in stats}
    assert {("self", "kruskal"), ("self", "dunn"), ("self", "window"), ("target=0", "kruskal")} <= scopes
    assert all(0 <= r["p_value"] <= 1 and r["p_value"] <= r["p_adjusted"] + 1e-15 for r in stats)


def test_table_columns_match_the_design(run):
    cfg, _, _ = run
    storage = Storage.from_config(cfg.storage)
    stages.similarity_stage(cfg, "t1")
    stages.report_stage(cfg, "t1")
    for name in ("train_metrics", "checkpoints", "activations", "directions", "plasticity", "vocab_topk",
                 "direction_similarity", "plasticity_items", "plasticity_stats"):
        assert read_table(storage, name, ["t1"]).column_names == TABLES[name].column_names, name


def test_vector_files_carry_provenance_and_steer_another_model_of_the_same_width(run):
    cfg, refs, _ = run
    from plasticity.config import ModelConfig
    from plasticity.models import load_model
    from plasticity.steering import steer
    from plasticity.steering.vectors import read_vector_file

    storage = Storage.from_config(cfg.storage)
    vf = read_vector_file(storage.read_bytes(stages.vectors_path(storage, "t1", 4, "honesty")))
    for key in ("model", "checkpoint_step", "template", "user_tag", "dataset_sha256", "seed", "methods"):
        assert key in vf.metadata, key
    assert vf.metadata["checkpoint_step"] == "4" and vf.metadata["model"] == "tiny-gpt2"
    other = load_model(ModelConfig(source="tiny-llama"))  # a different architecture, same width
    vf.check_width(other.d_model)
    with steer(other, {1: vf.direction("pca", 1)}, 2.0):
        pass
    with pytest.raises(KeyError, match="no direction 'pca.9'"):
        vf.direction("pca", 9)
    with pytest.raises(ValueError, match="the vectors are 64 wide"):
        vf.check_width(576)


def test_one_sided_contrast_sets_are_refused(tiny_gpt2):
    from plasticity.config import ConceptConfig, ModelConfig
    from plasticity.data import Statement
    from plasticity.steering import contrast_pairs

    with pytest.raises(ValueError, match="no statements labelled 1"):
        contrast_pairs([Statement("The sky is green today and always.", 0)], tiny_gpt2.tokenizer,
                       ConceptConfig(), ModelConfig())
    with pytest.raises(ValueError, match="one-sided"):
        contrast_pairs([Statement("The sky is blue today and always.", 1)], tiny_gpt2.tokenizer,
                       ConceptConfig(negative="an honest"), ModelConfig())
    with pytest.raises(ValueError, match="no contrast pairs"):
        contrast_pairs([Statement("Yes.", 1)], tiny_gpt2.tokenizer, ConceptConfig(), ModelConfig())


def test_direction_similarity_is_the_cosine_of_each_pair_of_checkpoints(run):
    cfg, refs, _ = run
    storage = Storage.from_config(cfg.storage)
    stages.similarity_stage(cfg, "t1")
    sim = read_table(storage, "direction_similarity", ["t1"]).to_pylist()
    dirs = read_table(storage, "directions", ["t1"])
    steps = [r.step for r in refs]
    assert len(sim) == 4 * len(steps) ** 2  # every layer, every ordered pair
    for r in sim:
        a, _ = _direction(dirs, r["step_a"], r["layer"], cfg.plasticity.method)
        b, _ = _direction(dirs, r["step_b"], r["layer"], cfg.plasticity.method)
        assert r["cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-12)
        if r["step_a"] == r["step_b"]:
            assert r["cosine"] == pytest.approx(1.0, abs=1e-9)


def test_facts_items_are_label_balanced_and_held_out():
    from plasticity.config import config_from_dict
    from plasticity.steering.items import facts_items

    cfg = config_from_dict({"plasticity": {"n_items": 40}})
    held_back = set(range(0, 100))
    items = facts_items(cfg, held_back)
    assert len(items) == 40 and sum(s.label for s in items) == 20
    from plasticity.data import load_statements

    texts = {s.text for i, s in enumerate(load_statements()) if i in held_back}
    assert not texts & {s.text for s in items}


def test_another_concept_is_only_config(tmp_path):
    """A different concept: its own statements file, template and personas, no code."""
    from plasticity.config import load_config

    data = tmp_path / "moods.csv"
    lines = ["statement,label"] + [
        f"The weather in town number {i} was mild and pleasant for most of the long week.,1"
        for i in range(12)
    ]
    data.write_text("\n".join(lines) + "\n")
    cfg = load_config(
        ROOT / "configs/smoke.yaml",
        [f"storage.uri=file://{tmp_path}/s", "concept.name=mood", f"concept.dataset={data}",
         "concept.template='{user_tag} Imagine you are {persona} person. {assistant_tag} {prefix}'",
         "concept.positive=a cheerful", "concept.negative=a gloomy",
         "concept.max_pairs=30", "concept.n_train=20", "concept.layers=[1, 2]"],
    )
    lm = load_model(cfg.model)
    ref = CheckpointRef(step=0, path="-", sha256="-", n_params=0, bytes=0, created_at="-")
    stages.extract_stage(cfg, "m1", ref, lm)
    storage = Storage.from_config(cfg.storage)
    dirs = read_table(storage, "directions", ["m1"])
    assert set(dirs.column("concept").to_pylist()) == {"mood"}
    assert sorted(set(dirs.column("layer").to_pylist())) == [1, 2]
    vf = stages.load_vectors(storage, "m1", 0, "mood")
    assert vf.metadata["positive"] == "a cheerful" and "Imagine you are" in vf.metadata["template"]


def _copy_run(storage, src: str, dst: str) -> None:
    for path in storage.fs.find(storage.path("runs", src)):
        rel = path[len(storage.path("runs", src)) + 1 :]
        storage.write_bytes(storage.path("runs", dst, rel), storage.read_bytes(path))


@pytest.mark.parametrize("field,value,message", [
    ("tokenizer_sha256", "0" * 64, "another tokenizer"),
    ("d_model", "48", "wide"),
])
def test_sources_with_another_tokenizer_or_width_are_refused_before_compute(run, field, value, message):
    from safetensors.torch import save

    from plasticity.steering.vectors import read_vector_file

    cfg, refs, _ = run
    storage = Storage.from_config(cfg.storage)
    rid = f"mixed-{field}"
    _copy_run(storage, "t1", rid)
    path = stages.vectors_path(storage, rid, refs[-1].step, "honesty")
    vf = read_vector_file(storage.read_bytes(path))
    storage.write_bytes(path, save(vf.tensors, metadata={**vf.metadata, field: value}))
    with pytest.raises(ValueError, match=f"source step {refs[-1].step}: .*{message}"):
        stages.plasticity_stage(cfg, rid, refs[0], refs)
    assert not storage.fs.glob(storage.path("tables", "plasticity", f"run_id={rid}", "**"))


def test_report_command_regenerates_the_report_from_the_tables(run, capsys):
    from plasticity.cli import main
    from plasticity.storage.manifest import Manifest

    cfg, refs, _ = run
    storage = Storage.from_config(cfg.storage)
    Manifest(storage, "t1").open(cfg.to_dict())
    stages.similarity_stage(cfg, "t1")
    summary = storage.path("runs", "t1", "report", "summary.md")
    if storage.exists(summary):
        storage.fs.rm(summary)
    assert main(["report", "--run-id", "t1", "--storage", cfg.storage.uri]) == 0
    out = capsys.readouterr().out
    assert "Kruskal-Wallis" in out and "plasticity_matrix" in out
    assert storage.read_bytes(summary).decode().strip() in out
    assert main(["report", "--run-id", "nosuchrun", "--storage", cfg.storage.uri]) == 2
    assert "no run 'nosuchrun'" in capsys.readouterr().err


def test_training_time_intervention_with_lambda_zero_reproduces_the_final_model(run):
    import dataclasses

    cfg, refs, _ = run
    storage = Storage.from_config(cfg.storage)
    zero = dataclasses.replace(
        cfg, plasticity=dataclasses.replace(cfg.plasticity, modes=["training"], intervention_lambda=0.0)
    )
    stages.intervention_stage(zero, "t1", 0, refs)
    rows = read_table(storage, "intervention_items", ["t1"]).to_pylist()
    assert rows and all(r["delta"] == 0.0 for r in rows)  # the branch is the run itself
    summary = read_table(storage, "intervention", ["t1"]).to_pylist()
    assert all(r["final_loss"] == r["baseline_final_loss"] for r in summary)
    strong = dataclasses.replace(
        cfg, plasticity=dataclasses.replace(cfg.plasticity, modes=["training"], intervention_lambda=1.0,
                                            intervention_alpha=4.0)
    )
    result = stages.intervention_stage(strong, "t1", 0, refs)
    summary = read_table(storage, "intervention", ["t1"], paths=[result.shards[0]]).to_pylist()
    assert {r["metric"] for r in summary} == set(cfg.plasticity.metrics)
    assert all(r["intervention_step"] == 0 and r["layer"] == 3 for r in summary)
    assert summary[0]["final_loss"] != summary[0]["baseline_final_loss"]
    gap = next(r for r in summary if r["metric"] == "facts_logit_gap")
    assert gap["delta"] != 0 and gap["ci_low"] <= gap["delta"] <= gap["ci_high"]


def test_training_mode_needs_the_final_snapshot_and_snapshot_steps():
    from plasticity.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="must include train.max_steps=20"):
        config_from_dict({"plasticity": {"modes": ["training"]}, "train": {"snapshot_steps": [0, 10]}})
    with pytest.raises(ConfigError, match=r"intervention_steps: \[5, 20\] are not snapshot steps"):
        config_from_dict({"plasticity": {"modes": ["training"], "intervention_steps": [5, 20]},
                          "train": {"snapshot_steps": [0, 10, 20]}})


def test_report_shows_the_training_time_intervention(run):
    import dataclasses

    cfg, refs, _ = run
    storage = Storage.from_config(cfg.storage)
    both = dataclasses.replace(
        cfg, plasticity=dataclasses.replace(cfg.plasticity, modes=["matrix", "training"],
                                            intervention_alpha=4.0)
    )
    if not storage.fs.glob(storage.path("tables", "intervention", "run_id=t1", "*.parquet")):
        stages.intervention_stage(both, "t1", 0, refs)
    result = stages.report_stage(both, "t1")
    assert "intervention" in result.summary["figures"] and "plasticity_matrix" in result.summary["figures"]
    text = result.summary["markdown"]
    assert "## Training-time intervention" in text and "| 0 |" in text


def test_analysis_api_and_duckdb_read_the_plasticity_tables(run):
    import duckdb

    from plasticity.analysis import load

    cfg, refs, _ = run
    stages.similarity_stage(cfg, "t1")
    stages.report_stage(cfg, "t1")
    df = load("plasticity", cfg.storage.uri, ["t1"],
              filters={"metric": "facts_logit_gap", "direction": "pca", "target_step": [4]}, as_pandas=True)
    assert set(df["target_step"]) == {4} and set(df["metric"]) == {"facts_logit_gap"}
    assert len(df) == len(refs) * len(cfg.plasticity.alphas)
    with pytest.raises(ValueError, match="no column 'nope'"):
        load("plasticity", cfg.storage.uri, ["t1"], filters={"nope": 1})
    with pytest.raises(ValueError, match="unknown table 'plastic'"):
        load("plastic", cfg.storage.uri)
    root = cfg.storage.uri.removeprefix("file://")
    con = duckdb.connect()
    slopes = con.sql(
        f"SELECT source_step, target_step, any_value(slope) FROM read_parquet('{root}/tables/plasticity/**/*.parquet',"
        " hive_partitioning = true) WHERE run_id = 't1' AND metric = 'facts_logit_gap' AND direction = 'pca'"
        " GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    m = {(s, t): v for s, t, v in slopes}
    api = load("plasticity", cfg.storage.uri, ["t1"], filters={"metric": "facts_logit_gap", "direction": "pca"})
    for r in api.to_pylist():
        assert m[(r["source_step"], r["target_step"])] == r["slope"]
    for table in ("plasticity_stats", "direction_similarity", "plasticity_items"):
        n = con.sql(
            f"SELECT count(*) FROM read_parquet('{root}/tables/{table}/**/*.parquet', hive_partitioning = true)"
            " WHERE run_id = 't1'"
        ).fetchall()[0][0]
        assert n == load(table, cfg.storage.uri, ["t1"]).num_rows > 0, table


@pytest.mark.parametrize("browse_url", [None, "http://127.0.0.1:8000/"])
def test_the_summary_artefact_embeds_the_figures_and_names_every_file_and_table(run, browse_url):
    import base64
    import re

    from plasticity.analysis.artifact_page import artifact_markdown, run_files

    cfg, refs, _ = run
    stages.similarity_stage(cfg, "t1")
    result = stages.report_stage(cfg, "t1")
    storage = Storage.from_config(cfg.storage)
    shards = storage.fs.glob(storage.path("tables", "*", "run_id=t1", "**", "*.parquet"))
    md = artifact_markdown(storage, result.summary["markdown"], result.summary["figure_paths"],
                           run_files(storage, "t1"), "run_id", "t1", shards, browse_url)
    assert md.startswith(result.summary["markdown"].split("\n## Figures\n")[0])
    assert md.count("## Figures") == 1 and "- `plasticity_matrix.png`" not in md
    # Each figure inline, as the very PNG stored.
    images = dict(re.findall(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md))
    assert set(images) == set(result.summary["figure_paths"]) and len(images) >= 5
    for name, data in images.items():
        assert base64.b64decode(data) == storage.read_bytes(result.summary["figure_paths"][name])
    section = md[md.index("## In storage"):]
    if browse_url is None:
        where = re.findall(r"`(file://[^`]+)`", section)
        assert not re.search(r"\]\(", section)
        paths = [w[len("file://"):] for w in where]
    else:
        links = re.findall(r"\[([^\]]+)\]\(([^)]+)\)", section)
        assert all(url == browse_url + text for text, url in links)
        paths = [storage.path(text) for text, _ in links]
    # Every file and folder named exists; every table with this run's rows is listed
    # with its shard count.
    assert len(paths) >= 4 + len(images) + 5
    for p in paths:
        assert storage.exists(p.rstrip("/")), p
    counts = dict(re.findall(r"\| `(\w+)` \| (\d+) \|", section))
    on_disk = {}
    for p in shards:
        table = p.split("/tables/")[1].split("/")[0]
        on_disk[table] = on_disk.get(table, 0) + 1
    assert {t: int(n) for t, n in counts.items()} == on_disk
    assert {"plasticity", "activations", "train_metrics", "directions", "plasticity_stats"} <= set(on_disk)
