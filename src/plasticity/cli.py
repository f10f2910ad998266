"""`plasticity` command line: run the timeline, validate a config, report on a run; run,
validate or report a study."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys

from plasticity.config import ConfigError, RunConfig, load_config, validate_run_id
from plasticity.preflight import preflight

EXIT_BAD_INPUT = 2


def _load(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set or [])
    if getattr(args, "storage", None):
        overrides.append(f"storage.uri={args.storage}")
    cfg = load_config(args.config, overrides)
    errors = preflight(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"{args.config}: valid ({cfg.name}: model {cfg.model.source}, "
          f"{len(cfg.train.snapshot_steps)} snapshots, storage {cfg.storage.uri})")
    if args.show:
        print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    run_id = args.run_id or f"{cfg.name}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    validate_run_id(run_id)
    from plasticity.storage import Manifest, Storage
    from plasticity.storage.fs import StorageAccessError
    from plasticity.storage.manifest import ConfigMismatchError

    storage = Storage.from_config(cfg.storage)
    try:  # a missing bucket, refused credentials or an unreachable endpoint: exit 2
        storage.check_writable()
        Manifest(storage, run_id).check_config(cfg.to_dict())
    except (ConfigMismatchError, StorageAccessError) as exc:
        raise ConfigError([str(exc)]) from exc
    from flows.timeline import timeline  # Prefect and Ray load only for a real run

    try:
        result = timeline(config=cfg.to_dict(), run_id=run_id)
    except Exception as exc:
        print(f"plasticity: run {run_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"run {run_id} finished")
    print(f"  manifest: {result['manifest']}")
    print(f"  plasticity heatmap: {result['png']}")
    root = Storage.from_config(cfg.storage).uri.rstrip("/")
    print(f"  tables: {root}/tables/<table>/run_id={run_id}/")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Regenerate a run's statistics, figures and summary from its Parquet tables."""
    validate_run_id(args.run_id)
    from plasticity.config import StorageConfig, config_from_dict
    from plasticity.storage import Manifest, Storage

    storage_cfg = StorageConfig(uri=args.storage, endpoint_url=args.endpoint_url)
    if not storage_cfg.uri.startswith(("file://", "s3://", "memory://")):
        raise ConfigError([f"--storage: expected file://PATH or s3://bucket/prefix, got {storage_cfg.uri!r}"])
    storage = Storage.from_config(storage_cfg)
    manifest = Manifest(storage, args.run_id).read()
    if manifest is None:
        raise ConfigError([f"--run-id: no run {args.run_id!r} under {storage.uri} (no manifest)"])
    config = dict(manifest["config"])
    # The tables are where they are now, whatever the run's own storage setting was.
    config["storage"] = {**config.get("storage", {}), "uri": storage_cfg.uri,
                         "endpoint_url": storage_cfg.endpoint_url}
    cfg = config_from_dict(config)
    from plasticity.analysis.report import build_report
    from plasticity.storage.shards import CorruptShardError

    try:
        rep = build_report(Storage.from_config(cfg.storage), args.run_id, cfg)
    except (FileNotFoundError, CorruptShardError) as exc:
        print(f"plasticity: report of run {args.run_id} failed: {exc}", file=sys.stderr)
        return 1
    print(rep.markdown)
    for name, uri in rep.figure_uris.items():
        print(f"  {name}: {uri}")
    return 0


def _load_study(args: argparse.Namespace):
    """The expanded study, every run checked; ConfigError (exit 2) before any work."""
    import yaml

    from plasticity.study.spec import load_study, preflight_study

    overrides = {}
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError([f"--set {item!r}: expected key=value, e.g. train.lr=1e-4"])
        key, raw = item.split("=", 1)
        try:
            overrides[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError([f"--set {item!r}: the value is not valid YAML ({exc})"]) from exc
    if getattr(args, "storage", None):
        overrides["storage.uri"] = args.storage
    study = load_study(args.config, overrides, getattr(args, "study_id", None))
    errors = preflight_study(study)
    if errors:
        raise ConfigError(errors)
    return study


def cmd_study_validate(args: argparse.Namespace) -> int:
    study = _load_study(args)
    groups = sorted({r.group for r in study.runs})
    print(f"{args.config}: valid (study {study.study_id}: {len(study.runs)} runs in "
          f"{len(groups)} groups, storage {study.storage.uri})")
    for r in study.runs:
        print(f"  {r.run_id}: group {r.group}, seed {r.seed}, model {r.config.model.source}, "
              f"{len(r.config.train.snapshot_steps)} checkpoints over {r.config.train.max_steps} steps")
    if args.show:
        print(json.dumps(study.spec, indent=2))
    return 0


def cmd_study_run(args: argparse.Namespace) -> int:
    study = _load_study(args)
    from plasticity.storage import Storage
    from plasticity.storage.fs import StorageAccessError
    from plasticity.study.spec import check_existing_runs

    storage = Storage.from_config(study.storage)
    try:
        storage.check_writable()
    except StorageAccessError as exc:
        raise ConfigError([str(exc)]) from exc
    errors = check_existing_runs(study, storage)
    if errors:
        raise ConfigError(errors)
    from flows.study import study_flow  # Prefect and Ray load only for a real study

    try:
        result = study_flow(spec=study.spec, study_id=study.study_id)
    except Exception as exc:
        print(f"plasticity: study {study.study_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"study {study.study_id} finished: {len(result['runs'])} runs")
    print(f"  manifest: {result['manifest']}")
    print(f"  summary: {result['summary']}")
    root = storage.uri.rstrip("/")
    print(f"  tables: {root}/tables/study_*/study_id={study.study_id}/")
    return 0


def cmd_study_report(args: argparse.Namespace) -> int:
    """Rebuild a study's tables, figures and summary from its Parquet tables."""
    validate_run_id(args.study_id)
    from plasticity.config import StorageConfig
    from plasticity.storage import Storage
    from plasticity.storage.shards import CorruptShardError
    from plasticity.study.report import build_study_report
    from plasticity.study.runs import StudyManifest

    storage_cfg = StorageConfig(uri=args.storage, endpoint_url=args.endpoint_url)
    if not storage_cfg.uri.startswith(("file://", "s3://", "memory://")):
        raise ConfigError([f"--storage: expected file://PATH or s3://bucket/prefix, got {storage_cfg.uri!r}"])
    storage = Storage.from_config(storage_cfg)
    spec = (StudyManifest(storage, args.study_id).read() or {}).get("spec", {})
    try:
        rep = build_study_report(storage, args.study_id, args.bootstrap or spec.get("bootstrap", 2000),
                                 spec.get("seed", 0))
    except (FileNotFoundError, CorruptShardError) as exc:
        print(f"plasticity: report of study {args.study_id} failed: {exc}", file=sys.stderr)
        return 1
    print(rep.markdown)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plasticity",
        description="Representation plasticity along a fine-tuning timeline.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="YAML run config (see configs/)")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE",
            help="override a config field, e.g. --set train.lr=1e-4 (repeatable)",
        )

    run = sub.add_parser("run", help="run the timeline flow", description="Run the timeline flow: "
                         "fine-tune, extract, plasticity grid, vocab, report.")
    common(run)
    run.add_argument("--storage", metavar="URI", help="storage root: file://PATH or s3://bucket/prefix")
    run.add_argument("--run-id", metavar="ID", help="run id (default: <name>-<UTC time>); "
                     "an existing id with the same config resumes")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check a config without running",
                         description="Check a config file without running anything or writing.")
    common(val)
    val.add_argument("--show", action="store_true", help="print the resolved config as JSON")
    val.set_defaults(func=cmd_validate)

    rep = sub.add_parser(
        "report", help="regenerate a run's statistics, figures and summary from its tables",
        description="Recompute plasticity_stats, the figures and summary.md of a finished (or "
        "partly finished) run from its Parquet tables alone, and print the summary.",
    )
    rep.add_argument("--run-id", required=True, metavar="ID", help="the run to report on")
    rep.add_argument("--storage", default="file://./runs", metavar="URI",
                     help="storage root holding the run (default: file://./runs)")
    rep.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for s3:// storage")
    rep.set_defaults(func=cmd_report)

    study = sub.add_parser(
        "study", help="run, check or report a study: many runs over seeds and settings",
        description="A study expands a base run config over axes (seeds, models, settings) to "
        "runs, runs them as one Prefect flow, and reports with runs as the unit.",
    )
    ssub = study.add_subparsers(dest="study_command", required=True)

    def study_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="YAML study file (see configs/study-*.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a field of every run, e.g. --set train.max_steps=10")
        p.add_argument("--storage", metavar="URI", help="storage root of every run")
        p.add_argument("--study-id", metavar="ID", help="the study id (default: the study's name)")

    srun = ssub.add_parser("run", help="run every unfinished run of the study, then its report",
                           description="Run the study: finished runs are skipped, unfinished "
                           "ones resumed; several at once as the cluster allows.")
    study_common(srun)
    srun.set_defaults(func=cmd_study_run)
    sval = ssub.add_parser("validate", help="expand and check a study without running",
                           description="Expand the study to runs and check every run's config; "
                           "nothing is run or written.")
    study_common(sval)
    sval.add_argument("--show", action="store_true", help="print the resolved study as JSON")
    sval.set_defaults(func=cmd_study_validate)
    srep = ssub.add_parser("report", help="rebuild a study's tables, figures and summary from its tables")
    srep.add_argument("--study-id", required=True, metavar="ID")
    srep.add_argument("--storage", default="file://./runs", metavar="URI",
                      help="storage root holding the study (default: file://./runs)")
    srep.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for s3:// storage")
    srep.add_argument("--bootstrap", type=int, metavar="N", help="bootstrap resamples (default: the study's)")
    srep.set_defaults(func=cmd_study_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"plasticity: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
