"""run_search: validate, build graphs once, start Ray, run Tune (Optuna + ASHA) over Ray Train
trials, then write the leaderboard, best_config.yaml and the search-level MLflow artifacts."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .. import render
from ..environment import describe_machine, versions_line
from ..errors import CrystaltuneError, is_disk_full
from ..fmt import lower_or_higher
from ..log import console
from ..outputs import check_storage, check_tracking_uri, check_writable, is_uri, lock_output, redact
from . import autoscale, diskguard, runs, tunestate
from .finalize import FinalizePlan, FinalModel, finalize
from .plan import plan_concurrency, resolve_auto
from .preflight import preflight
from .runs import TrialRow
from .space import MAX_EPOCHS, DefineByRun, SearchSpace, check_executor, decode_sampled, encode_point, load_space

_log = logging.getLogger(__name__)


@dataclass
class SearchOptions:
    space: str
    num_samples: int | None = None
    max_epochs: int | None = None
    grace_period: int | None = None
    address: str | None = None
    tracking_uri: str | None = None
    storage: str | None = None
    storage_shared: bool = False  # a local --storage path that every node of a cluster mounts
    autoscaling_config: str | None = None  # with --address: the node types to plan on (search/autoscale.py)
    output: str | None = None
    resume: bool = False
    workers_per_trial: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    trials_per_gpu: int | None = None
    warm_start: str | None = None  # an earlier search's optuna.db (or storage URI): its best configs run first
    seed: int = 0
    data: str | None = None
    num_cpus: int | None = None  # local Ray only (logical CPUs; default 2 x cores + 1)
    max_failures: int = 2
    quiet: bool = False
    watchdog_factor: float = 10.0  # a trial silent for this x its slowest epoch is stopped (search/watchdog.py)
    watchdog_floor_s: float = 600.0  # ... but never sooner than this
    stall_timeout_s: float = 1800.0  # no trial can run for this long: stop, resumable
    executor: str | None = None
    finalize: int | None = None  # top K for the final step (0: off; None: as the space file says)


def prepare_space(opts: SearchOptions) -> SearchSpace:
    """Load the space and apply CLI overrides; everything validated before Ray starts."""
    for name in (
        "num_samples",
        "max_epochs",
        "grace_period",
        "workers_per_trial",
        "cpus_per_worker",
        "num_cpus",
        "trials_per_gpu",
    ):
        v = getattr(opts, name)
        if v is not None and v < 1:
            raise CrystaltuneError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("watchdog_factor", "watchdog_floor_s", "stall_timeout_s"):
        if not getattr(opts, name) > 0:
            raise CrystaltuneError(
                f"--{name.replace('_', '-').removesuffix('-s')} must be > 0, got {getattr(opts, name)}"
            )
    if opts.seed < 0:
        raise CrystaltuneError(f"--seed must be >= 0, got {opts.seed}")
    if opts.finalize is not None and opts.finalize < 0:
        raise CrystaltuneError(f"--finalize must be >= 0 (0: off), got {opts.finalize}")
    if opts.gpus_per_worker is not None and opts.gpus_per_worker < 0:
        raise CrystaltuneError(f"--gpus-per-worker must be >= 0, got {opts.gpus_per_worker}")
    space = load_space(opts.space)
    if opts.num_samples:
        space.num_samples = opts.num_samples
    if opts.max_epochs:
        if opts.max_epochs > MAX_EPOCHS:
            raise CrystaltuneError(f"--max-epochs must be <= {MAX_EPOCHS}, got {opts.max_epochs}")
        space.max_epochs = opts.max_epochs
        space.grace_period = min(space.grace_period, space.max_epochs)
    if opts.grace_period:
        if opts.grace_period > space.max_epochs:
            raise CrystaltuneError(f"--grace-period {opts.grace_period} > max epochs ({space.max_epochs})")
        space.grace_period = opts.grace_period
    if opts.workers_per_trial:
        space.workers = opts.workers_per_trial
    if opts.gpus_per_worker is not None:
        space.gpus_per_worker = opts.gpus_per_worker
    if opts.cpus_per_worker is not None:
        space.cpus_per_worker = opts.cpus_per_worker
    if opts.trials_per_gpu is not None:
        if space.workers != 1:
            raise CrystaltuneError(
                f"--trials-per-gpu packs one-worker trials; this search has {space.workers} workers per trial"
            )
        space.gpus_per_worker = 1.0 / opts.trials_per_gpu
    if opts.executor or opts.workers_per_trial:
        space.executor = check_executor("--executor", opts.executor or space.executor, space.workers)
    if opts.finalize == 0:
        space.finalize = None
    elif opts.finalize:
        space.finalize = dataclasses.replace(space.finalize or FinalizePlan(), top_k=opts.finalize)
    if opts.data:
        if not Path(opts.data).exists():
            raise CrystaltuneError(f"--data {opts.data}: no such file or folder")
        space.base["data"]["file"] = str(Path(opts.data).resolve())
    return space


def refuse_second_local_cluster(wait_s: float = 15.0) -> None:
    """Ray's state API (used by Ray Train to clean up trials) cannot tell two local clusters on one
    machine apart and then hangs; refuse to start a second one and name the running one instead."""
    from ray._private.services import find_gcs_addresses

    deadline = time.time() + wait_s
    while True:
        running = sorted(find_gcs_addresses())
        if not running:
            return
        if time.time() > deadline:  # a cluster that is shutting down gets a few seconds first
            raise CrystaltuneError(second_cluster_message(running))
        time.sleep(1.0)


def second_cluster_message(running: list[str]) -> str:
    """Why a second local instance is refused, and what to do: join a standing instance, but never
    another search's private one (it ends with that search, and every search that joined it dies)."""
    from ..raysession import private_instance_owner

    port = int(running[0].rsplit(":", 1)[-1])
    owner = private_instance_owner(port)
    if owner is None:
        return (
            f"a Ray instance is already running on this machine ({', '.join(running)}): join it with "
            f"--address {running[0]}, or stop it (`ray stop`) first"
        )
    return (
        f"a Ray instance is already running on this machine ({running[0]}), the private one of {owner}; it "
        "ends with that process, so wait for it, or run both searches on a standing Ray: "
        "`RAY_AUTH_MODE=token ray start --head --node-ip-address 127.0.0.1`, then --address 127.0.0.1:6379 for each"
    )


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@dataclass(frozen=True)
class SearchRun:
    """Where one search keeps its things, resolved and checked once in ``run_search``: its output
    folder, Tune storage (a local path or a remote URI), MLflow store and the names derived from them."""

    space: SearchSpace
    output: Path
    storage: str
    tracking_uri: str

    lock: Any = field(default=None, compare=False, repr=False)  # the output folder's, held while this lives

    @classmethod
    def resolve(cls, opts: SearchOptions, space: SearchSpace) -> SearchRun:
        """Check every place before any work; the output folder is locked first, so a second search
        into it is refused before it touches anything there."""
        output = Path(opts.output or Path("crystaltune-results") / space.name).resolve()
        check_writable(output, "--output")
        lock = lock_output(output)
        storage = opts.storage or str(output / "ray")
        check_storage(storage)
        if not is_uri(storage):
            storage = str(Path(storage).resolve())
            check_writable(Path(storage), "--storage")
        tracking_uri = opts.tracking_uri or default_tracking_uri()
        check_tracking_uri(tracking_uri)
        return cls(space, output, storage, tracking_uri, lock)

    @property
    def remote(self) -> bool:
        """Storage behind a URI (s3://, gs://): every node reaches it, and nothing here is on disk."""
        return is_uri(self.storage)

    @property
    def state_file(self) -> str:
        return str(self.output / "tracker_state.json")

    @property
    def train_storage(self) -> str:
        return f"{self.storage.rstrip('/')}/train"

    @property
    def experiment_path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.space.name}"

    @property
    def experiment(self) -> str:
        return runs.experiment_name(self.space.name)


def run_search(opts: SearchOptions) -> dict[str, Any]:
    """The whole search: validate and plan, build the graphs once, start or join Ray, run Tune, then
    write the leaderboard and artifacts. Returns the summary as a dict (``SearchSummary.to_dict``)."""
    from ..raysession import require_token_auth

    require_token_auth()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    space = prepare_space(opts)
    run = SearchRun.resolve(opts, space)  # holds the output folder's lock until this process ends
    preflight(opts.address, run.tracking_uri, opts.resume, run.output, opts.warm_start)  # before graphs or Ray
    console(quiet=opts.quiet)
    ncpu = plan_local(opts, space)
    nodes = plan_autoscaling(opts, run)
    from .warm_start import warm_points

    warm = warm_points(opts.warm_start, space) if opts.warm_start and not opts.resume else []
    if nodes is not None:
        nodes.start(space)
    try:
        dataset = load_shared_graphs(space)  # the autoscaler starts nodes meanwhile
        search_time = _run_tune(opts, run, dataset, ncpu, warm, nodes)
    finally:
        if nodes is not None:
            nodes.release()  # a no-op when _run_tune withdrew it already
    return finish_search(run, dataset, search_time).to_dict()


def plan_autoscaling(opts: SearchOptions, run: SearchRun) -> autoscale.NodeRequest | None:
    """With --address and an autoscaling config: ``auto`` planned from its node types and a request no
    node type can hold refused, before any graph is built; a local storage path refused where trials on
    other nodes could not reach it. Returns the node request to start, or None without an autoscaler."""
    shape = autoscale.cluster_shape(opts.autoscaling_config, opts.address) if opts.address else None
    if shape is None:
        return None
    space = run.space
    autoscale.resolve_auto(space, shape, opts.trials_per_gpu)
    concurrency = autoscale.plan_concurrency(space, shape)
    if any(t.max_workers > 0 for t in shape.workers):
        check_shared_storage(run, opts.storage_shared, f"the cluster can add nodes ({shape.describe()})")
    trials = min(space.num_samples, concurrency)
    return autoscale.NodeRequest(opts.address, shape, concurrency, trials, expire_s=opts.stall_timeout_s)


def check_shared_storage(run: SearchRun, shared: bool, why: str) -> None:
    """Trials on other nodes write their checkpoints to --storage: a path only this node has fails them."""
    if run.remote or shared:
        return
    raise CrystaltuneError(
        f"--storage {run.storage}: a local path, but {why} and trials there cannot write into it; use "
        "--storage s3://BUCKET/PREFIX (or gs://...), or a path every node mounts with --storage-shared"
    )


def _run_tune(opts: SearchOptions, run: SearchRun, dataset, ncpu, warm, nodes) -> float:
    """Start or join Ray, plan the concurrency, run Tune; returns the tuner's wall time."""
    import ray

    from ..raysession import init_ray
    from .clusterwatch import watch_cluster

    # a local instance listens on 127.0.0.1 only; token authentication either way
    init_ray(opts.address, ncpu, include_dashboard=True)
    sigterm_as_ctrl_c()  # after ray.init, which installs a handler that aborts the driver on SIGTERM
    # a cluster that goes away mid-search: one error line and the runs marked KILLED, never left RUNNING
    watch = watch_cluster(opts.address, run.state_file, run.tracking_uri)
    try:
        concurrency = _concurrency(opts, run, nodes)
        trainable = make_trainable(run, opts, ray.put(dataset))
        tuner = make_tuner(opts, run, trainable, len(dataset), concurrency, warm)
        t0 = time.perf_counter()
        tuner.fit()
        return time.perf_counter() - t0
    finally:
        watch.stop()
        if nodes is not None:
            nodes.release()  # while this driver is still connected: no second Ray client needed
        ray.shutdown()


def _concurrency(opts: SearchOptions, run: SearchRun, nodes) -> int:
    """Trials at a time: as planned on the autoscaler's node types (once a first trial fits), or from
    the nodes up now."""
    import ray

    if nodes is not None:
        autoscale.wait_for_a_trial_slot(run.space, opts.stall_timeout_s, nodes.line)
        return nodes.concurrency
    resolve_auto(run.space, ray.cluster_resources(), opts.trials_per_gpu)
    concurrency = plan_concurrency(run.space, ray.cluster_resources())
    if opts.address and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        check_shared_storage(run, opts.storage_shared, "the cluster has more than one node")
    return concurrency


def runs_url(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """MLflow's runs view of one experiment, sorted by the selection metric, lowest first."""
    return f"{host}/#/experiments/{experiment_id}/runs?orderByKey=metrics.%60best_val_mae%60&orderByAsc=true"


def sigterm_as_ctrl_c() -> None:
    """SIGTERM (a scheduler, `kill`) stops the search as Ctrl-C does: runs marked interrupted,
    resumable. Only the main thread may set handlers; elsewhere the caller's handling stays."""
    import signal
    import threading

    from .interrupt import stop_like_ctrl_c

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_like_ctrl_c)


def ctrl_c_raises() -> None:
    """After Tune: Ctrl-C raises KeyboardInterrupt again, and SIGTERM takes its path (main thread only)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sigterm_as_ctrl_c()


def plan_local(opts: SearchOptions, space: SearchSpace) -> int | None:
    """Logical CPUs of a local Ray instance (None when joining a cluster), with ``auto`` resources
    planned and impossible requests refused before any work."""
    if opts.address:
        return None
    # a Ray Train trial's function idles on one slot while its workers train on the others; a direct
    # trial trains on its own slot
    ncpu = opts.num_cpus or ((2 * (os.cpu_count() or 2) + 1) if space.uses_ray_train else (os.cpu_count() or 1))
    import torch

    local = {"CPU": ncpu, "GPU": torch.cuda.device_count()}
    resolve_auto(space, local, opts.trials_per_gpu)
    plan_concurrency(space, local)
    refuse_second_local_cluster()
    return ncpu


def load_shared_graphs(space: SearchSpace):
    """The graphs, built once per search in the driver before Ray starts; every trial shares them."""
    from ..train.trial_data import check_dataset_split, load_trial_dataset

    t0 = time.perf_counter()
    dataset = load_trial_dataset(space.graph_config())
    check_dataset_split(dataset, space.trial_config(space.default_point))  # too few crystals: refused now
    _log.info(
        f"{space.name}: {len(dataset)} crystals ({dataset.name}), graphs ready in "
        f"{time.perf_counter() - t0:.1f}s; {space.num_samples} trials x <= {space.max_epochs} epochs, "
        f"{space.workers} worker(s)/trial ({'Ray Train' if space.uses_ray_train else 'direct'})"
    )
    return dataset


def make_trainable(run: SearchRun, opts: SearchOptions, data_ref):
    """The Tune trainable with its resources: a Ray Train worker group per trial, or direct training."""
    from ray import tune

    from .trainable import TrialSettings, direct_trial_fn, trial_fn

    space = run.space
    settings = TrialSettings(
        workers=space.workers,
        cpus_per_worker=space.cpus_per_worker,
        gpus_per_worker=space.gpus_per_worker,
        train_storage=run.train_storage,
        max_failures=opts.max_failures,
    )
    if opts.resume and Path(run.state_file).exists():  # trials done before the interruption never train again
        settings.finished = finished_trials(run.state_file)
    if space.uses_ray_train:
        fn, resources = trial_fn, {"cpu": 1}
    else:
        fn, resources = direct_trial_fn, {"cpu": space.cpus_per_worker, "gpu": space.gpus_per_worker}
    # the reference wrapped in a list, so with_parameters hands trials the reference, not a copy of the graphs
    return tune.with_resources(tune.with_parameters(fn, space=space, data_ref=[data_ref], settings=settings), resources)


def make_tuner(opts: SearchOptions, run: SearchRun, trainable, crystals: int, concurrency: int, warm=()):
    """A new Tuner (Optuna from the default point, ASHA, tracker and watchdog), or the restored one."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .tracking import MLflowTracker
    from .watchdog import Watchdog

    space = run.space
    if opts.resume:
        for line in [] if run.remote else tunestate.repair(Path(run.experiment_path)):
            _log.warning(f"--resume: {line}")
        if not tune.Tuner.can_restore(run.experiment_path):
            raise CrystaltuneError(f"--resume: no interrupted search at {run.experiment_path}")
        _log.info(f"resuming the search stored at {run.experiment_path}")
        return tune.Tuner.restore(
            run.experiment_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    _set_aside_previous(run)
    info = _search_info(opts, run, crystals)
    tracker = MLflowTracker(run.tracking_uri, space, run.experiment, info, run.state_file, verbose=not opts.quiet)
    watchdog = Watchdog(tracker, opts.watchdog_factor, opts.watchdog_floor_s, opts.stall_timeout_s, not opts.quiet)
    watched = {"--output": str(run.output), **({} if run.remote else {"--storage": run.storage})}
    keeper = [] if run.remote else [tunestate.StateKeeper(run.experiment_path)]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric="best_val_mae",
            mode="min",
            num_samples=space.num_samples,
            max_concurrent_trials=concurrency,
            reuse_actors=not space.uses_ray_train,  # a direct trial keeps its warm process
            # the default configuration is trial 0, then Optuna's sampler takes over
            search_alg=OptunaSearch(
                DefineByRun(space),
                metric="best_val_mae",
                mode="min",
                seed=opts.seed,
                points_to_evaluate=[encode_point(p, space) for p in [space.default_point, *warm]],
            ),
            scheduler=ASHAScheduler(
                time_attr="epoch",
                max_t=space.max_epochs,
                grace_period=space.grace_period,
                reduction_factor=space.reduction_factor,
            ),
        ),
        # a trial whose actor dies with its node is retried elsewhere; its Ray Train run resumes from
        # the last epoch checkpoint
        run_config=tune.RunConfig(
            name=space.name,
            storage_path=run.storage,
            verbose=0,
            callbacks=[tracker, watchdog, diskguard.DiskGuard(tracker, watched), *keeper],
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        ),
    )


def _set_aside_previous(run: SearchRun) -> None:
    """A new search in a folder that holds an earlier one: the earlier Tune experiment and tracker state
    are renamed with their date, never overwritten."""
    path = Path(run.experiment_path)
    if run.remote or not path.exists():
        return
    old = f"{path}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(path.stat().st_mtime))}"
    path.rename(old)
    _log.info(f"previous search moved to {old}")
    if Path(run.state_file).exists():
        Path(run.state_file).rename(f"{old}-tracker_state.json")


def _search_info(opts: SearchOptions, run: SearchRun, crystals: int) -> dict[str, Any]:
    """The search's setting, logged as the parent run's ``search.*`` parameters."""
    space = run.space
    return {
        "space": space.name,
        "space_arg": opts.space,  # as the user named it: a built-in name or the (copied) space file
        "num_samples": space.num_samples,
        "max_epochs": space.max_epochs,
        "grace_period": space.grace_period,
        "reduction_factor": space.reduction_factor,
        "workers_per_trial": space.workers,
        "gpus_per_worker": space.gpus_per_worker,
        "seed": opts.seed,
        "executor": "train" if space.uses_ray_train else "direct",
        "storage": redact(run.storage),
        "crystals": crystals,
        "machine": describe_machine(),
        **({"cluster": autoscale.describe_cluster()} if opts.address else {}),
        "versions": versions_line(),
    }


def finished_trials(state_file: str) -> dict[str, dict[str, Any]]:
    """trial id -> last recorded result, for the trials the tracker saw finish or fail."""
    from .tracking import records_from_state

    records = records_from_state(json.loads(Path(state_file).read_text()))
    return {tid: rec.last_result for tid, rec in records.items() if rec.done}


def write_top_configs(tracker, space: SearchSpace, ok: list[TrialRow], path: Path, k: int = 10) -> None:
    """The full configs of the best ``k`` trials by val MAE, for ``report --top-k`` to retrain."""
    top = [
        {
            "trial": r.trial,
            "val_mae": r.best_val_mae,
            "default": r.default,
            "config": space.trial_config(decode_sampled(tracker.trials[r.trial_id].config, space)).to_dict(),
        }
        for r in ok[:k]
    ]
    path.write_text(yaml.safe_dump(top, sort_keys=False))


@dataclass
class SearchSummary:
    """The outcome of a search: what the CLI prints (``--json``: ``to_dict``), exits by, and logs."""

    trials: int
    failed: int
    search_time_s: float  # this session's tuner.fit
    output: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    epochs_run: int
    epochs_full_budget: int
    interrupted: bool
    final_interrupted: bool = False  # Ctrl-C or SIGTERM in the final step, the trials complete
    stop_reason: str = ""
    files_written: bool = False
    error: str = ""  # why a search that ran to its end has no result
    best: TrialRow | None = None
    default: TrialRow | None = None  # the default configuration's trial, when it ranked
    final: FinalModel | None = None  # the final step's result (--finalize)
    total_search_time_s: float = 0.0  # tuner.fit over every session (--resume adds one)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready keys (``best_trial``, ``best_val_mae``, ``default_test_mae``, ...)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("best", "default", "final")}
        for role, row in (("best", self.best), ("default", self.default)):
            if row is not None:
                d.update({f"{role}_trial": row.name, f"{role}_val_mae": row.best_val_mae})
                d.update({f"{role}_test_mae": row.test_mae, f"{role}_run_id": row.run_id})
        if self.final is not None:
            f = self.final
            d.update(final_trial=f.trial, final_test_mae=f.test_mae, final_ensemble_test_mae=f.ensemble_test_mae)
            d.update(
                final_default_test_mae=f.default_test_mae, final_default_ensemble_test_mae=f.default_ensemble_test_mae
            )
            d.update(final_gain=f.gain, final_model_uri=f.model_uri, final_chosen_by=f.chosen_by)
        return d


def finish_search(run: SearchRun, dataset, search_time: float) -> SearchSummary:
    """Leaderboard, best_config.yaml and the parent run's artifacts (all from the driver)."""
    from .leaderboard import build_leaderboard, write_csv
    from .tracking import MLflowTracker

    tracker = MLflowTracker.from_state_file(run.state_file, run.tracking_uri, run.space, run.experiment)
    tracker.stop_reason = tracker.stop_reason or diskguard.stop_reason
    rows = build_leaderboard(tracker, run.space)
    ok = [r for r in rows if r.ranked]
    summary = _summary(run, rows, tracker, search_time)
    if _log.isEnabledFor(logging.INFO):  # the leaderboard is the search's output, not a log line
        print("\n" + render.console_leaderboard(rows), flush=True)
    try:
        write_csv(rows, run.output / "leaderboard.csv")
        if ok:
            _write_best(tracker, run, rows, ok, dataset)
        summary.files_written = bool(ok)
    except OSError as exc:  # a full disk: MLflow (elsewhere) has every run; --resume writes these files
        if not is_disk_full(exc):
            raise
        summary.stop_reason = summary.stop_reason or f"disk full writing the search's files in {run.output}"
        _log.warning("could not write the leaderboard and best config to %s: disk full", run.output)
    if ok and run.space.finalize is not None and not (summary.interrupted or summary.stop_reason):
        try:
            summary.final = _finalize(tracker, run.space, ok, len(dataset))
        except KeyboardInterrupt:  # the parent run says where it stopped (KILLED), never RUNNING
            summary.final_interrupted = True
    stopped = summary.interrupted or summary.final_interrupted
    status = "interrupted" if stopped else "failed" if summary.error else "finished"
    tracker.client.set_tag(tracker.parent_run_id, runs.STATUS, status)
    tracker.client.set_terminated(tracker.parent_run_id, {"interrupted": "KILLED"}.get(status, status.upper()))
    description = render.run_description(run.space.name, summary, ok, tracker.experiment_id)
    if summary.final is not None:
        description = "\n\n".join(["**" + summary.final.lines()[0] + "**", *summary.final.lines()[1:], description])
    tracker.client.set_tag(tracker.parent_run_id, runs.DESCRIPTION, description)
    _closing_lines(summary, run.space, tracker)
    return summary


def _finalize(tracker, space: SearchSpace, ok: list[TrialRow], crystals: int) -> FinalModel | None:
    """The final step; its failure is said and tagged, and the search keeps its best trial as its result."""
    ctrl_c_raises()  # Tune leaves its SIGINT handler (a dead flag) after fit; ray.shutdown resets SIGTERM
    try:
        final = finalize(tracker, space, ok, crystals, space.finalize)
        parent = tracker.client.get_run(tracker.parent_run_id)
        if runs.FINAL_ERROR in parent.data.tags:  # an earlier attempt's (a --resume after an interrupted one)
            tracker.client.delete_tag(tracker.parent_run_id, runs.FINAL_ERROR)
        return final
    except KeyboardInterrupt:
        tracker.client.set_tag(tracker.parent_run_id, runs.FINAL_ERROR, "interrupted (Ctrl-C) in the final step")
        raise
    except (CrystaltuneError, RuntimeError, ValueError) as exc:
        _log.warning("the final step failed, so the best trial stays the search's result: %s", exc)
        tracker.client.set_tag(tracker.parent_run_id, runs.FINAL_ERROR, str(exc)[:5000])
        return None


def _summary(run: SearchRun, rows: list[TrialRow], tracker, search_time: float) -> SearchSummary:
    """The search's outcome; its time and epoch counts are also logged as metrics of the parent run
    for the report's overhead / ASHA figures."""
    from mlflow.entities import Metric

    ok = [r for r in rows if r.ranked]
    space = run.space
    interrupted = len(rows) < space.num_samples or any(r.status in ("INTERRUPTED", "RUNNING") for r in rows)
    summary = SearchSummary(
        trials=len(rows),
        failed=sum(r.status == "FAILED" for r in rows),
        search_time_s=search_time,
        output=str(run.output),
        tracking_uri=run.tracking_uri,
        experiment=run.experiment,
        parent_run_id=tracker.parent_run_id,
        epochs_run=sum(r.epochs for r in rows),
        epochs_full_budget=space.num_samples * space.max_epochs,
        interrupted=interrupted,
        stop_reason=tracker.stop_reason,
        error=no_result_error(rows, ok, interrupted),
        best=ok[0] if ok else None,
        default=next((r for r in ok if r.default), None),
    )
    tracker.client.log_batch(  # the latest session's tuner time when --resume was used
        tracker.parent_run_id,
        metrics=[
            Metric(k, float(getattr(summary, k)), int(time.time() * 1000), 0)
            for k in ("search_time_s", "epochs_run", "epochs_full_budget")
        ],
    )
    history = tracker.client.get_metric_history(tracker.parent_run_id, "search_time_s")
    summary.total_search_time_s = sum(m.value for m in history) or search_time
    return summary


def no_result_error(rows: list[TrialRow], ok: list[TrialRow], interrupted: bool) -> str:
    """Why a search that ran to its end has no result (every trial failed), else ''. The CLI prints it
    as its error line and exits 1, instead of exiting 0 with no best_config.yaml."""
    if ok or interrupted or not rows:
        return ""
    first = next((r for r in rows if r.error), rows[0])
    reason = first.error.splitlines()[0][:300] if first.error else first.status
    return f"all {len(rows)} trials failed, so no best configuration was written; first, {first.trial}: {reason}"


def _write_best(tracker, run: SearchRun, rows: list[TrialRow], ok: list[TrialRow], dataset) -> None:
    """best_config.yaml, top_configs.yaml and the parent run's artifacts (plots, model, study)."""
    from .report_artifacts import log_search_artifacts

    best, space = ok[0], run.space
    sampled = decode_sampled(tracker.trials[best.trial_id].config, space)
    cfg = space.trial_config(sampled, output=str(run.output / "best_model.pt"))
    cfg.to_yaml(run.output / "best_config.yaml")
    write_top_configs(tracker, space, ok, run.output / "top_configs.yaml")
    log_search_artifacts(tracker, rows, cfg, dataset, run.output)


def _trial_time(s: SearchSummary) -> str:
    """The trials' wall time; after a --resume, over every session (this one alone may be ~0 s)."""
    total = max(s.total_search_time_s, s.search_time_s)
    if total - s.search_time_s < 1:
        return f"{total:.0f}s"
    return f"{total:.0f}s ({s.search_time_s:.0f}s of it in this session, the rest before --resume)"


def _closing_lines(summary: SearchSummary, space: SearchSpace, tracker) -> None:
    """What the user reads last: the outcome, the default's comparison, where to look next."""
    s, output = summary, Path(summary.output)
    if s.final_interrupted:
        _log.warning(
            "the final step was interrupted; the trials are complete: the same command plus --resume runs "
            "the final step again, keeping the retrainings that finished"
        )
    if s.interrupted:
        _log.info(
            f"interrupted after {s.trials} of {space.num_samples} trials; the state is saved: "
            f"continue with the same command plus --resume"
        )
    _log.info(
        f"{s.trials} trials ({s.failed} failed) in {_trial_time(s)}; "
        f"{s.epochs_run} of {s.epochs_full_budget} epochs run (ASHA)"
    )
    if s.best is not None:
        _log.info(f"best: {s.best.name}  val_mae {s.best.best_val_mae:.4f}  test_mae {s.best.test_mae:.4f}")
    if s.default is not None:
        dv = s.default.best_val_mae
        gain = 1 - s.best.best_val_mae / dv if dv > 0 else 0.0
        _log.info(
            f"default ({space.default_source}): {s.default.trial}  val_mae {dv:.4f}  "
            f"test_mae {s.default.test_mae:.4f}; the best is {lower_or_higher(gain)} on val MAE"
        )
    for line in s.final.lines() if s.final is not None else []:
        _log.info(line)
    if s.files_written:
        _log.info(f"wrote {output / 'best_config.yaml'} and {output / 'leaderboard.csv'}")
        _log.info(f"retrain: python -m crystaltune.train --config {output / 'best_config.yaml'}")
    _log.info(
        f"MLflow: mlflow ui --backend-store-uri {s.tracking_uri}, then open "
        f"{runs_url(tracker.experiment_id)} (experiment '{s.experiment}', trials sorted by "
        f"best_val_mae, the selection metric; the parent run {tracker.parent_run_id} has the summary)"
    )
    if (output / "optuna.db").exists():
        _log.info(
            f"Optuna study: optuna-dashboard sqlite:///{output / 'optuna.db'}  (a later search can "
            f"start from it: --warm-start {output / 'optuna.db'})"
        )
