"""The timeline on a multi-node Ray cluster on this machine (ray.cluster_utils.Cluster):
a head and two worker nodes, one with a custom resource standing in for a GPU. The run
connects through compute.ray_address as it would to a real cluster. A worker node is
killed in the middle of the plasticity grid; its actor is restarted elsewhere, the grid
finishes, and no row is doubled."""

from __future__ import annotations

import json
import threading
import time

import pytest

from plasticity.config import StorageConfig
from plasticity.storage import Storage
from tests.integration.conftest import FAST, FAST_STEPS, ROOT, assert_whole_and_unique, run_cli

pytestmark = pytest.mark.integration
SMOKE = str(ROOT / "configs" / "smoke.yaml")
STANDIN = "GPU_STANDIN"


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from tasks.actors import _loopback_only

    _loopback_only()  # every node's servers on 127.0.0.1, as a local Ray's
    system = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
              "health_check_failure_threshold": 3}
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": system,
    })
    try:
        plain = c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        standin = c.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={STANDIN: 1})
        c.wait_for_nodes()
        yield c, plain, standin
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def _manifest(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_grid_spreads_over_nodes_and_survives_a_node_killed_mid_grid(cluster, tmp_path):
    c, plain, standin = cluster
    run_id = "multinode"
    manifest_path = tmp_path / "store" / "runs" / run_id / "manifest.json"
    head_id = c.head_node.node_id
    workers = {plain.node_id: plain, standin.node_id: standin}
    killed: dict = {}

    def kill_mid_grid() -> None:
        """When every checkpoint is extracted (the grid starts right after), remove the
        worker node whose actor still has plasticity targets to do."""
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            stages = _manifest(manifest_path).get("stages", {})
            extract = stages.get("extract", {})
            if len(extract) == 3:
                done = set(stages.get("plasticity", {}))
                by_node: dict[str, list[str]] = {}
                for key, unit in extract.items():
                    by_node.setdefault(unit["ray_node_id"], []).append(key.split("=")[1])
                todo = {n: [s for s in steps if f"target={s}" not in done]
                        for n, steps in by_node.items() if n in workers}
                node = max(todo, key=lambda n: len(todo[n]), default=None)
                if node is None or not todo[node]:
                    killed["none"] = "no worker node had plasticity work left"
                    return
                c.remove_node(workers[node], allow_graceful=False)
                after = set(_manifest(manifest_path).get("stages", {}).get("plasticity", {}))
                killed.update(node=node, targets=todo[node], done_at_kill=after, t=time.time())
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_mid_grid, daemon=True)
    watcher.start()
    out = run_cli(
        "run", "--config", SMOKE, "--storage", f"file://{tmp_path}/store", "--run-id", run_id,
        "--set", f"compute.ray_address={c.address}", "--set", f"compute.gpu_resource={STANDIN}",
        "--set", "compute.eval_gpus=0", "--set", "compute.num_workers=2",
        *FAST, timeout=540,
    )
    watcher.join(timeout=5)
    assert out.returncode == 0, out.stderr[-5000:]
    assert "node" in killed, killed
    # The killed node's actor had grid work that was not committed when it died.
    assert any(f"target={s}" not in killed["done_at_kill"] for s in killed["targets"]), killed

    manifest = _manifest(manifest_path)
    stages = manifest["stages"]
    # Fine-tuning asked for the stand-in accelerator and ran on the node that has it.
    assert stages["finetune"]["all"]["ray_node_id"] == standin.node_id
    # Extraction spread over two nodes (SPREAD), and the grid finished everywhere else.
    assert len({u["ray_node_id"] for u in stages["extract"].values()}) == 2
    plast = stages["plasticity"]
    assert set(plast) == {f"target={s}" for s in FAST_STEPS}
    # The killed node's uncommitted targets ran again elsewhere, except at most one: a result
    # the actor had already returned when the node died (its actor works one target at a time)
    # can still reach the manifest after the kill, with the dead node's id.
    lost = [s for s in killed["targets"] if f"target={s}" not in killed["done_at_kill"]]
    on_dead_node = [s for s in lost if plast[f"target={s}"]["ray_node_id"] == killed["node"]]
    assert len(on_dead_node) <= 1, (killed, {s: plast[f"target={s}"] for s in lost})
    grid_nodes = {u["ray_node_id"] for u in plast.values()}
    assert len(grid_nodes) >= 2 and grid_nodes <= {head_id, *workers}  # the grid spread
    assert manifest["status"] == "done"

    storage = Storage.from_config(StorageConfig(uri=f"file://{tmp_path}/store"))
    counts = assert_whole_and_unique(storage, run_id)
    assert counts["plasticity"] > 0 and counts["checkpoints"] == 3
