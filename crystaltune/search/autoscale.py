"""Plan a search on what an autoscaling cluster can become, not only on the nodes that are up.

A fresh ``ray up cluster.yaml`` cluster is its head alone: planning from ``ray.cluster_resources()``
would train on the head's CPUs and never ask for a GPU node. The node types and their max counts live
in the autoscaling config the head's autoscaler reads (``~/ray_bootstrap_config.yaml`` on a ``ray up``
cluster; Ray 2.60's v1 autoscaler does not publish them in GCS), so the search reads that file, plans
``auto`` resources from its node types, asks the autoscaler for the nodes while the graphs are built
(``ray.autoscaler.sdk.request_resources``) and withdraws the request when it ends.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import CrystaltuneError
from . import coordinator

_log = logging.getLogger(__name__)

CONFIG_ENV = "CRYSTALTUNE_AUTOSCALING_CONFIG"
BOOTSTRAP = Path("~/ray_bootstrap_config.yaml")
#: the label cluster.yaml gives each node type, so a trial can say where it ran
NODE_TYPE_LABEL = "crystaltune.io/node-type"


@dataclass(frozen=True)
class NodeType:
    """One ``available_node_types`` entry: its logical resources and how many the autoscaler may add."""

    name: str
    cpus: float
    gpus: float
    max_workers: int

    def describe(self) -> str:
        return f"{self.name} (GPU {self.gpus:g}, CPU {self.cpus:g})"


@dataclass(frozen=True)
class ClusterShape:
    """What the cluster can become: the head's type and the worker types, from one config file."""

    source: str
    head: NodeType
    workers: tuple[NodeType, ...]

    @property
    def types(self) -> tuple[NodeType, ...]:
        return (self.head, *self.workers)

    @property
    def gpu_types(self) -> tuple[NodeType, ...]:
        return tuple(t for t in self.workers if t.gpus >= 1 and t.max_workers > 0)

    def describe(self) -> str:
        parts = [f"head {self.head.describe()}"] + [f"<= {t.max_workers} x {t.describe()}" for t in self.workers]
        return "; ".join(parts)


def find_config(explicit: str | None = None, address: str | None = None) -> Path | None:
    """The autoscaling config: ``--autoscaling-config``, ``$CRYSTALTUNE_AUTOSCALING_CONFIG``, the file the
    autoscaler of the cluster at ``address`` was started with (if it runs on this machine), or
    ``~/ray_bootstrap_config.yaml``."""
    for given in (explicit, os.environ.get(CONFIG_ENV)):
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise CrystaltuneError(f"autoscaling config {given}: no such file")
            return path
    running = _running_monitor_config(address)
    if running is not None:
        return running
    bootstrap = BOOTSTRAP.expanduser()
    return bootstrap if bootstrap.is_file() else None


def _gcs_port(address: str | None) -> int | None:
    """The GCS port ``address`` (``auto`` or HOST:PORT) names, as ``ray.init`` would resolve it."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(address) if address else None
        return int(resolved.rsplit(":", 1)[1]) if resolved else None
    except Exception:
        return None


def _running_monitor_config(address: str | None) -> Path | None:
    """``--autoscaling-config`` of the autoscaler (monitor.py) of the cluster at ``address``, if it runs on
    this machine (its ``--gcs-address`` port matches: another cluster's autoscaler is not this one's)."""
    import psutil

    port = _gcs_port(address)
    if port is None:
        return None
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any(part.endswith("monitor.py") for part in cmd) and "--gcs-address" in " ".join(cmd):
            gcs = next((p.split("=", 1)[1] for p in cmd if p.startswith("--gcs-address=")), "")
            if not gcs.endswith(f":{port}"):
                continue
            for part in cmd:
                if part.startswith("--autoscaling-config="):
                    path = Path(part.split("=", 1)[1]).expanduser()
                    if path.is_file():
                        return path
    return None


def read_shape(path: Path) -> ClusterShape:
    """Node types of an autoscaling config (YAML or JSON); a one-line error naming the file otherwise."""
    try:
        raw = yaml.safe_load(path.read_text())
        types, head_name = raw["available_node_types"], raw["head_node_type"]
        parsed = {name: _node_type(name, spec) for name, spec in types.items()}
        head = parsed.pop(head_name)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CrystaltuneError(
            f"autoscaling config {path}: unreadable ({type(exc).__name__}: {str(exc)[:120]}); it needs "
            "available_node_types with resources and head_node_type"
        ) from None
    return ClusterShape(str(path), head, tuple(parsed.values()))


def _node_type(name: str, spec: dict) -> NodeType:
    res = spec.get("resources") or {}
    return NodeType(name, float(res.get("CPU", 0)), float(res.get("GPU", 0)), int(spec.get("max_workers", 0)))


def cluster_shape(explicit: str | None = None, address: str | None = None) -> ClusterShape | None:
    """The shape of the cluster to plan on, or None where no autoscaler config is found."""
    path = find_config(explicit, address)
    return read_shape(path) if path else None


def resolve_auto(space, shape: ClusterShape, trials_per_gpu: int | None = None) -> None:
    """``auto`` amounts from the node types: GPU trials packed as on one machine when any type has GPUs
    (every GPU type gets the same packing, each trial an equal share of the CPUs of the smallest), else
    one CPU per worker. A Ray Train trial's driver needs one CPU besides its workers."""
    from .plan import TRIALS_PER_GPU

    gpu_types = shape.gpu_types
    if space.gpus_per_worker is None:
        per_gpu = trials_per_gpu or TRIALS_PER_GPU
        space.gpus_per_worker = (1.0 / per_gpu if space.workers == 1 else 1.0) if gpu_types else 0.0
    if space.cpus_per_worker is None:
        driver = 1 if space.uses_ray_train else 0
        if space.gpus_per_worker and gpu_types:
            shares = [(t.cpus - driver) / max(1, int(t.gpus / space.gpus_per_worker + 1e-9)) for t in gpu_types]
            space.cpus_per_worker = float(max(1, math.floor(min(shares))))
        else:
            space.cpus_per_worker = 1.0


def bundle(space) -> dict[str, float]:
    """What one worker of a trial asks Ray for."""
    return {"CPU": space.cpus_per_worker, **({"GPU": space.gpus_per_worker} if space.gpus_per_worker else {})}


def _fits(t: NodeType, b: dict[str, float]) -> int:
    """How many bundles ``b`` one node of type ``t`` holds."""
    counts = [int(t.cpus // b["CPU"]) if b["CPU"] else 10**6]
    if b.get("GPU"):
        counts.append(int(t.gpus / b["GPU"] + 1e-9))
    return min(counts)


def plan_concurrency(space, shape: ClusterShape) -> int:
    """Trials at once when every node type is at its max; refused in one line, naming the largest node
    type, when no node type can ever hold one worker (or the cluster at its max, one whole trial)."""
    b = bundle(space)
    per_node = {t.name: _fits(t, b) for t in shape.types}
    capacity = per_node[shape.head.name] + sum(per_node[t.name] * t.max_workers for t in shape.workers)
    largest = max(shape.types, key=lambda t: (t.gpus, t.cpus))
    if capacity < space.workers or not any(per_node.values()):
        want = f"{b['CPU']:g} CPU" + (f" + {b['GPU']:g} GPU" if b.get("GPU") else "")
        raise CrystaltuneError(
            f"no node type of the cluster can ever hold one trial: each of its {space.workers} worker(s) needs "
            f"{want}; the largest node type is {largest.describe()} (autoscaling config {shape.source})"
        )
    return max(1, capacity // space.workers)


@dataclass
class NodeRequest:
    """The autoscaler request of one search: the nodes its first ``trials`` packed trials need, asked
    for while the graphs are built and withdrawn once when it ends (never left keeping nodes up)."""

    address: str
    shape: ClusterShape
    concurrency: int  # packed trials at once with every node type at its max
    trials: int  # of them, the ones this search asks nodes for
    expire_s: float  # the request stands this long at most (the search's stall timeout)
    line: str = ""  # what the console says is waited for
    started: float = 0.0  # time.time() of the request
    requester: str = field(default_factory=lambda: f"crystaltune-{uuid.uuid4().hex[:12]}")
    _proc: subprocess.Popen | None = None
    _released: bool = False

    def start(self, space) -> None:
        """Ask from a short-lived process (the driver builds its graphs in forked workers, which must
        not inherit a Ray connection)."""
        bundles = [bundle(space)] * (self.trials * space.workers)
        if space.uses_ray_train:
            bundles += [{"CPU": 1.0}] * self.trials
        nodes = _expected_nodes(space, self.trials, self.shape)
        self.line = f"waiting for the autoscaler: {nodes} for {self.trials} packed trial(s)"
        self.started = time.time()
        self._proc = _in_a_process(self.address, "request", self.requester, bundles=bundles, expire_s=self.expire_s)

    def release(self) -> None:
        """Withdraw the request so the idle timeout takes the nodes back to their minimum. The asking
        process is finished first: a request it made after the withdrawal would keep nodes up."""
        if self._released:
            return
        self._released = True
        try:
            _finish(self._proc)
            import ray

            if ray.is_initialized():
                coordinator.release(self.requester, self.started)
            else:
                _finish(_in_a_process(self.address, "release", self.requester, since=self.started))
        except Exception as exc:  # never let clean-up hide the search's own outcome
            _log.warning(f"could not withdraw the autoscaler request: {type(exc).__name__}: {exc}")


def _expected_nodes(space, trials: int, shape: ClusterShape) -> str:
    b = bundle(space)
    kinds = shape.gpu_types if b.get("GPU") else tuple(t for t in shape.workers if t.max_workers > 0) or shape.types
    t = next((t for t in kinds if _fits(t, b)), kinds[0] if kinds else shape.head)
    per_node = max(1, _fits(t, b) // space.workers)
    return f"{min(t.max_workers or 1, math.ceil(trials / per_node))} x {t.describe()}"


def _finish(proc: subprocess.Popen | None, timeout_s: float = 120.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _in_a_process(address: str, action: str, requester: str, **args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", coordinator.__name__, address, action, requester, json.dumps(args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_a_trial_slot(space, timeout_s: float, line: str) -> float:
    """Block until some alive node can hold one trial's worker (the autoscaler is slow to start nodes);
    one error line after ``timeout_s`` when none came up. Returns the seconds waited."""
    import ray

    b, t0 = bundle(space), time.time()
    _log.info(line)
    while True:
        if any(_node_fits(n, b) for n in ray.nodes() if n.get("Alive")):
            return time.time() - t0
        if time.time() - t0 > timeout_s:
            raise CrystaltuneError(
                f"the autoscaler brought up no node that can hold a trial ({_bundle_text(b)}) within "
                f"{timeout_s:g} s (--stall-timeout); see `ray status` on the head"
            )
        time.sleep(1.0)


def _node_fits(node: dict, b: dict[str, float]) -> bool:
    res = node.get("Resources", {})
    return res.get("CPU", 0) >= b["CPU"] and res.get("GPU", 0) + 1e-9 >= b.get("GPU", 0)


def _bundle_text(b: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in b.items())


def describe_cluster() -> str:
    """The nodes up now, by type: e.g. '1 x head (CPU 0), 2 x worker.gpu1 (GPU 1, CPU 2); GPUs 2, CPUs 4'."""
    import ray

    counts: dict[str, int] = {}
    res_of: dict[str, str] = {}
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        name = node_type_of(n)
        counts[name] = counts.get(name, 0) + 1
        r = n.get("Resources", {})
        res_of[name] = (f"GPU {r.get('GPU', 0):g}, " if r.get("GPU") else "") + f"CPU {r.get('CPU', 0):g}"
    total = ray.cluster_resources()
    nodes = ", ".join(f"{c} x {name} ({res_of[name]})" for name, c in sorted(counts.items()))
    return f"{nodes}; GPUs {total.get('GPU', 0):g}, CPUs {total.get('CPU', 0):g}"


def node_type_of(node: dict) -> str:
    """A node's type: its crystaltune label, else 'head' for the head, else 'worker'."""
    labels = node.get("Labels") or {}
    if NODE_TYPE_LABEL in labels:
        return labels[NODE_TYPE_LABEL]
    return "head" if "node:__internal_head__" in node.get("Resources", {}) else "worker"
