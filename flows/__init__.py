"""Prefect flows: the timeline flow and its deployment entrypoints."""
