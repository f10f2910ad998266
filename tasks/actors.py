"""Ray actors that run the core stages. Only configs, URIs and small dataclasses cross."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

from plasticity.config import RunConfig
from plasticity.train.checkpoint import CheckpointRef
from tasks.logs import Drained, record_failure
from tasks.logs import install as install_log_buffer

log = logging.getLogger(__name__)
LOGS_GROUP = "logs"


class StageWorker:
    """Runs stages in its own process; keeps the most recently used model loaded, so an
    actor asked to evaluate every source against target j loads model j once.

    Each stage method takes the `call_id` the task gave it: while the call runs, the
    process's log records (and progress rows: fine-tuning's train metrics, the forward
    passes of extraction and of the plasticity grid) are kept under that id
    for `drain_logs`, which runs in its own concurrency group so that the task can read
    them while the stage is busy. Stage methods share the default group (one at a time).
    A call without an id keeps nothing.
    """

    def __init__(self, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        self._logs = install_log_buffer()
        self._loaded: tuple[str, object] | None = None

    @ray.method(concurrency_group=LOGS_GROUP)
    def drain_logs(self, call_id: str) -> Drained:
        return self._logs.drain(call_id)

    def _call(self, call_id: str | None, what: str, fn):
        with self._logs.running(call_id):
            try:
                return fn()
            except BaseException as exc:
                if call_id is not None:
                    record_failure(self._logs, what, exc)
                raise

    def _batches(self, call_id: str | None):
        """`observe(done, total)` for a stage's forward passes: a progress row
        `{"done", "total"}` per pass, drained with the call's logs; none without a call id."""
        if call_id is None:
            return None
        return lambda done, total: self._logs.add_metric({"done": done, "total": total})

    def _model(self, cfg: RunConfig, ckpt: CheckpointRef):
        from plasticity.stages.common import device
        from plasticity.storage.fs import Storage
        from plasticity.train.checkpoint import load_checkpoint

        if self._loaded is None or self._loaded[0] != ckpt.path:
            self._loaded = None
            lm = load_checkpoint(Storage.from_config(cfg.storage), ckpt.path, cfg.model)
            lm.model.to(device())
            self._loaded = (ckpt.path, lm)
        return self._loaded[1]

    def finetune(self, cfg: RunConfig, run_id: str, call_id: str | None = None):
        from plasticity.stages.finetune import finetune_stage

        def run():
            observe = self._logs.add_metric if call_id is not None else None
            refs, result = finetune_stage(cfg, run_id, observe=observe)
            return refs, self._where(result)

        return self._call(call_id, "finetune", run)

    def extract(self, cfg: RunConfig, run_id: str, ckpt: CheckpointRef, call_id: str | None = None):
        from plasticity.stages.extract import extract_stage

        return self._call(call_id, f"extract step={ckpt.step}", lambda: self._where(
            extract_stage(cfg, run_id, ckpt, self._model(cfg, ckpt), self._batches(call_id))))

    def plasticity(self, cfg: RunConfig, run_id: str, target: CheckpointRef,
                   sources: list[CheckpointRef], call_id: str | None = None):
        from plasticity.stages.plasticity import plasticity_stage

        return self._call(call_id, f"plasticity target={target.step}", lambda: self._where(
            plasticity_stage(cfg, run_id, target, sources, self._model(cfg, target),
                             self._batches(call_id))))

    def vocab(self, cfg: RunConfig, run_id: str, ckpt: CheckpointRef, call_id: str | None = None):
        from plasticity.stages.vocab import vocab_stage

        return self._call(call_id, f"vocab step={ckpt.step}", lambda: self._where(
            vocab_stage(cfg, run_id, ckpt, self._model(cfg, ckpt))))

    def intervention(self, cfg: RunConfig, run_id: str, step: int, refs: list[CheckpointRef],
                     call_id: str | None = None):
        from plasticity.stages.intervention import intervention_stage

        def run():
            self._loaded = None  # the branch trains its own copy; free the cached model first
            return self._where(intervention_stage(cfg, run_id, step, refs))

        return self._call(call_id, f"intervention step={step}", run)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def _where(self, result):
        """Record which Ray node ran the unit (the task moves it into the manifest)."""
        result.summary = {**result.summary, NODE_KEY: self.node()}
        return result


NODE_KEY = "ray_node_id"
# Restarts and retries are bounded per actor by compute.actor_restarts (see `_options`).
# The logs group has its own thread, so a drain never waits for the stage running.
RemoteStageWorker = ray.remote(concurrency_groups={LOGS_GROUP: 1})(StageWorker)


def _loopback_only() -> None:
    """Make a local Ray use 127.0.0.1 as its node address, so its servers bind loopback.

    Ray turns a node address of 127.0.0.1 into the machine's external address unless it
    runs in single-machine mode, which it reads from this variable (at import in this
    process, and at start in the daemons and workers it spawns, which inherit it).
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# Environment that actors on other nodes need and that is safe to show: the runtime_env
# is stored in Ray's GCS and shown on its dashboard, so secrets (AWS keys) never go in it;
# worker nodes get them from their own environment (a Kubernetes secret, compose's env).
RUNTIME_ENV_VARS = (
    "HF_HUB_OFFLINE", "PLASTICITY_CACHE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION", "AWS_REGION",
)
# Never shipped with compute.working_dir.
WORKING_DIR_EXCLUDES = [
    ".venv", ".git", ".cache", ".prefect", "runs", "**/__pycache__", "*.egg-info", ".env",
]


def runtime_env(working_dir: str | None = None) -> dict:
    """The runtime_env of the run's Ray job: non-secret environment, optionally the code."""
    env: dict = {"env_vars": {k: os.environ[k] for k in RUNTIME_ENV_VARS if k in os.environ}}
    if working_dir:
        env["working_dir"] = working_dir
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    return env


def ensure_ray(address: str | None = None, working_dir: str | None = None) -> bool:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray on loopback.

    `working_dir` (compute.working_dir) is shipped to a remote cluster with the job's
    runtime_env; a local Ray runs the code of this process and ignores it.
    Returns True when this call started Ray (the caller then shuts it down).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env(working_dir), log_to_driver=True)
    else:
        _loopback_only()
        ray.init(
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env(),
            log_to_driver=True,
            configure_logging=False,
        )
    return True


def cluster_gpus(resource: str = "GPU") -> float:
    """How much of the accelerator resource (GPU, or a custom one) the cluster has."""
    return float(ray.cluster_resources().get(resource, 0))


# Handles of the actors this driver started. A named actor that is not detached lives as
# long as some handle to it does, so the driver keeps one until `stop`.
_HANDLES: dict[str, object] = {}


@dataclass(frozen=True)
class WorkerSpec:
    """Where a task finds its actor: a name in the run's Ray namespace."""

    name: str


def _options(cfg: RunConfig, gpus: float) -> dict:
    """Actor options: CPUs, the accelerator share when the cluster has the resource, and
    bounded restarts (a restarted actor retries the call it was running; every stage
    writes deterministic shard names, so a retry replaces rather than adds)."""
    c = cfg.compute
    opts: dict = {
        "num_cpus": c.cpus_per_worker,
        "max_restarts": c.actor_restarts,
        "max_task_retries": c.actor_restarts,
    }
    if gpus > 0 and cluster_gpus(c.gpu_resource) > 0:
        if c.gpu_resource == "GPU":
            opts["num_gpus"] = gpus
        else:
            opts["resources"] = {c.gpu_resource: gpus}
    return opts


def trainer_cpus(cfg: RunConfig) -> float:
    if cfg.compute.train_cpus is not None:
        return cfg.compute.train_cpus
    if cluster_gpus(cfg.compute.gpu_resource) == 0 and len(
        [n for n in ray.nodes() if n.get("Alive")]
    ) == 1:
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
        gpus = cluster_gpus(cfg.compute.gpu_resource)
        if gpus > 0 and cfg.compute.eval_gpus > 0:
            n = max(1, int(gpus / cfg.compute.eval_gpus))
        else:
            n = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.compute.cpus_per_worker))
    specs = []
    for k in range(n):
        name = f"plasticity-{run_id}-w{k}"
        # SPREAD: evaluation actors go to different nodes where they can.
        _HANDLES[name] = RemoteStageWorker.options(
            name=name, get_if_exists=True, scheduling_strategy="SPREAD",
            **_options(cfg, cfg.compute.eval_gpus),
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
