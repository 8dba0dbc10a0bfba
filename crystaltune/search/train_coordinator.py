"""Keep Ray Train's autoscaling coordinator from holding GPU nodes up after a search.

Ray Train (2.60) asks for each DDP trial's workers through one detached actor, the
``AutoscalingCoordinator``, which it creates on the node of the first Train controller: on a cluster
whose head offers no CPU, a GPU worker node, which then never counts as idle and is never scaled
down. The coordinator also re-sends each run's request every 20 s until it expires, 180 s after a
run that ended without cancelling it. So a search that runs Train trials on an autoscaling cluster
creates the coordinator on the head first, and at its end cancels the Train requests it made and
stops a coordinator left on a worker node once nothing is requested. All best effort: the
coordinator is Ray-internal, and a Ray without it changes nothing here.
"""

from __future__ import annotations

import logging

_log = logging.getLogger(__name__)

NAME = NAMESPACE = "AutoscalingCoordinator"
#: slack for the head's clock when matching the requests this search made
CLOCK_SLACK_S = 60.0


def pin_to_head() -> None:
    """Create the coordinator on the head node before any Train controller can create it elsewhere."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = _head_node_id()
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            _AutoscalingCoordinatorActor,
        )

        actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_AutoscalingCoordinatorActor)
        options = dict(name=NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached")
        actor.options(**options, scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    except Exception as exc:
        _log.warning(f"Ray Train's autoscaling coordinator could not be placed on the head: {exc}")


def release(since: float) -> None:
    """Cancel the Train requests first made since ``since`` (a live Train run re-sends its own within
    20 s), then stop a coordinator that holds a worker node with nothing left to ask for."""
    import ray

    try:
        coordinator = ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        return  # no Train run ever asked the autoscaler for anything
    try:
        for requester in ray.get(coordinator.__ray_call__.remote(_train_requesters, since - CLOCK_SLACK_S), timeout=10):
            ray.get(coordinator.cancel_request.remote(requester), timeout=10)
        left = ray.get(coordinator.__ray_call__.remote(_train_requesters, 0.0, False), timeout=10)
        if not left and _actor_node(coordinator) not in (None, _head_node_id()):
            ray.kill(coordinator, no_restart=True)  # recreated on demand by the next Train run
    except Exception as exc:
        _log.warning(f"Ray Train's node requests may hold nodes for up to 180 s more: {type(exc).__name__}: {exc}")


def _train_requesters(actor, since: float, train_only: bool = True) -> list:
    """Runs inside the coordinator: the requester ids of its requests first made at or after ``since``."""
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
