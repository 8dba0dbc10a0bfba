"""The cluster path on Ray's own autoscaler: a fake multi-node cluster (provider ``fake_multinode``, each
"node" a local raylet with logical resources) set up as cluster.yaml is, a CPU-less head and a GPU
worker type starting at 0 nodes. The search must plan GPU trials from the node types, have the
autoscaler start the nodes, train nothing on the head, survive a node's loss, run DDP across two nodes,
refuse what no node type can hold, and leave no request behind. One cluster serves the module."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from crystaltune.search.autoscale import NODE_TYPE_LABEL, read_shape

pytestmark = pytest.mark.timeout(900)  # a hung cluster fails its test instead of the CI run
pytestmark = pytest.mark.slow  # a fake multi-node cluster and real searches on it: `make test-slow`

GCS_PORT = 6379  # the fake provider starts its nodes against Ray's default GCS port

CONFIG = {
    "cluster_name": "crystaltune-test",
    "max_workers": 2,
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "auth": {},
    "docker": {},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "max_workers": 0, "node_config": {}},
        "worker.gpu1": {
            "resources": {"CPU": 2, "GPU": 1},
            "labels": {NODE_TYPE_LABEL: "worker.gpu1"},
            "min_workers": 0,
            "max_workers": 2,
            "node_config": {},
        },
    },
    "head_node_type": "ray.head.default",
    **{k: {} for k in ("file_mounts",)},
    **{
        k: []
        for k in (
            "cluster_synced_files",
            "rsync_exclude",
            "rsync_filter",
            "initialization_commands",
            "setup_commands",
            "head_setup_commands",
            "worker_setup_commands",
            "head_start_ray_commands",
            "worker_start_ray_commands",
        )
    },
    "file_mounts_sync_continuously": False,
}

SPACE = """name: gpu-smoke
dataset: {name: perovskites, targets: [band_gap], split_seed: 0, limit: 160}
budget: {num_samples: 2, max_epochs: 2, grace_period: 2, reduction_factor: 2}
resources: {workers: 1, cpus_per_worker: auto, gpus_per_worker: auto}
fixed: {train.batch_size: 32, model.hidden: 16, model.head_hidden: 16, model.layers: 1}
search:
  optim.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    """The autoscaling cluster: a head with no CPU and up to 2 x worker.gpu1 (CPU 2, GPU 1), from 0."""
    if not _port_free(GCS_PORT):
        pytest.skip(f"port {GCS_PORT} is taken: the fake autoscaler needs Ray's default GCS port")
    tmp = tmp_path_factory.mktemp("fake-cluster")
    cfg = tmp / "autoscaling.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "CRYSTALTUNE_FAKE_GPUS": "1",  # nodes inherit it: trials on logical GPUs train on the CPU
        "CRYSTALTUNE_AUTOSCALING_CONFIG": str(cfg),
    }
    head = [
        ray_bin,
        "start",
        "--head",
        f"--autoscaling-config={cfg}",
        "--num-cpus=0",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats",
    ]
    subprocess.run(head, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield {"env": env, "config": cfg, "tmp": tmp}
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree("/tmp/ray/session_latest", ignore_errors=True)


def _search(fake, tmp_path: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    (tmp_path / "gpu.yaml").write_text(SPACE)
    (tmp_path / "shared").mkdir(exist_ok=True)
    args = [sys.executable, "-m", "crystaltune.search", str(tmp_path / "gpu.yaml"), "--address", "auto"]
    args += ["--output", str(tmp_path / "out"), "--storage", str(tmp_path / "shared"), "--storage-shared"]
    return subprocess.run(
        [*args, *extra, "--json"], cwd=tmp_path, capture_output=True, text=True, env=fake["env"], timeout=timeout
    )


def _trial_runs(tmp_path: Path, experiment: str = "crystaltune-gpu-smoke"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("crystaltune.kind") == "trial"], runs


def _overlap(runs) -> bool:
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_shape_of_the_shipped_cluster_yaml_plans_packed_gpu_trials():
    """cluster.yaml read as the search reads ~/ray_bootstrap_config.yaml: the head offers no CPU, auto
    packs 4 trials a GPU with the CPUs of the smaller GPU node shared among them."""
    from crystaltune.search.autoscale import plan_concurrency, resolve_auto
    from crystaltune.search.space import load_space

    shape = read_shape(Path(__file__).resolve().parents[1] / "cluster.yaml")
    assert shape.head.cpus == 0 and {t.name for t in shape.gpu_types} == {"worker.gpu1", "worker.gpu4"}
    space = load_space("sunmat")
    resolve_auto(space, shape)
    assert space.gpus_per_worker == 0.25 and space.cpus_per_worker == 1.0
    assert plan_concurrency(space, shape) == 4 * 4 + 2 * 16


def test_auto_space_scales_gpu_nodes_from_zero_and_packs_trials_on_them(fake_cluster, tmp_path):
    """(a) auto: a GPU node is launched for the 2 trials, which run on it at once (2 per logical GPU:
    CPU 2 / 1 each), none on the head; all finish; MLflow has each once, with where it ran."""
    t0 = time.time()
    out = _search(fake_cluster, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "waiting for the autoscaler: 1 x worker.gpu1 (GPU 1, CPU 2) for 2 packed trial(s)" in text, text[-3000:]
    trials, runs = _trial_runs(tmp_path)
    assert sorted(r.info.run_name.split()[0] for r in trials) == ["t001", "t002"]
    assert all(r.info.status == "FINISHED" for r in trials)
    assert {r.data.tags["crystaltune.node_type"] for r in trials} == {"worker.gpu1"}
    parent = next(r for r in runs if r.data.tags.get("crystaltune.kind") == "search")
    assert parent.data.params["search.gpus_per_worker"] == "0.25"
    assert all(r.data.tags["crystaltune.gpu_share"] == "0.25" for r in trials)
    assert len({r.data.tags["crystaltune.node_id"] for r in trials}) == 1 and _overlap(trials)
    assert "worker.gpu1" in parent.data.params["search.cluster"]
    first_start = min(r.info.start_time for r in trials) / 1000
    assert first_start - t0 < 120  # the first GPU trial within 2 minutes, counted from 0 worker nodes


def test_trials_per_gpu_packs_two_on_each_logical_gpu(fake_cluster, tmp_path):
    """(b) --trials-per-gpu 2 on a cluster whose head has no GPU: planned from the node types."""
    out = _search(fake_cluster, tmp_path, "--trials-per-gpu", "2", "--max-epochs", "1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials, _ = _trial_runs(tmp_path)
    assert len(trials) == 2 and all(r.data.tags["crystaltune.gpu_share"] == "0.5" for r in trials)
    assert {r.data.tags["crystaltune.node_type"] for r in trials} == {"worker.gpu1"}


def test_a_request_no_node_type_can_hold_is_refused_in_seconds(fake_cluster, tmp_path):
    """(e) 2 GPUs per worker: no node type has them; one line naming the largest, before any graph."""
    t0 = time.time()
    out = _search(fake_cluster, tmp_path, "--gpus-per-worker", "2")
    assert out.returncode == 2 and time.time() - t0 < 30, out.stderr[-2000:]
    assert out.stderr.startswith("error: no node type of the cluster can ever hold one trial") and (
        "the largest node type is worker.gpu1 (GPU 1, CPU 2)" in out.stderr
    ), out.stderr
    assert out.stderr.strip().count("\n") == 0


def test_a_local_storage_path_is_refused_on_a_multi_node_cluster(fake_cluster, tmp_path):
    (tmp_path / "gpu.yaml").write_text(SPACE)
    args = [sys.executable, "-m", "crystaltune.search", str(tmp_path / "gpu.yaml"), "--address", "auto"]
    out = subprocess.run(
        [*args, "--output", str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=fake_cluster["env"],
        timeout=120,
    )
    assert out.returncode == 2 and "--storage-shared" in out.stderr and "s3://" in out.stderr, out.stderr


def test_ddp_trial_spans_two_nodes(fake_cluster, tmp_path):
    """(d) 2 workers x 1 GPU: one per worker.gpu1 node (gloo on the CPU here)."""
    out = _search(
        fake_cluster,
        tmp_path,
        "--workers-per-trial",
        "2",
        "--gpus-per-worker",
        "1",
        "--num-samples",
        "1",
        "--max-epochs",
        "1",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials, _ = _trial_runs(tmp_path)
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    assert trials[0].data.tags["crystaltune.gpu_share"] == "1"  # 2 workers x 1 GPU: two 1-GPU nodes


def _node_processes(node_id: str) -> list:
    """Every process of one fake node (its raylet, agents and workers inherit the node id the fake
    provider sets in their environment): killing them all is what losing the machine does."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def test_a_worker_node_killed_mid_trial_is_replaced_and_its_trials_finish(fake_cluster, tmp_path):
    """(c) the node of a running trial dies after its first epoch: the autoscaler starts another (the
    request stands), Tune retries the trial there from its checkpoint, and the search finishes."""
    (tmp_path / "gpu.yaml").write_text(
        SPACE.replace("max_epochs: 2, grace_period: 2", "max_epochs: 40, grace_period: 40")
    )
    (tmp_path / "shared").mkdir()
    args = [sys.executable, "-m", "crystaltune.search", str(tmp_path / "gpu.yaml"), "--address", "auto", "--json"]
    args += ["--output", str(tmp_path / "out"), "--storage", str(tmp_path / "shared"), "--storage-shared"]
    log = open(tmp_path / "search.log", "w")
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=fake_cluster["env"])
    try:
        deadline, running = time.time() + 300, None
        while time.time() < deadline and proc.poll() is None and running is None:
            running = _running_trial_node(tmp_path)
            time.sleep(0.5)
        assert running is not None, (tmp_path / "search.log").read_text()[-3000:]
        run_id, node = running
        victims = _node_processes(node)
        assert victims and not node.endswith("00000"), node
        for p in victims:
            p.kill()
        assert _running_trial_node(tmp_path) is not None  # killed mid-trial, not after it had finished
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "search.log").read_text()
    assert rc == 0, text[-4000:]
    trials, _ = _trial_runs(tmp_path)
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials), [
        (r.info.run_name, r.info.status, r.data.tags.get("crystaltune.error")) for r in trials
    ]
    moved = next(r for r in trials if r.info.run_id == run_id)
    assert moved.data.tags["crystaltune.node_id"] != node  # it finished on another node


def _running_trial_node(tmp_path: Path) -> tuple[str, str] | None:
    """(run id, node id) of a trial that is running and has reported an epoch, read from MLflow's store."""
    import sqlite3

    db = tmp_path / "mlflow.db"
    if not db.exists():
        return None
    query = (
        "select r.run_uuid, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
        "where r.status = 'RUNNING' and t.key = 'crystaltune.node_id'"
    )
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            row = con.execute(query).fetchone()
    except sqlite3.Error:
        return None
    return (row[0], row[1]) if row else None


def test_nodes_go_back_to_zero_and_nothing_stays_requested(fake_cluster):
    """After the searches: the request withdrawn, the idle GPU nodes stopped by the autoscaler (Ray
    Train's detached coordinator actor, left to itself, lands on a GPU node and pins it up for good)."""
    code = (
        "import json, time, ray\n"
        "from ray.experimental.internal_kv import _internal_kv_get\n"
        "ray.init(address='auto', log_to_driver=False, logging_level='ERROR')\n"
        "deadline = time.time() + 90\n"
        "while time.time() < deadline and ray.cluster_resources().get('GPU', 0) > 0:\n"
        "    time.sleep(2)\n"
        "req = _internal_kv_get('autoscaler_resource_request')\n"
        "print(json.dumps({'gpus': ray.cluster_resources().get('GPU', 0), 'request': req.decode() if req else ''}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=fake_cluster["env"], timeout=150
    )
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["gpus"] == 0, state
    assert json.loads(state["request"] or "[]") in ([], {"bundles": []}), state
