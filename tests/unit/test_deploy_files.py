"""The container files parse and agree with the project."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_parses_and_wires_the_services():
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "minio-bucket", "ray-head", "ray-gpu-worker",
            "prefect-worker"} <= set(services)
    for svc in services.values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port  # published on loopback only
        build = svc.get("build")
        if build:
            assert (ROOT / "docker" / build["context"] / build["dockerfile"]).is_file()
    worker_env = services["prefect-worker"]["environment"]
    assert worker_env["PREFECT_API_URL"].startswith("http://prefect-server:4200")
    # No secret has a literal value in the file.
    text = (ROOT / "docker/compose.yaml").read_text()
    assert "PASSWORD: ${" in text and "SECRET_ACCESS_KEY: ${" in text


def test_dockerfiles_pin_torch_and_copy_what_exists():
    for name in ("Dockerfile.worker", "Dockerfile.flow"):
        text = (ROOT / "docker" / name).read_text()
        assert "torch==2.13.0" in text or "TORCH_VERSION=2.13.0" in text
        for line in text.splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
