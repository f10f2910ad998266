"""Ray actors that run the core stages. Only configs, URIs and small dataclasses cross."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

from plasticity.config import RunConfig
from plasticity.train.checkpoint import CheckpointRef

log = logging.getLogger(__name__)


class StageWorker:
    """Runs stages in its own process; keeps the most recently used model loaded, so an
    actor asked to evaluate every source against target j loads model j once."""

    def __init__(self, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        self._loaded: tuple[str, object] | None = None

    def _model(self, cfg: RunConfig, ckpt: CheckpointRef):
        from plasticity.stages import device
        from plasticity.storage.fs import Storage
        from plasticity.train.checkpoint import load_checkpoint

        if self._loaded is None or self._loaded[0] != ckpt.path:
            self._loaded = None
            lm = load_checkpoint(Storage.from_config(cfg.storage), ckpt.path, cfg.model)
            lm.model.to(device())
            self._loaded = (ckpt.path, lm)
        return self._loaded[1]

    def finetune(self, cfg: RunConfig, run_id: str):
        from plasticity.stages import finetune_stage

        return finetune_stage(cfg, run_id)

    def extract(self, cfg: RunConfig, run_id: str, ckpt: CheckpointRef):
        from plasticity.stages import extract_stage

        return extract_stage(cfg, run_id, ckpt, self._model(cfg, ckpt))

    def plasticity(self, cfg: RunConfig, run_id: str, target: CheckpointRef, sources: list[CheckpointRef]):
        from plasticity.stages import plasticity_stage

        return plasticity_stage(cfg, run_id, target, sources, self._model(cfg, target))

    def vocab(self, cfg: RunConfig, run_id: str, ckpt: CheckpointRef):
        from plasticity.stages import vocab_stage

        return vocab_stage(cfg, run_id, ckpt, self._model(cfg, ckpt))

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


RemoteStageWorker = ray.remote(max_restarts=1, max_task_retries=0)(StageWorker)


def _loopback_only() -> None:
    """Make a local Ray use 127.0.0.1 as its node address, so its servers bind loopback.

    Ray turns a node address of 127.0.0.1 into the machine's external address unless it
    runs in single-machine mode, which it reads from this variable (at import in this
    process, and at start in the daemons and workers it spawns, which inherit it).
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def ensure_ray(address: str | None = None) -> bool:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray on loopback.

    Returns True when this call started Ray (the caller then shuts it down).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "PLASTICITY_CACHE") if k in os.environ}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        _loopback_only()
        ray.init(
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": env_vars},
            log_to_driver=True,
            configure_logging=False,
        )
    return True


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


# Handles of the actors this driver started. A named actor that is not detached lives as
# long as some handle to it does, so the driver keeps one until `stop`.
_HANDLES: dict[str, object] = {}


@dataclass(frozen=True)
class WorkerSpec:
    """Where a task finds its actor: a name in the run's Ray namespace."""

    name: str


def _options(cfg: RunConfig, gpus: float) -> dict:
    opts: dict = {"num_cpus": cfg.compute.cpus_per_worker}
    if cluster_gpus() > 0:
        opts["num_gpus"] = gpus
    return opts


def trainer_cpus(cfg: RunConfig) -> float:
    if cfg.compute.train_cpus is not None:
        return cfg.compute.train_cpus
    if cluster_gpus() == 0 and len([n for n in ray.nodes() if n.get("Alive")]) == 1:
        return float(ray.cluster_resources().get("CPU", 1))
    return cfg.compute.cpus_per_worker


def start_trainer(cfg: RunConfig, run_id: str) -> WorkerSpec:
    name = f"plasticity-{run_id}-train"
    cpus = trainer_cpus(cfg)
    opts = _options(cfg, cfg.compute.train_gpus)
    opts["num_cpus"] = cpus
    _HANDLES[name] = RemoteStageWorker.options(name=name, get_if_exists=True, **opts).remote(
        max(1, int(cpus))
    )
    return WorkerSpec(name)


def start_workers(cfg: RunConfig, run_id: str) -> list[WorkerSpec]:
    n = cfg.compute.num_workers
    if n is None:
        gpus = cluster_gpus()
        if gpus > 0:
            n = max(1, int(gpus / cfg.compute.eval_gpus))
        else:
            n = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.compute.cpus_per_worker))
    specs = []
    for k in range(n):
        name = f"plasticity-{run_id}-w{k}"
        _HANDLES[name] = RemoteStageWorker.options(
            name=name, get_if_exists=True, **_options(cfg, cfg.compute.eval_gpus)
        ).remote(max(1, int(cfg.compute.cpus_per_worker)))
        specs.append(WorkerSpec(name))
    return specs


def actor(spec: WorkerSpec):
    return _HANDLES.get(spec.name) or ray.get_actor(spec.name)


def stop(specs: list[WorkerSpec]) -> None:
    for spec in specs:
        handle = _HANDLES.pop(spec.name, None)
        try:
            ray.kill(handle or ray.get_actor(spec.name))
        except ValueError:
            pass  # already gone
