"""Studies: expansion of a study file into runs, refusal of bad studies, the statistics
with runs as the unit, and the study report on synthetic tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from plasticity.config import ConfigError
from plasticity.study.spec import expand, load_study, resolve_spec
from plasticity.study.stats import (
    compare,
    critical_windows,
    friedman,
    hierarchical_bootstrap,
    holm,
)

ROOT = Path(__file__).resolve().parents[2]


def _study(tmp_path: Path, **fields) -> Path:
    data = {"name": "st", "base": str(ROOT / "configs/smoke.yaml"),
            "axes": {"arch": [{"label": "gpt2", "model.source": "tiny-gpt2"},
                              {"label": "llama", "model.source": "tiny-llama"}],
                     "seed": [0, 1]}}
    data.update(fields)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_every_shipped_study_config_expands():
    files = sorted((ROOT / "configs").glob("study-*.yaml"))
    assert files
    for f in files:
        study = load_study(f)
        assert len(study.runs) >= 4, f


def test_axes_expand_to_readable_runs_with_groups_and_seeds(tmp_path):
    study = load_study(_study(tmp_path, set={"train.lr": 2e-3}))
    assert [r.run_id for r in study.runs] == ["st-gpt2-s0", "st-gpt2-s1", "st-llama-s0", "st-llama-s1"]
    assert [r.group for r in study.runs] == ["gpt2", "gpt2", "llama", "llama"]
    r = study.run("st-llama-s1")
    assert r.config.model.source == "tiny-llama" and r.seed == 1
    assert r.config.train.seed == 1 and r.config.model.seed == 1
    # The items and nulls are the base's in every run.
    assert {x.config.plasticity.seed for x in study.runs} == {0}
    assert {x.config.train.lr for x in study.runs} == {2e-3}
    assert r.config.name == "st-llama-s1"
    # Config-key axes label runs by value; a path by its last part.
    study = expand(resolve_spec({"name": "lr", "base": {}, "axes": {
        "train.lr": [1e-4, 3e-4], "data.corpus": ["/data/a/pubmed.parquet", "e2e"]}}))
    assert [r.run_id for r in study.runs] == [
        "lr-0.0001-pubmed.parquet", "lr-0.0001-e2e", "lr-0.0003-pubmed.parquet", "lr-0.0003-e2e"]
    assert study.runs[0].config.train.lr == 1e-4 and study.runs[0].seed is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"axes": {"seed": []}}, r"axes\.seed: expected a non-empty list"),
        ({"axes": {"seed": [0, 1, 0]}}, r"axes\.seed: value 0 appears twice"),
        ({"axes": {"train.learning_rate": [1e-4, 2e-4]}},
         r"run st-0\.0001 \(train\.learning_rate=0\.0001\): train\.learning_rate: unknown key"),
        ({"axes": {"train.lr": [-1.0, 1e-4]}}, r"train\.lr: expected a positive number"),
        ({"axes": {"model.source": ["/a/x", "/b/x"]}}, r"axes\.model\.source: values with the same label \['x'\]"),
        ({"axes": {"a": [{"label": "p-q", "train.lr": 1e-4}, {"label": "p", "train.lr": 2e-4}],
                   "b": [{"label": "r", "train.seed": 1}, {"label": "q-r", "train.seed": 2}]}},
         r"run id 'st-p-q-r' is made by 2 runs \(a=p-q, b=r; a=p, b=q-r\)"),
        ({"axes": {"arch": [{"label": "m", "model.source": "tiny-gpt2"},
                            {"label": "m", "model.source": "tiny-llama"}]}},
         r"axes\.arch: values with the same label \['m'\]"),
        ({"axes": {"arch": ["tiny-gpt2"]}}, r"axes\.arch\[0\]: an axis that is not a config key"),
        ({"axes": {"storage.uri": ["file:///a", "file:///b"]}}, r"share one storage root"),
        ({"axes": {}}, r"axes: expected a mapping of at least one axis"),
        ({"name": "a/b"}, r"name: 'a/b' may only contain"),
        ({"seeds": [0, 1]}, r"seeds: unknown key"),
        ({"max_concurrent": 0}, r"max_concurrent: expected a positive integer"),
        ({"base": "missing.yaml"}, r"base: run config file not found"),
    ],
)
def test_bad_studies_are_refused_with_the_cause(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_study(_study(tmp_path, **fields))


def test_a_bad_study_exits_2_before_any_work_and_writes_nothing(tmp_path, capsys):
    from plasticity.cli import main

    store = tmp_path / "store"
    bad = _study(tmp_path, axes={"seed": [0, 0]})
    assert main(["study", "run", "--config", str(bad), "--storage", f"file://{store}"]) == 2
    assert "value 0 appears twice" in capsys.readouterr().err
    bad = _study(tmp_path, axes={"seed": [0, 1], "concept.layers": [[0, 9]]})
    assert main(["study", "run", "--config", str(bad), "--storage", f"file://{store}"]) == 2
    err = capsys.readouterr().err
    assert "run st-s0-0_9: concept.layers: layers [9] are outside the model's 0..3" in err
    assert not store.exists()
    good = _study(tmp_path)
    assert main(["study", "validate", "--config", str(good), "--storage", f"file://{store}"]) == 0
    assert "4 runs in 2 groups" in capsys.readouterr().out
    assert not store.exists()


# -- statistics -----------------------------------------------------------------------------


def test_hierarchical_bootstrap_covers_the_mean_when_seeds_vary():
    """Runs with a random offset each (seed variance) and noisy items: the two-stage
    bootstrap's 95% CI covers the true mean about 95% of the time, the item bootstrap
    that pools the runs does not."""
    from plasticity.analysis.stats import bootstrap_mean_ci

    rng = np.random.default_rng(1)
    covered = pooled = 0
    trials = 200
    for t in range(trials):
        runs = [rng.normal(0.0, 1.0) + rng.normal(0.0, 1.0, 30) for _ in range(8)]
        _, lo, hi = hierarchical_bootstrap(runs, 400, seed=t)
        covered += lo <= 0.0 <= hi
        plo, phi = bootstrap_mean_ci(np.concatenate(runs), 400, seed=t)
        pooled += plo <= 0.0 <= phi
    assert 0.85 <= covered / trials <= 0.99
    assert pooled / trials < 0.6


def test_hierarchical_bootstrap_point_and_degenerate_cases():
    runs = [np.array([1.0, 2.0, 3.0]), np.array([10.0])]
    mean, lo, hi = hierarchical_bootstrap(runs, 1000, seed=0)
    assert mean == pytest.approx((2.0 + 10.0) / 2)
    assert lo < mean < hi and lo >= 1.0 and hi <= 10.0
    same = [np.full(5, 0.5), np.full(7, 0.5)]
    assert hierarchical_bootstrap(same, 200, 0) == pytest.approx((0.5, 0.5, 0.5))
    assert np.isnan(hierarchical_bootstrap([], 200, 0)[0])
    # One run: the item bootstrap of that run.
    one = [np.random.default_rng(0).normal(size=50)]
    _, lo1, hi1 = hierarchical_bootstrap(one, 4000, 0)
    se = one[0].std(ddof=1) / np.sqrt(50)
    assert hi1 - lo1 == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_friedman_against_its_formula():
    x = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0], [1.0, 3.0, 2.0, 4.0]])
    n, k = x.shape
    ranks = np.argsort(np.argsort(x, axis=1), axis=1) + 1
    chi2 = 12.0 / (n * k * (k + 1)) * (ranks.sum(0) ** 2).sum() - 3 * n * (k + 1)
    from scipy.stats import chi2 as chi2_dist

    stat, p = friedman(x)
    assert stat == pytest.approx(chi2) and p == pytest.approx(chi2_dist.sf(chi2, k - 1))
    assert all(np.isnan(v) for v in friedman(x[:1]))
    assert all(np.isnan(v) for v in friedman(x[:, :2]))


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([0.2, float("nan"), 0.01])
    assert out[0] == pytest.approx(0.2) and np.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_a_window_is_called_only_when_every_run_shows_it():
    rng = np.random.default_rng(0)
    fr = [0.0, 0.5, 1.0]

    def study(bumps):
        items = [[rng.normal(0, 0.05, 40) + (1.0 if (b and s == 1) else 0.0) for s in range(3)] for b in bumps]
        means = np.array([[x.mean() for x in run] for run in items])
        comps = {(fr[1], fr[o]): compare(fr[1], fr[o], [r[1] for r in items], [r[o] for r in items], 500, 0)
                 for o in (0, 2)}
        return critical_windows(fr, means, comps)

    assert study([True, True, True]) == [False, True, False]
    assert study([True, True, False]) == [False, False, False]
    assert study([False, False, False]) == [False, False, False]


def test_paired_comparison_agrees_with_a_direct_computation():
    rng = np.random.default_rng(3)
    a = [rng.normal(1.0, 0.3, 20) for _ in range(4)]
    b = [x - 0.5 + rng.normal(0, 0.1, 20) for x in a]
    c = compare(0.0, 0.5, a, b, 2000, 0)
    per_run = np.array([(x - y).mean() for x, y in zip(a, b, strict=True)])
    from scipy import stats

    assert c.diff == pytest.approx(per_run.mean())
    assert c.t == pytest.approx(stats.ttest_rel([x.mean() for x in a], [y.mean() for y in b]).statistic)
    assert c.n_agree == 4 and c.ci_low > 0


# -- the study report on synthetic tables ------------------------------------------------


def _write_run(storage, run_id, max_steps, steps, self_slope, seed, n_items=24):
    """plasticity_items of one fake run: cell (i, j) has item slopes around
    self_slope[i] on the diagonal and 0.1 elsewhere; two null seeds around 0."""
    from plasticity.storage.shards import Rows, write_shard

    rng = np.random.default_rng(seed)
    for i, src in enumerate(steps + [-1]):
        rows = Rows("plasticity_items")
        for j, tgt in enumerate(steps):
            for null_seed in ([0, 1] if src == -1 else [None]):
                centre = 0.0 if src == -1 else (self_slope[i] if i == j else 0.1)
                for item, v in enumerate(centre + rng.normal(0, 0.02, n_items)):
                    rows.add(target_step=tgt, concept="honesty", direction="random" if src == -1 else "pca",
                             null_seed=null_seed, layers="2", operator="add", metric="facts_logit_gap",
                             item=item, alpha_rel=0.0, value=0.0, baseline=0.0, delta=0.0,
                             item_slope=float(v))
        write_shard(storage, "plasticity_items", {"run_id": run_id, "source_step": src}, "t", rows.columns)


def test_study_report_lines_up_fractions_and_finds_a_shared_drop(tmp_path):
    from plasticity.config import StorageConfig
    from plasticity.storage import Storage, read_table
    from plasticity.storage.shards import Rows, write_shard
    from plasticity.study.report import build_study_report, read_study_table

    storage = Storage.from_config(StorageConfig(uri=f"file://{tmp_path}"))
    runs = Rows("study_runs")
    # Group a trains 8 steps, group b 10: both have checkpoints at 0, 0.5 and 1.
    for group, max_steps, steps in (("a", 8, [0, 2, 4, 6, 8]), ("b", 10, [0, 5, 10])):
        for seed in range(3):
            run_id = f"s-{group}-s{seed}"
            # A drop after the base in every seed, and a window at 0.5 only in group a.
            slopes = [1.0, 0.4, 0.3] if group == "b" else [1.0, 0.3, 0.7, 0.4, 0.35]
            _write_run(storage, run_id, max_steps, steps, [x + 0.05 * seed for x in slopes], seed)
            runs.add(run_id=run_id, group=group, seed=seed, axes="{}", model="m", concept="honesty",
                     method="pca", metric="facts_logit_gap", layers="2", operator="add",
                     max_steps=max_steps, snapshot_steps=steps, status="done", error=None)
    runs.add(run_id="s-b-s9", group="b", seed=9, axes="{}", model="m", concept="honesty", method="pca",
             metric="facts_logit_gap", layers="2", operator="add", max_steps=10,
             snapshot_steps=[0, 5, 10], status="failed", error="RuntimeError: boom")
    write_shard(storage, "study_runs", {"study_id": "s"}, "runs", runs.columns)
    rep = build_study_report(storage, "s", 500, 0)

    plas = read_study_table(storage, "study_plasticity", "s").to_pylist()
    assert {(r["group"], r["source_fraction"]) for r in plas} == {
        ("a", f) for f in (0.0, 0.25, 0.5, 0.75, 1.0)} | {("b", f) for f in (0.0, 0.5, 1.0)}
    items = read_table(storage, "plasticity_items", ["s-a-s0", "s-a-s1", "s-a-s2"]).to_pylist()
    want = np.mean([np.mean([r["item_slope"] for r in items if r["run_id"] == rid and r["source_step"] == 4
                             and r["target_step"] == 4]) for rid in ("s-a-s0", "s-a-s1", "s-a-s2")])
    cell = next(r for r in plas if r["group"] == "a" and r["source_fraction"] == 0.5 and r["target_fraction"] == 0.5)
    assert cell["slope"] == pytest.approx(want) and cell["n_runs"] == 3
    assert cell["ci_low"] < cell["slope"] < cell["ci_high"]
    assert cell["null_slope"] == pytest.approx(0.0, abs=0.02) and cell["runs_above_null"] == 3
    assert cell["above_null_ci_low"] > 0
    stats = read_study_table(storage, "study_stats", "s").to_pylist()
    base = {r["group"]: r for r in stats if r["test"] == "base" and r["fraction_b"] == 0.5}
    assert set(base) == {"a", "b"}
    assert all(b["diff"] > 0 and b["ci_low"] > 0 and b["n_agree"] == 3 for b in base.values())
    windows = {(r["group"], r["fraction_a"]) for r in stats if r["test"] == "window" and r["critical_window"]}
    assert windows == {("a", 0.5)}
    assert "Critical windows (above both neighbours in every run, both CIs above 0): 0.5." in rep.markdown
    assert "the drop after the base checkpoint survives seed variance" in rep.markdown
    assert "falls in every group" in rep.markdown
    assert "| `s-b-s9` | b | 9 | failed: RuntimeError: boom |" in rep.markdown
    assert set(rep.figures) == {"self_plasticity", "plasticity_matrix"}
    assert storage.exists(storage.path("studies", "s", "report", "summary.md"))

    # Its artefact: the figures inline, the report and the study tables in storage.
    from plasticity.analysis.artifact_page import artifact_markdown, study_files

    shards = storage.fs.glob(storage.path("tables", "*", "study_id=s", "*.parquet"))
    run_ids = [f"s-{g}-s{i}" for g in "ab" for i in range(3)]
    page = artifact_markdown(storage, rep.markdown, rep.figure_paths, study_files(storage, "s", run_ids),
                             "study_id", "s", shards, "https://minio.lab/browser/runs/")
    assert page.count("](data:image/png;base64,") == 2 and page.count("## Figures") == 1
    assert "Tables: " not in page  # the summary's closing lines give way to the section
    assert "| this report (Markdown) | [studies/s/report/summary.md](https://minio.lab/browser/runs/studies/s/report/summary.md) |" in page
    for table in ("study_runs", "study_plasticity", "study_stats"):
        assert (f"| `{table}` | 1 | [tables/{table}/study_id=s/]"
                f"(https://minio.lab/browser/runs/tables/{table}/study_id=s/) |") in page
    assert "filters={'study_id': 's'}" in page


def test_a_drop_is_called_held_only_with_its_ci_every_run_and_the_paired_test():
    from types import SimpleNamespace

    from plasticity.study.report import _held

    c = SimpleNamespace(ci_low=-4.1, ci_high=-2.4, n_agree=3, n_runs=3)
    assert _held(c, 0.01) == "held"
    assert _held(c, 0.216) == "ci only"  # the quick study's Gemma arm: 3 runs, p_holm 0.216
    assert _held(c, float("nan")) == "ci only"
    assert _held(SimpleNamespace(ci_low=-1.0, ci_high=0.5, n_agree=3, n_runs=3), 0.001) == "no"
    assert _held(SimpleNamespace(ci_low=1.0, ci_high=2.0, n_agree=2, n_runs=3), 0.001) == "no"
