"""A study: one base run config and axes over config keys, expanded to runs.

A study file (``configs/study-*.yaml``)::

    name: study-smoke            # the study id, and the prefix of every run id
    base: smoke.yaml             # a run config file (relative to this file), or a mapping
    set:                         # overrides of the base, for every run (dotted keys)
      train.max_steps: 6
    axes:                        # the runs are every combination of one value per axis
      arch:                      # a bundle axis: each value sets several keys; `label`
        - {label: gpt2, model.source: tiny-gpt2}        # names it in the run ids
        - {label: llama, model.source: tiny-llama}
      seed: [0, 1]               # `seed` sets train.seed and model.seed
      train.lr: [1.0e-4, 3.0e-4] # an axis named by a config key sets that key
    max_concurrent: null         # runs at once (null: as many as the cores or GPUs allow)
    bootstrap: 2000              # hierarchical bootstrap resamples of the study statistics
    seed: 0                      # seed of those resamples

Run ids are ``<name>-<label>-<label>...`` in axis order (``study-smoke-gpt2-s0``): the
label of a seed is ``s<seed>``, of a config-key value the value itself (a folder's last
part for a path), of a bundle its `label`. A run's *group* is the labels of every axis
but `seed`: runs of one group differ only by seed and are its replicates.

`seed` sets the training seed (data order, dropout) and the init seed of the offline
tiny presets; the concept and plasticity seeds stay those of the base, so every run of
a study is scored on the same items against the same null directions.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plasticity.config import ConfigError, RunConfig, config_from_dict, validate_run_id

STUDY_KEYS = ("name", "description", "base", "set", "axes", "max_concurrent", "bootstrap", "seed")
SEED_AXIS = "seed"
SEED_KEYS = ("train.seed", "model.seed")
_LABEL_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class StudyRun:
    """One run of a study: its id, resolved config and where it sits on the axes."""

    run_id: str
    config: RunConfig
    labels: dict[str, str]
    values: dict[str, Any]
    group: str
    seed: int | None


@dataclass(frozen=True)
class Study:
    study_id: str
    spec: dict[str, Any]  # self-contained: the base is inlined, overrides applied
    runs: list[StudyRun] = field(default_factory=list)
    max_concurrent: int | None = None
    bootstrap: int = 2000
    seed: int = 0

    @property
    def storage(self):
        return self.runs[0].config.storage

    def run(self, run_id: str) -> StudyRun:
        for r in self.runs:
            if r.run_id == run_id:
                return r
        raise KeyError(f"study {self.study_id} has no run {run_id!r}")


def set_dotted(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set `a.b.c` in a nested mapping, creating sections; name `where` on a bad key."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError([f"{where}: malformed key {key!r}"])
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError([f"{where}: {p} is not a section (in {key!r})"])
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _label(value: Any) -> str:
    if isinstance(value, str):
        text = value.rstrip("/").rsplit("/", 1)[-1] if "/" in value else value
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = json.dumps(value, sort_keys=True)
    return _LABEL_BAD.sub("_", text).strip("_") or "x"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _axis_values(name: str, values: Any, errors: list[str]) -> list[tuple[str, dict[str, Any], Any]]:
    """(label, overrides, value as written) of every value of one axis."""
    where = f"axes.{name}"
    if not isinstance(values, list) or not values:
        errors.append(f"{where}: expected a non-empty list of values, got {values!r}")
        return []
    seen: dict[str, int] = {}
    out = []
    for i, value in enumerate(values):
        key = _canonical(value)
        if key in seen:
            errors.append(f"{where}: value {value!r} appears twice (items {seen[key]} and {i})")
            continue
        seen[key] = i
        if name == SEED_AXIS:
            if not isinstance(value, int) or isinstance(value, bool):
                errors.append(f"{where}[{i}]: expected an integer seed, got {value!r}")
                continue
            out.append((f"s{value}", {k: value for k in SEED_KEYS}, value))
        elif "." in name:
            out.append((_label(value), {name: value}, value))
        else:
            if not isinstance(value, dict) or not value:
                errors.append(
                    f"{where}[{i}]: an axis that is not a config key (like train.lr) or 'seed' "
                    f"takes mappings of config keys, e.g. {{label: a, model.source: tiny-gpt2}}; "
                    f"got {value!r}"
                )
                continue
            sets = {k: v for k, v in value.items() if k != "label"}
            if not sets:
                errors.append(f"{where}[{i}]: sets no config key")
                continue
            label = value.get("label")
            label = _label(label) if label is not None else "-".join(_label(v) for v in sets.values())
            out.append((label, sets, value))
    labels = [lab for lab, _, _ in out]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        errors.append(f"{where}: values with the same label {dup} (give them distinct labels)")
    return out


def _read_base(base: Any, folder: Path | None, errors: list[str]) -> dict[str, Any] | None:
    if isinstance(base, dict):
        return copy.deepcopy(base)
    if not isinstance(base, str) or not base:
        errors.append(f"base: expected a run config file or a mapping, got {base!r}")
        return None
    path = Path(base).expanduser()
    if not path.is_absolute() and folder is not None and (folder / path).is_file():
        path = folder / path
    if not path.is_file():
        errors.append(f"base: run config file not found: {base}")
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        errors.append(f"base: {path} is not valid YAML: {exc}")
        return None
    if not isinstance(data, dict):
        errors.append(f"base: expected a mapping at the top level of {path}")
        return None
    return data


def resolve_spec(
    data: Any,
    folder: Path | None = None,
    overrides: dict[str, Any] | None = None,
    study_id: str | None = None,
) -> dict[str, Any]:
    """A study mapping made self-contained: the base read and inlined, `set` and
    `overrides` (dotted key -> value, from the command line) applied to it."""
    if not isinstance(data, dict):
        raise ConfigError([f"study: expected a mapping at the top level, got {type(data).__name__}"])
    errors = [
        f"{k}: unknown key (known keys here: {', '.join(STUDY_KEYS)})" for k in data if k not in STUDY_KEYS
    ]
    for key in ("name", "base", "axes"):
        if key not in data:
            errors.append(f"{key}: missing (a study needs a name, a base run config and axes)")
    if errors:
        raise ConfigError(errors)
    base = _read_base(data["base"], folder, errors)
    sets = data.get("set") or {}
    if not isinstance(sets, dict):
        errors.append(f"set: expected a mapping of config keys to values, got {sets!r}")
        sets = {}
    if errors:
        raise ConfigError(errors)
    for key, value in {**sets, **(overrides or {})}.items():
        set_dotted(base, str(key), value, "set" if key in sets else "--set")
    spec = {k: copy.deepcopy(v) for k, v in data.items() if k not in ("base", "set")}
    spec["base"] = base
    if study_id is not None:
        spec["name"] = study_id
    return spec


def expand(spec: dict[str, Any]) -> Study:
    """Every run of a resolved study, each config validated; raise ConfigError naming
    every problem (unknown keys, bad values, empty or duplicate axes, colliding run ids)."""
    errors: list[str] = []
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError([f"name: expected a non-empty string, got {name!r}"])
    try:
        validate_run_id(name)
    except ConfigError as exc:
        errors += [e.replace("run_id:", "name:", 1) for e in exc.errors]
    axes = spec.get("axes")
    if not isinstance(axes, dict) or not axes:
        errors.append(f"axes: expected a mapping of at least one axis to its values, got {axes!r}")
        raise ConfigError(errors)
    for axis in axes:
        if str(axis).split(".")[0] == "storage":
            errors.append(f"axes.{axis}: the runs of a study share one storage root")
        if str(axis) == "name":
            errors.append("axes.name: run names come from the study")
    max_concurrent = spec.get("max_concurrent")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        errors.append(f"max_concurrent: expected a positive integer or null, got {max_concurrent!r}")
    bootstrap = spec.get("bootstrap", 2000)
    if not isinstance(bootstrap, int) or bootstrap < 100:
        errors.append(f"bootstrap: expected an integer >= 100, got {bootstrap!r}")
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        errors.append(f"seed: expected an integer, got {seed!r}")
    values = {axis: _axis_values(str(axis), vals, errors) for axis, vals in axes.items()}
    if errors:
        raise ConfigError(errors)
    combos: list[list[tuple[str, str, dict[str, Any], Any]]] = [[]]
    for axis, vals in values.items():
        combos = [c + [(axis, lab, sets, raw)] for c in combos for lab, sets, raw in vals]
    runs: list[StudyRun] = []
    by_id: dict[str, list[str]] = {}
    for combo in combos:
        run_id = "-".join([name] + [lab for _, lab, _, _ in combo])
        data = copy.deepcopy(spec["base"])
        data["name"] = run_id
        described = ", ".join(f"{axis}={lab}" for axis, lab, _, _ in combo)
        by_id.setdefault(run_id, []).append(described)
        try:
            for axis, _, sets, _ in combo:
                for key, value in sets.items():
                    set_dotted(data, key, value, f"axes.{axis}")
            validate_run_id(run_id)
            cfg = config_from_dict(data)
        except ConfigError as exc:
            errors += [f"run {run_id} ({described}): {e}" for e in exc.errors]
            continue
        labels = {axis: lab for axis, lab, _, _ in combo}
        group = "-".join(lab for axis, lab, _, _ in combo if axis != SEED_AXIS) or "all"
        seed_value = next((raw for axis, _, _, raw in combo if axis == SEED_AXIS), None)
        runs.append(StudyRun(run_id, cfg, labels, {a: raw for a, _, _, raw in combo}, group, seed_value))
    for run_id, where in by_id.items():
        if len(where) > 1:
            errors.append(f"run id {run_id!r} is made by {len(where)} runs ({'; '.join(where)}): "
                          "give the axis values distinct labels")
    if runs and len({r.config.storage.uri for r in runs}) > 1:
        errors.append("storage.uri: the runs of a study share one storage root")
    if errors:
        raise ConfigError(errors)
    return Study(study_id=name, spec=spec, runs=runs, max_concurrent=max_concurrent,
                 bootstrap=bootstrap, seed=seed)


def load_study(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    study_id: str | None = None,
) -> Study:
    """Read, resolve and expand a study file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"study: file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"study: {path} is not valid YAML: {exc}"]) from exc
    return expand(resolve_spec(data, path.parent, overrides, study_id))


def preflight_study(study: Study) -> list[str]:
    """The cheap checks of every run against the world (data files, layers), each error
    prefixed with its run."""
    from plasticity.preflight import preflight

    return [f"run {r.run_id}: {e}" for r in study.runs for e in preflight(r.config)]


def check_existing_runs(study: Study, storage) -> list[str]:
    """Runs of the study that exist already under another config (refused, as a rerun of
    one run id with another config is)."""
    from plasticity.storage.manifest import ConfigMismatchError, Manifest

    errors = []
    for r in study.runs:
        try:
            Manifest(storage, r.run_id).check_config(r.config.to_dict())
        except ConfigMismatchError as exc:
            errors.append(str(exc))
    return errors
