"""Shared test set-up: the environment every test and subprocess runs with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Set before anything imports Prefect, Ray or botocore.
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PLASTICITY_CACHE", str(ROOT / ".cache" / "plasticity"))
for key, value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_gpt2():
    from plasticity.config import ModelConfig
    from plasticity.models import load_model

    return load_model(ModelConfig(source="tiny-gpt2"))


@pytest.fixture
def smoke_config(tmp_path):
    """The shipped smoke config with storage in a temporary folder."""
    from plasticity.config import load_config

    return load_config(ROOT / "configs" / "smoke.yaml", [f"storage.uri=file://{tmp_path}/store"])
