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


@flow(name="plasticity-scheduled", log_prints=False)
def scheduled_timeline(
    config_path: str = "configs/smoke.yaml",
    overrides: list[str] | None = None,
    storage: str | None = None,
    run_id: str | None = None,
) -> dict:
    """Resolve the config, then run the timeline flow under the run id (a scheduled run
    without one gets `<name>-<scheduled UTC time>`, so a retried flow run resumes)."""
    from prefect.runtime import flow_run

    from flows.timeline import timeline

    when = flow_run.scheduled_start_time
    when = when.astimezone(dt.UTC) if when is not None else None
    config, rid = resolve(config_path, overrides, storage, run_id, when)
    get_run_logger().info("config %s with %d overrides: run %s", config_path, len(overrides or []), rid)
    return timeline(config=config, run_id=rid)
