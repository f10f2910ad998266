"""`plasticity` command line: run the timeline, or validate a config."""

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
    from plasticity.storage.manifest import ConfigMismatchError

    try:
        Manifest(Storage.from_config(cfg.storage), run_id).check_config(cfg.to_dict())
    except ConfigMismatchError as exc:
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
