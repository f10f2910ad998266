"""Studies: many timelines (seeds, architectures, settings) and statistics with runs
as the unit. `spec` expands a study file to runs, `runs` records their state, `stats`
and `report` turn the finished runs' tables into the study's."""

from plasticity.study.spec import Study, StudyRun, expand, load_study, resolve_spec

__all__ = ["Study", "StudyRun", "expand", "load_study", "resolve_spec"]
