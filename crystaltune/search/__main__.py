"""``python -m crystaltune.search NAME|FILE.yaml``: hyperparameter search with Ray Tune + Optuna +
ASHA over Ray Train (DDP) trials, tracked in MLflow."""

from __future__ import annotations

import argparse
import sys

from ..errors import cli_main
from ..outputs import dumps_json
from .engine import SearchOptions, run_search, sigterm_as_ctrl_c


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crystaltune.search", description=__doc__)
    p.add_argument(
        "space", help="search space: a name in search_spaces/ (smoke, perovskites, perov5, sunmat) or a .yaml path"
    )
    p.add_argument("--num-samples", type=int, help="number of trials (overrides budget.num_samples)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial at most (overrides budget.max_epochs)")
    p.add_argument(
        "--grace-period",
        type=int,
        help="ASHA's first rung in epochs (overrides budget.grace_period; = --max-epochs runs every trial "
        "to the full budget, as `report` needs to measure how well early rungs predict the final MAE)",
    )
    p.add_argument("--address", help="Ray cluster: 'auto' or HOST:PORT (default: start a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    p.add_argument("--storage", help="Ray Tune/Train storage: a path or s3://bucket/prefix (default: OUTPUT/ray)")
    p.add_argument(
        "--storage-shared",
        action="store_true",
        help="the local --storage path is mounted on every node of the cluster (NFS, EFS): allow it there",
    )
    p.add_argument(
        "--autoscaling-config",
        metavar="FILE",
        help="with --address: the cluster's autoscaling config, whose node types the search plans on "
        "(default: $CRYSTALTUNE_AUTOSCALING_CONFIG, the running autoscaler's, or ~/ray_bootstrap_config.yaml)",
    )
    p.add_argument("--output", help="leaderboard, best_config.yaml, ... (default: crystaltune-results/NAME)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search to its full budget")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers (DDP ranks) per trial")
    p.add_argument(
        "--executor",
        choices=("auto", "train", "direct"),
        help="train = a Ray Train worker group per trial; direct = train in the Tune trial itself "
        "(one worker); auto (default) = direct for one worker, train for more",
    )
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (0 = CPU)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (overrides resources.cpus_per_worker)")
    p.add_argument("--trials-per-gpu", type=int, help="pack N one-worker trials on each GPU (1/N GPU each)")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    p.add_argument(
        "--finalize",
        type=int,
        metavar="K",
        help="after the trials, retrain the top K configs, choose one (cross-validation on train+val for "
        "small sets), and register its seed ensemble as models:/crystaltune-NAME@best beside the default "
        "retrained the same way (0: off; default: the space file's finalize: block, if any)",
    )
    p.add_argument("--data", help="dataset file for the space's dataset (e.g. the SNUMAT file)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of the local Ray instance (default: 2 x cores + 1)")
    p.add_argument(
        "--watchdog-factor",
        type=float,
        default=10.0,
        help="stop a trial silent for this many times its slowest epoch (default 10)",
    )
    p.add_argument(
        "--watchdog-floor",
        type=float,
        default=600.0,
        help="... but never before this many seconds (default 600; also the limit before its first epoch)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=1800.0,
        help="stop the search (resumable) when no trial could run for this many seconds (default 1800)",
    )
    p.add_argument(
        "--warm-start",
        metavar="PATH|URI",
        help="an earlier search's optuna.db (OUTPUT/optuna.db) or Optuna storage URI: its best compatible "
        "configurations run first, after the default",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    sigterm_as_ctrl_c()  # from the start; run_search sets it again once Ray is up
    summary = run_search(
        SearchOptions(
            space=a.space,
            num_samples=a.num_samples,
            max_epochs=a.max_epochs,
            grace_period=a.grace_period,
            address=a.address,
            tracking_uri=a.tracking_uri,
            storage=a.storage,
            storage_shared=a.storage_shared,
            autoscaling_config=a.autoscaling_config,
            output=a.output,
            resume=a.resume,
            workers_per_trial=a.workers_per_trial,
            gpus_per_worker=a.gpus_per_worker,
            cpus_per_worker=a.cpus_per_worker,
            trials_per_gpu=a.trials_per_gpu,
            warm_start=a.warm_start,
            seed=a.seed,
            finalize=a.finalize,
            watchdog_factor=a.watchdog_factor,
            watchdog_floor_s=a.watchdog_floor,
            stall_timeout_s=a.stall_timeout,
            data=a.data,
            num_cpus=a.num_cpus,
            executor=a.executor,
        )
    )
    if a.json:
        print(dumps_json(summary))  # strict JSON: NaN and inf as null
    if summary.get("error"):  # the search ran to its end without a result (every trial failed)
        print(f"error: {summary['error']}", file=sys.stderr)
        return 1
    if summary.get("stop_reason"):  # the search stopped itself (a full disk): resumable, but an error
        print(f"error: {summary['stop_reason']}", file=sys.stderr)
        return 1
    return 130 if summary.get("interrupted") or summary.get("final_interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
