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
from pathlib import Path
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


#: seconds a TCP connect to a cluster's GCS port may take before --address is refused
PROBE_TIMEOUT_S = 5.0


def resolve_address(address: str) -> tuple[str, int]:
    """(host, port) of ``--address``: ``auto`` as Ray resolves it (``RAY_ADDRESS``, the last ``ray
    start``, a running local instance), ``ray://HOST:PORT`` or ``HOST:PORT``."""
    from ray._common.network_utils import parse_address
    from ray._private.services import get_ray_address_from_environment

    target = address
    if address == "auto":
        try:
            target = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise CrystaltuneError(
                "--address auto: no running Ray cluster found on this machine (RAY_ADDRESS is unset and "
                "no `ray start` is running); start one (`ray start --head`) or leave --address out"
            ) from None
    parsed = parse_address(target.removeprefix("ray://"))
    if parsed is None or not str(parsed[1]).isdigit() or not 0 < int(parsed[1]) < 65536:
        raise CrystaltuneError(f"--address {address}: expected 'auto' or HOST:PORT, e.g. 127.0.0.1:6379")
    return parsed[0], int(parsed[1])


#: an HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with its own
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S, handshake: bool = True) -> str | None:
    """None when a gRPC server (as Ray's GCS is) answers at host:port within ``timeout``, else why not:
    nothing listening, no answer, or a server of another kind (e.g. the dashboard's HTTP port).
    ``handshake=False`` checks only that something accepts the connection."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            if not handshake or os.environ.get("RAY_USE_TLS", "0") in ("1", "true"):
                return None  # (with TLS a TLS handshake comes first: the TCP connection is all we check)
            conn.sendall(_H2_HELLO)
            head = b""
            while len(head) < 9:
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if len(head) == 9 and head[3] == 0x04:  # the server's SETTINGS frame
        return None
    return f"something answers, but not a Ray GCS (it sent {head[:16]!r})"


def private_instance_owner(port: int) -> str | None:
    """The process that started the local Ray instance whose GCS listens on ``port``, when that
    instance is a driver's own (``ray.init`` without ``ray start``, e.g. another search's): it stops
    when that process ends, and every driver that joined it dies with it. None for a standing one."""
    import psutil

    for proc in psutil.process_iter(["ppid", "cmdline"]):
        args = proc.info["cmdline"] or []
        if not args or Path(args[0]).name != "raylet":
            continue
        if not any(a.startswith("--gcs-address=") and a.rsplit(":", 1)[-1] == str(port) for a in args):
            continue
        try:
            parent = psutil.Process(proc.info["ppid"])
            cmd = parent.cmdline()
        except (psutil.Error, OSError):
            return None
        if parent.pid == 1 or (any(Path(a).name == "ray" for a in cmd[:2]) and "start" in cmd):
            return None  # `ray start`: the instance outlives the command that started it
        command = " ".join(" ".join([Path(cmd[0]).name, *cmd[1:]]).split())  # one line, whatever its arguments
        return f"pid {parent.pid} ({command[:100]})"
    return None


def check_address(address: str) -> tuple[str, int]:
    """Before any work: ``--address`` resolves, something listens there (a dead address made
    ``ray.init`` retry for minutes without a word), and it is not another process's private instance."""
    host, port = resolve_address(address)
    why = probe(host, port)
    if why is not None:
        raise CrystaltuneError(
            f"--address {address}: no Ray cluster at {host}:{port} ({why}); start one there "
            "(`ray start --head`, `ray up cluster.yaml`) or leave --address out"
        )
    owner = private_instance_owner(port) if _is_local(host) else None
    if owner is not None:
        raise CrystaltuneError(
            f"--address {address}: that Ray instance is the private one of {owner} and stops when it "
            "ends, killing every search that joined it; run both searches on a standing Ray instead: "
            "`RAY_AUTH_MODE=token ray start --head --node-ip-address 127.0.0.1`, then --address "
            "127.0.0.1:6379 for each"
        )
    return host, port


def _is_local(host: str) -> bool:
    """Whether ``host`` names this machine (loopback or one of its own addresses)."""
    from ray._common.network_utils import get_all_interfaces_ip, is_localhost

    try:
        return bool(is_localhost(host)) or host in get_all_interfaces_ip()
    except Exception:  # interface listing is best effort
        return bool(is_localhost(host))


def join_ray(address: str) -> None:
    """``ray.init(address=...)`` of a running cluster (``auto``, ``HOST:PORT``) with token auth. A
    cluster that listens on 127.0.0.1 only is joined on 127.0.0.1: Ray would otherwise replace a
    loopback address with this machine's network address, where nothing answers, and retry forever."""
    require_token_auth()
    import ray
    from ray._common.network_utils import is_localhost
    from ray._private.services import get_node_ip_address

    host, port = check_address(address)
    loopback_only = is_localhost(host) and probe(get_node_ip_address(), port, timeout=1.0) is not None
    try:
        if loopback_only:
            with _loopback_only():
                ray.init(address=f"{LOOPBACK}:{port}", log_to_driver=False)
        else:
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
