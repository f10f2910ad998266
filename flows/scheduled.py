"""The deployment entrypoint: a config file and overrides in, one timeline run out.

`prefect.yaml` deploys this flow; a schedule or a button in the UI starts it with a
config path (relative to the working directory the deployment's pull step sets) and
`key=value` overrides, exactly as `plasticity run --config … --set …` takes them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, get_run_logger

from plasticity.config import ConfigError, load_config, validate_run_id
from plasticity.preflight import preflight


def resolve(
    config_path: str, overrides: list[str] | None, storage: str | None, run_id: str | None,
    when: dt.datetime | None = None,
) -> tuple[dict[str, Any], str]:
    """The resolved config and the run id (default `<name>-<UTC time of the schedule>`).
    Bad input raises `ConfigError` naming the field, before any work."""
    sets = list(overrides or [])
    if storage:
        sets.append(f"storage.uri={storage}")
    cfg = load_config(config_path, sets)
    errors = preflight(cfg)
    if errors:
        raise ConfigError(errors)
    when = when or dt.datetime.now(dt.UTC)
    run_id = run_id or f"{cfg.name}-{when:%Y%m%d-%H%M%S}"
    validate_run_id(run_id)
    return cfg.to_dict(), run_id


def credentials_from_block(name: str) -> dict[str, str]:
    """AWS environment variables from a prefect-aws `AwsCredentials` block named `name`.

    The values stay in this process's environment (s3fs reads them there, and a local
    Ray's workers inherit them); they are never logged, passed as parameters, or put in
    Ray's runtime_env. Nodes of a remote Ray cluster use their own credentials."""
    try:
        from prefect_aws import AwsCredentials
    except ImportError as exc:
        raise ConfigError([
            f"aws_credentials_block: using {name!r} needs prefect-aws (pip install 'plasticity[aws]')"
        ]) from exc
    try:
        block = AwsCredentials.load(name)
    except ValueError as exc:
        raise ConfigError([f"aws_credentials_block: no AwsCredentials block named {name!r}"]) from exc
    env: dict[str, str] = {}
    if block.aws_access_key_id:
        env["AWS_ACCESS_KEY_ID"] = block.aws_access_key_id
    if block.aws_secret_access_key:
        env["AWS_SECRET_ACCESS_KEY"] = block.aws_secret_access_key.get_secret_value()
    token = block.aws_session_token
    if token:
        env["AWS_SESSION_TOKEN"] = token.get_secret_value() if hasattr(token, "get_secret_value") else token
    if block.profile_name:
        env["AWS_PROFILE"] = block.profile_name
    if block.region_name:
        env["AWS_DEFAULT_REGION"] = block.region_name
    return env


@flow(name="plasticity-scheduled", log_prints=False)
def scheduled_timeline(
    config_path: str = "configs/smoke.yaml",
    overrides: list[str] | None = None,
    storage: str | None = None,
    run_id: str | None = None,
    aws_credentials_block: str | None = None,
) -> dict:
    """Resolve the config, then run the timeline flow under the run id (a scheduled run
    without one gets `<name>-<scheduled UTC time>`, so a retried flow run resumes).
    `aws_credentials_block` names a prefect-aws AwsCredentials block to take the S3
    credentials from, instead of the worker's environment."""
    import os

    from prefect.runtime import flow_run

    from flows.timeline import timeline

    if aws_credentials_block:
        os.environ.update(credentials_from_block(aws_credentials_block))
    when = flow_run.scheduled_start_time
    when = when.astimezone(dt.UTC) if when is not None else None
    config, rid = resolve(config_path, overrides, storage, run_id, when)
    get_run_logger().info("config %s with %d overrides: run %s", config_path, len(overrides or []), rid)
    return timeline(config=config, run_id=rid)


@flow(name="plasticity-scheduled-study", log_prints=False)
def scheduled_study(
    config_path: str = "configs/study-smoke.yaml",
    overrides: list[str] | None = None,
    storage: str | None = None,
    study_id: str | None = None,
    aws_credentials_block: str | None = None,
) -> dict:
    """Resolve a study file (`overrides`: `key=value` for every run, as `plasticity study
    run --set` takes them), check every run, then run the study flow. A study id is
    stable (the study's name by default), so a scheduled rerun resumes the study: its
    finished runs are skipped."""
    import os

    import yaml

    from flows.study import study_flow
    from plasticity.storage.fs import Storage
    from plasticity.study.spec import check_existing_runs, load_study, preflight_study

    if aws_credentials_block:
        os.environ.update(credentials_from_block(aws_credentials_block))
    sets = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError([f"overrides: {item!r}: expected key=value"])
        key, raw = item.split("=", 1)
        sets[key.strip()] = yaml.safe_load(raw)
    if storage:
        sets["storage.uri"] = storage
    study = load_study(config_path, sets, study_id)
    errors = preflight_study(study)
    errors += check_existing_runs(study, Storage.from_config(study.storage))
    if errors:
        raise ConfigError(errors)
    get_run_logger().info("study %s from %s: %d runs", study.study_id, config_path, len(study.runs))
    return study_flow(spec=study.spec, study_id=study.study_id)
