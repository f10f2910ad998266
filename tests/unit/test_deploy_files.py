"""The container files parse and agree with the project."""

from pathlib import Path

import pytest
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


# -- cross-references between prefect.yaml, the flows, compose and infra/ -----------------

import ast  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402


def _prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _flow_params(entrypoint: str) -> tuple[str, list[str]]:
    """The @flow name and parameter names of `path.py:function`, read without importing."""
    path, func = entrypoint.split(":")
    tree = ast.parse((ROOT / path).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            name = None
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "flow":
                    name = next(k.value.value for k in dec.keywords if k.arg == "name")
            return name, [a.arg for a in node.args.args]
    raise AssertionError(f"{entrypoint}: no function {func}")


def test_prefect_yaml_deployments_point_at_real_flows_configs_and_pools():
    data = _prefect_yaml()
    deployments = {d["name"]: d for d in data["deployments"]}
    assert {"smoke", "gpt2-medium-nightly", "gpt2-medium-kubernetes"} <= set(deployments)
    pools = set()
    for dep in deployments.values():
        flow_name, params = _flow_params(dep["entrypoint"])
        assert flow_name in ("plasticity-scheduled", "plasticity-scheduled-study")
        assert set(dep["parameters"]) <= set(params), dep["name"]
        assert (ROOT / dep["parameters"]["config_path"]).is_file(), dep["name"]
        if flow_name == "plasticity-scheduled-study":
            from plasticity.study.spec import load_study, preflight_study

            study = load_study(ROOT / dep["parameters"]["config_path"])
            assert study.runs and not preflight_study(study), dep["name"]
        for sched in dep.get("schedules", []):
            fields = sched["cron"].split()
            assert len(fields) == 5 and sched["timezone"] == "UTC"
        pools.add(dep["work_pool"]["name"])
        # Secrets never travel as deployment parameters.
        assert not re.search(r"(?i)secret|password|access_key", json.dumps(dep["parameters"]))
    assert pools == {"plasticity-process", "plasticity-kubernetes"}
    nightly = deployments["gpt2-medium-nightly"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *" and nightly["schedules"][0]["active"]
    # The default pull step sets the working directory; the Kubernetes one the image's.
    assert data["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}]
    k8s = deployments["gpt2-medium-kubernetes"]
    workdir = re.search(r"^WORKDIR (\S+)", (ROOT / "docker/Dockerfile.flow").read_text(), re.M).group(1)
    assert k8s["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == workdir


def test_pools_images_services_and_ports_agree_across_files():
    data = _prefect_yaml()
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())["services"]
    deployments = {d["name"]: d for d in data["deployments"]}
    process_pool = deployments["smoke"]["work_pool"]["name"]
    k8s_pool = deployments["gpt2-medium-kubernetes"]["work_pool"]["name"]
    # The process pool is the one the compose worker and the flow image's default command serve.
    worker_cmd = compose["prefect-worker"]["command"]
    assert worker_cmd[worker_cmd.index("--pool") + 1] == process_pool
    assert worker_cmd[worker_cmd.index("--type") + 1] == "process"
    assert f'"--pool", "{process_pool}"' in (ROOT / "docker/Dockerfile.flow").read_text()
    # The Kubernetes pool: its worker, its job template's image and the compose image name.
    k8s_docs = list(yaml.safe_load_all((ROOT / "infra/prefect-worker.yaml").read_text()))
    dep = next(d for d in k8s_docs if d["kind"] == "Deployment")
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--pool") + 1] == k8s_pool and cmd[cmd.index("--type") + 1] == "kubernetes"
    template = json.loads((ROOT / "infra/k8s-base-job-template.json").read_text())
    props = template["variables"]["properties"]
    flow_image = compose["prefect-worker"]["image"]
    assert props["image"]["default"].split(":")[0] == flow_image
    assert deployments["gpt2-medium-kubernetes"]["work_pool"]["job_variables"]["image"].split(":")[0] == flow_image
    # Every {{ variable }} the job configuration uses is declared.
    used = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert used <= set(props), used - set(props)
    # Ray: the flow run's RAY_ADDRESS names the head service and its client port.
    ray_env = props["env"]["default"]["RAY_ADDRESS"]
    cluster = yaml.safe_load((ROOT / "infra/raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    client_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "client")
    assert ray_env == f"ray://{cluster['metadata']['name']}-head-svc:{client_port}"
    compose_ray = compose["prefect-worker"]["environment"]["RAY_ADDRESS"]
    head_cmd = " ".join(compose["ray-head"]["command"])
    client = re.search(r"--ray-client-server-port=(\d+)", head_cmd).group(1)
    assert compose_ray == f"ray://ray-head:{client}"
    # The GPU worker group asks for a GPU; the images are the worker image.
    gpu = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {head["image"].split(":")[0], gpu["image"].split(":")[0]} == {compose["ray-head"]["image"]}
    assert compose["ray-gpu-worker"]["image"] == compose["ray-head"]["image"]


def test_environment_variables_in_the_manifests_are_ones_the_code_reads():
    code = "\n".join(p.read_text() for d in ("src/plasticity", "tasks", "flows")
                     for p in (ROOT / d).rglob("*.py"))
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    aws = compose["x-aws-env"]
    assert "AWS_ENDPOINT_URL_S3" in aws and "AWS_ENDPOINT_URL_S3" in code
    assert "RAY_ADDRESS" in code
    template = json.loads((ROOT / "infra/k8s-base-job-template.json").read_text())
    for key in template["variables"]["properties"]["env"]["default"]:
        assert key in code or key.startswith("PREFECT_") or key == "HF_HUB_OFFLINE", key
    # Credentials only ever come from secrets: no literal key in any manifest.
    cluster = (ROOT / "infra/raycluster.yaml").read_text()
    assert "secretRef: {name: plasticity-s3}" in cluster
    assert template["variables"]["properties"]["s3_secret"]["default"] == "plasticity-s3"
    secret_names = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PREFECT_API_KEY"}

    def literal_secrets(node) -> list:
        """Env entries {name: X, value: ...} or mappings {X: ...} that give a secret a value."""
        found = []
        if isinstance(node, dict):
            if isinstance(node.get("name"), str) and node["name"] in secret_names and "value" in node:
                found.append(node["name"])
            found += [k for k in node if k in secret_names]
            for v in node.values():
                found += literal_secrets(v)
        elif isinstance(node, list):
            for v in node:
                found += literal_secrets(v)
        return found

    for path in ("infra/raycluster.yaml", "infra/prefect-worker.yaml", "prefect.yaml"):
        for doc in yaml.safe_load_all((ROOT / path).read_text()):
            assert literal_secrets(doc) == [], path
    assert literal_secrets(template) == []
    # The MinIO bucket compose creates is the one the Kubernetes deployment writes to.
    bucket = re.search(r"mc mb --ignore-existing lab/(\S+)", compose["services"]["minio-bucket"]["command"][0]).group(1)
    deployments = {d["name"]: d for d in _prefect_yaml()["deployments"]}
    assert deployments["gpt2-medium-kubernetes"]["parameters"]["storage"].startswith(f"s3://{bucket}/")


def test_scheduled_study_refuses_bad_input_before_any_work(tmp_path):
    from flows.scheduled import scheduled_study
    from plasticity.config import ConfigError

    storage = f"file://{tmp_path}/store"
    with pytest.raises(ConfigError, match="overrides: 'train.lr': expected key=value"):
        scheduled_study.fn(config_path=str(ROOT / "configs/study-smoke.yaml"),
                           overrides=["train.lr"], storage=storage)
    with pytest.raises(ConfigError, match="trian"):
        scheduled_study.fn(config_path=str(ROOT / "configs/study-smoke.yaml"),
                           overrides=["trian.lr=0.1"], storage=storage)
    assert not (tmp_path / "store").exists()
