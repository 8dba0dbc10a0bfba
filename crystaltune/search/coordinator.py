"""The search's node requests, made through Ray's autoscaling coordinator so nothing overwrites them
and nothing stays requested or pinned after the search.

Ray 2.60 funnels node requests through one detached actor, the ``AutoscalingCoordinator``: Ray Train
registers each DDP run's workers with it, and every 20 s it writes the merged requests of all its
requesters over the autoscaler's request channel. A request written there directly (as
``ray.autoscaler.sdk.request_resources`` does) is overwritten within 20 s. Left to Ray, the actor is
created on the first Train controller's node: on a cluster whose head offers no CPU, a GPU worker
node, which then never counts as idle and is never scaled down; and a Train run that ends without
cancelling keeps its request for 180 s. So the search creates the coordinator on the head, asks
through it under a requester id of its own, and at its end cancels its own request and the Train
requests first made since it began (a live Train run re-sends its own within 20 s). Where Ray has no
coordinator the search falls back to ``request_resources``.
"""

from __future__ import annotations

import logging

_log = logging.getLogger(__name__)

NAME = NAMESPACE = "AutoscalingCoordinator"
#: slack for the head's clock when matching the Train requests a search made
CLOCK_SLACK_S = 60.0


def coordinator():
    """Ray's coordinator actor, created on the head node if absent; None where Ray has none."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            _AutoscalingCoordinatorActor,
        )
    except ImportError:
        return None
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_AutoscalingCoordinatorActor)
    on_head = NodeAffinitySchedulingStrategy(_head_node_id(), soft=False)
    options = dict(name=NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached")
    return actor.options(**options, scheduling_strategy=on_head).remote()


def request(requester: str, bundles: list[dict[str, float]], expire_s: float) -> None:
    """Ask for nodes that hold ``bundles``, standing for ``expire_s`` unless withdrawn first."""
    import ray

    try:
        handle = coordinator()
        if handle is not None:
            asked = handle.request_resources.remote(requester_id=requester, resources=bundles, expire_after_s=expire_s)
            ray.get(asked, timeout=60)
            return
    except Exception as exc:
        _log.warning(f"asking the autoscaler directly: its coordinator failed ({type(exc).__name__}: {exc})")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def release(requester: str, since: float) -> None:
    """Withdraw this search's request and the Train requests first made since ``since``; stop a
    coordinator that holds a worker node with nothing left to ask for."""
    import ray

    try:
        handle = ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])  # asked directly (a Ray without the coordinator)
        return
    stale = ray.get(handle.__ray_call__.remote(_requesters, since - CLOCK_SLACK_S), timeout=30)
    for requester_id in {requester, *stale}:
        ray.get(handle.cancel_request.remote(requester_id), timeout=30)
    left = ray.get(handle.__ray_call__.remote(_requesters, 0.0, False), timeout=30)
    if not left and _actor_node(handle) not in (None, _head_node_id()):
        ray.kill(handle, no_restart=True)  # recreated on demand by the next request


def _requesters(actor, since: float, train_only: bool = True) -> list:
    """Runs inside the coordinator: the ids of its requests first made at or after ``since``."""
    reqs = getattr(actor, "_ongoing_reqs", {})
    return [
        k for k, r in reqs.items() if (not train_only or str(k).startswith("train-")) and r.first_request_time >= since
    ]


def _head_node_id() -> str | None:
    import ray

    return next(
        (n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n["Resources"]), None
    )


def _actor_node(handle) -> str | None:
    from ray.util.state import get_actor

    state = get_actor(handle._actor_id.hex())
    return state.node_id if state else None


def main(argv: list[str]) -> None:
    """``python -m crystaltune.search.coordinator ADDRESS request|release REQUESTER JSON``: the
    same from a short-lived process (the driver builds graphs in forked workers first, which must not
    inherit a Ray connection)."""
    import json

    import ray

    address, action, requester, payload = argv
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    args = json.loads(payload)
    request(requester, args["bundles"], args["expire_s"]) if action == "request" else release(requester, args["since"])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
