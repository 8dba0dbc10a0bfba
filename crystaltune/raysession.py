"""Starting or joining Ray safely: a local instance listens on 127.0.0.1 only, and every Ray
connection uses Ray's token authentication (the token lives in ``~/.ray/auth_token`` unless
``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` say otherwise).

Ray binds its gRPC servers (GCS, raylet, core workers, agents) to the node's address, and on Linux it
replaces a loopback ``node_ip_address`` with the machine's routable address unless multi-node
clusters are switched off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what Ray does on macOS). A local
search does exactly that, so nothing of it is reachable from the network.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import CrystaltuneError

LOOPBACK = "127.0.0.1"
CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def require_token_auth() -> None:
    """Check Ray's token authentication is on for this process and every process Ray starts from it
    (``crystaltune/__init__`` sets it before Ray is imported). ``RAY_AUTH_MODE=disabled`` is refused:
    it would let anyone who reaches a port run code here."""
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if mode != "token":
        raise CrystaltuneError(
            f"RAY_AUTH_MODE={mode!r}: crystaltune runs Ray with token authentication only; unset it "
            "(a local search creates the token; a cluster shares one, see the README's Cluster section)"
        )
    os.environ["RAY_AUTH_MODE"] = "token"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """While Ray starts, keep it (and the processes it spawns, which inherit this environment) on
    127.0.0.1; then put this process's settings back, so a later ``ray start`` here can still join a
    cluster."""
    import ray._private.ray_constants as constants  # read at import time: set the live value too

    old_env, old_flag = os.environ.get(CLUSTER_SWITCH), constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_SWITCH] = "0"
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(CLUSTER_SWITCH, None)
        else:
            os.environ[CLUSTER_SWITCH] = old_env


def start_local_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """``ray.init`` of a new single-machine instance bound to 127.0.0.1 with token auth."""
    require_token_auth()
    import ray

    with _loopback_only():
        ray.init(num_cpus=num_cpus, _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, log_to_driver=False, **kwargs)


def join_ray(address: str) -> None:
    """``ray.init(address=...)`` of a running cluster (``auto``, ``HOST:PORT``) with token auth."""
    require_token_auth()
    import ray

    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:
        raise CrystaltuneError(
            f"--address {address}: no Ray cluster answers there ({str(exc).splitlines()[0][:200]}); "
            "start one (`ray start --head`, `ray up cluster.yaml`) or leave --address out"
        ) from None


def init_ray(address: str | None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Join ``address`` if given, else start a loopback-only local instance."""
    if address:
        join_ray(address)
    else:
        start_local_ray(num_cpus, **kwargs)
