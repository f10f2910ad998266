from pathlib import Path

import pytest

from plasticity.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    field_docs,
    load_config,
    validate_run_id,
)
from plasticity.preflight import preflight

# Run configs; study files (study-*.yaml) are checked in test_study.
CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")
    if not p.name.startswith("study-")
)


def test_defaults_are_valid():
    cfg = config_from_dict({})
    assert cfg == RunConfig()
    assert cfg.train.snapshot_steps == [0, 10, 20]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_passes_preflight(path):
    cfg = load_config(path)
    assert preflight(cfg) == []
    assert len(cfg.train.snapshot_steps) >= 2
    assert 0.0 in cfg.plasticity.alphas


def test_shipped_configs_cover_the_targets():
    names = {p.stem for p in CONFIGS}
    assert {"smoke", "quick", "gpt2-medium", "biogpt"} <= names


def test_negative_lr_names_the_field():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"train": {"lr": -1}})
    assert exc.value.errors == ["train.lr: expected a positive number, got -1"]


def test_unknown_keys_are_named_at_every_level():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"trian": {}, "model": {"sorce": "x"}})
    text = str(exc.value)
    assert "trian: unknown key" in text
    assert "model.sorce: unknown key" in text


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"max_steps": "ten"}}, "train.max_steps: expected an integer, got 'ten'"),
        ({"train": {"max_steps": True}}, "train.max_steps: expected an integer, got True"),
        ({"train": {"snapshot_steps": [0, "5"]}}, "train.snapshot_steps[1]: expected an integer"),
        ({"train": {"optimizer": "sgd"}}, "train.optimizer: expected one of 'adamw4bit', 'adamw'"),
        ({"train": {"second_moment": "rank2"}}, "train.second_moment: expected one of 'rank1'"),
        ({"train": {"block_size": 127}}, "train.block_size: expected an even number"),
        ({"train": {"min_quantized_numel": -1}}, "train.min_quantized_numel: expected a number >= 0"),
        ({"plasticity": {"alphas": []}}, "plasticity.alphas: expected a non-empty value"),
        ({"plasticity": {"alphas": [1.0, 2.0]}}, "plasticity.alphas: must include 0"),
        ({"train": {"max_steps": 5, "snapshot_steps": [0, 10]}}, "beyond train.max_steps=5"),
        ({"concept": {"max_pairs": 10, "n_train": 10}}, "concept.n_train: must be below"),
        ({"storage": {"uri": "ftp://x"}}, "storage.uri: expected file://PATH or s3://"),
        ({"model": "tiny"}, "model: expected a mapping"),
        ({"concept": {"layers": [-1]}}, "concept.layers: expected values >= 0"),
        ({"plasticity": {"layers": [[1], []]}}, "plasticity.layers: expected every layer set to be non-empty"),
        ({"plasticity": {"layers": [[1], [-2]]}}, "plasticity.layers: expected layers >= 0, got [-2]"),
        ({"plasticity": {"layers": [[1], "x"]}}, "plasticity.layers: expected a list of an integer or a list of"),
        ({"plasticity": {"operators": ["add", "add"]}}, "plasticity.operators: duplicate operators"),
        ({"plasticity": {"operators": ["scale"]}}, "plasticity.operators[0]: expected one of 'add'"),
        ({"plasticity": {"null_seeds": -1}}, "plasticity.null_seeds: expected a number >= 0"),
    ],
)
def test_bad_values_are_rejected_with_the_field(data, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    assert message in str(exc.value)


def test_ints_are_accepted_for_floats_and_kept_as_floats():
    cfg = config_from_dict({"train": {"lr": 1}, "plasticity": {"alphas": [0, 1]}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.plasticity.alphas == [0.0, 1.0]


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides({"train": {"lr": 1e-3}}, ["train.lr=2e-4", "plasticity.alphas=[0, 1]"])
    assert data == {"train": {"lr": "2e-4"}, "plasticity": {"alphas": [0, 1]}}
    # YAML 1.1 leaves "2e-4" a string; the float field takes it as a number.
    assert config_from_dict(data).train.lr == 2e-4
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="is not valid YAML.*quote it"):
        apply_overrides({}, ["concept.template={persona} says: {prefix}"])


def test_load_config_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_preflight_catches_layers_outside_the_model_and_missing_files():
    cfg = config_from_dict(
        {"concept": {"layers": [0, 9]}, "plasticity": {"layers": [2]}, "data": {"corpus": "/no/file.txt"}}
    )
    errors = preflight(cfg)
    assert any("concept.layers: layers [9] are outside the model's 0..3" in e for e in errors)
    assert any("plasticity.layers: layers [2] are steered but not extracted" in e for e in errors)
    assert any(e.startswith("data.corpus:") for e in errors)


def test_preflight_catches_circuit_heads_outside_the_model(tmp_path):
    # Gemma 3 270M has 4 heads: the quick config's heads [0, 3, 6] fail before any work.
    cfg = config_from_dict({"model": {"source": "gemma3-270m"}, "vocab": {"circuit_heads": [0, 3, 6]}})
    assert "vocab.circuit_heads: heads [6] are outside the model's 0..3" in preflight(cfg)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"num_attention_heads": 2, "num_hidden_layers": 4}')
    cfg = config_from_dict({"model": {"source": str(folder)}, "vocab": {"circuit_heads": [1, 2]}})
    assert "vocab.circuit_heads: heads [2] are outside the model's 0..1" in preflight(cfg)
    cfg = config_from_dict({"model": {"source": "smollm2-135m"}, "vocab": {"circuit_heads": [0, 3, 6]}})
    assert not [e for e in preflight(cfg) if e.startswith("vocab.circuit_heads")]
    # Without circuits the heads are not read (the quick study's Gemma arm).
    cfg = config_from_dict({"model": {"source": "gemma3-270m"},
                            "vocab": {"circuit_heads": [0, 3, 6], "circuits": []}})
    assert not [e for e in preflight(cfg) if e.startswith("vocab.circuit_heads")]


@pytest.mark.parametrize("run_id", ["../x", "a/b", "", ".hidden", "x" * 200, "a b"])
def test_run_ids_with_path_characters_are_refused(run_id):
    with pytest.raises(ConfigError, match="run_id"):
        validate_run_id(run_id)


def test_good_run_id_passes():
    assert validate_run_id("smoke-20261127.1_a") == "smoke-20261127.1_a"


def test_every_field_has_a_docstring():
    docs = field_docs()
    assert "train.lr" in docs and "storage.endpoint_url" in docs
    assert all(docs.values()), [k for k, v in docs.items() if not v]


def test_layer_sets_are_one_list_or_a_list_of_lists():
    from plasticity.config import layer_sets

    one = config_from_dict({"plasticity": {"layers": [2, 3]}})
    many = config_from_dict({"plasticity": {"layers": [[1], [2, 3]]}})
    assert layer_sets(one.plasticity.layers) == [[2, 3]]
    assert layer_sets(many.plasticity.layers) == [[1], [2], [3]][:1] + [[2, 3]]
    assert layer_sets(None) is None
    # Every steered layer of every set is checked against the model and the extraction.
    cfg = config_from_dict({"concept": {"layers": [1, 2]}, "plasticity": {"layers": [[1], [2, 7]]}})
    errors = preflight(cfg)
    assert any("plasticity.layers: layers [7] are outside the model's 0..3" in e for e in errors)


def test_browse_url_must_be_a_web_address():
    assert config_from_dict({"storage": {"browse_url": "https://minio.lab:9001/browser/runs/"}}
                            ).storage.browse_url == "https://minio.lab:9001/browser/runs/"
    assert config_from_dict({}).storage.browse_url is None
    for bad in ("s3://bucket/runs", "file:///data/runs", "minio:9001"):
        with pytest.raises(ConfigError, match=r"storage\.browse_url: expected an http:// or https:// address"):
            config_from_dict({"storage": {"browse_url": bad}})
