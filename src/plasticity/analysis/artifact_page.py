"""The Markdown of a report's Prefect artefact: the report, its figures inline, and where
its files and tables are in storage.

The Prefect UI shows an artefact's Markdown in the browser, which opens no `file://`
link from an http page and knows no `s3://` scheme, and has no access to the storage.
The figures are therefore embedded as base64 PNGs (`data:` images, which the UI
displays), and the storage locations are links only when `storage.browse_url` names a
web address that shows the storage root; otherwise they are the full storage URIs in
code spans, to copy.
"""

from __future__ import annotations

import base64
import posixpath
from collections.abc import Iterable

from plasticity.storage.fs import Storage

FIGURES_HEADING = "## Figures"


def artifact_key(name: str) -> str:
    """A run or study id as part of a Prefect artefact key (lower-case letters, digits
    and dashes only)."""
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower())


def _relative(storage: Storage, path: str) -> str:
    root = storage.root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        raise ValueError(f"{path!r} is not under the storage root {root!r}")
    return path[len(root):].lstrip("/")


def location(storage: Storage, path: str, browse_url: str | None, folder: bool = False) -> str:
    """A storage path as Markdown: a link under `browse_url`, else its URI in code."""
    rel = _relative(storage, path) + ("/" if folder else "")
    if browse_url:
        return f"[{rel}]({browse_url}{rel})"
    return f"`{storage.full_uri(path)}{'/' if folder else ''}`"


def figures_markdown(storage: Storage, figure_paths: dict[str, str], browse_url: str | None) -> list[str]:
    """One section per figure: its heading, the PNG inline, where it is stored."""
    lines: list[str] = []
    for name, path in figure_paths.items():
        png = storage.read_bytes(path)
        lines += [f"### {name.replace('_', ' ')}", "",
                  f"![{name}](data:image/png;base64,{base64.b64encode(png).decode()})", "",
                  location(storage, path, browse_url), ""]
    return lines


def tables_of(shards: Iterable[str]) -> dict[str, list[str]]:
    """Shard paths grouped by table name (the folder after `tables/`)."""
    out: dict[str, list[str]] = {}
    for p in shards:
        parts = p.split("/")
        if "tables" not in parts[:-1]:
            raise ValueError(f"{p!r} is not a table shard (no tables/<table>/ in its path)")
        out.setdefault(parts[parts.index("tables") + 1], []).append(p)
    return {t: sorted(set(v)) for t, v in sorted(out.items())}


def storage_markdown(storage: Storage, key: str, value: str, files: list[tuple[str, str, bool]],
                     shards: Iterable[str], browse_url: str | None) -> list[str]:
    """The "In storage" section: `files` as (what, path, is_folder) rows, then every table
    with its shard count and the partition folder holding this run's (or study's) rows.

    `key`/`value` is the partition the rows sit under (`run_id`/`r1`, `study_id`/`s1`).
    """
    lines = ["## In storage", "",
             f"Storage root `{storage.uri}`"
             + (f", shown at {browse_url}" if browse_url else "") + ".", "",
             "| file | where |", "|---|---|"]
    lines += [f"| {what} | {location(storage, path, browse_url, folder)} |" for what, path, folder in files]
    tables = tables_of(shards)
    if tables:
        lines += ["", "| table | shards | where |", "|---|---|---|"]
        for table, paths in tables.items():
            folder = storage.path("tables", table, f"{key}={value}")
            lines.append(f"| `{table}` | {len(paths)} | {location(storage, folder, browse_url, True)} |")
        first = next(iter(tables))
        which = f"run_ids=[{value!r}]" if key == "run_id" else f"filters={{{key!r}: {value!r}}}"
        lines += ["", "Read a table with `plasticity.analysis.load`, e.g. "
                  f"`load({first!r}, {storage.uri!r}, {which})`, or with DuckDB's "
                  "`read_parquet('<root>/tables/<table>/**/*.parquet', hive_partitioning = true)`."]
    return lines + [""]


def artifact_markdown(storage: Storage, markdown: str, figure_paths: dict[str, str],
                      files: list[tuple[str, str, bool]], key: str, value: str,
                      shards: Iterable[str], browse_url: str | None = None) -> str:
    """A report's artefact: `markdown` (the report's summary.md, whose closing figure
    section gives way to the figures inline), then the storage section."""
    body = markdown.rstrip("\n")
    head, sep, _tail = body.rpartition("\n" + FIGURES_HEADING + "\n")
    if sep:
        body = head.rstrip("\n")
    lines = [body, ""]
    if figure_paths:
        lines += [FIGURES_HEADING, ""] + figures_markdown(storage, figure_paths, browse_url)
    figures = [(f"figure: {name.replace('_', ' ')}", path, False) for name, path in figure_paths.items()]
    lines += storage_markdown(storage, key, value, files[:1] + figures + files[1:], shards, browse_url)
    return "\n".join(lines)


def run_files(storage: Storage, run_id: str) -> list[tuple[str, str, bool]]:
    """A run's report, CSV, manifest, checkpoints and vectors that exist, as
    `storage_markdown` rows (the report first)."""
    run = storage.path("runs", run_id)
    report = posixpath.join(run, "report")
    files = [
        ("this report (Markdown)", posixpath.join(report, "summary.md"), False),
        ("the plasticity matrix of every metric (CSV)", posixpath.join(report, "plasticity_matrix.csv"), False),
        ("the run's manifest (config, versions, stages done)", posixpath.join(run, "manifest.json"), False),
        ("checkpoints", posixpath.join(run, "checkpoints"), True),
        ("steering vectors", posixpath.join(run, "vectors"), True),
    ]
    return [f for f in files if storage.exists(f[1])]


def study_files(storage: Storage, study_id: str, run_ids: Iterable[str]) -> list[tuple[str, str, bool]]:
    """A study's report and manifest, and each run's report, those that exist, as
    `storage_markdown` rows (the report first)."""
    study = storage.path("studies", study_id)
    files = [("this report (Markdown)", posixpath.join(study, "report", "summary.md"), False),
             ("the study's manifest (runs and their state)", posixpath.join(study, "manifest.json"), False)] + [
        (f"report of run `{r}`", storage.path("runs", r, "report", "summary.md"), False) for r in run_ids
    ]
    return [f for f in files if storage.exists(f[1])]
