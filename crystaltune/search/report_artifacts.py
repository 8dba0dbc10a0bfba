"""Search-level artifacts on the parent run: leaderboard, space YAML, Optuna history and parameter
importances, a parity plot of the best model on the test split, and the registered best model."""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .. import render
from ..errors import is_disk_full
from ..fmt import pyplot
from . import runs

log = logging.getLogger(__name__)


def optuna_study(tracker, space, rows, storage: str | None = None):
    """The search as an Optuna study, every trial once in the order they ran, scored by the selection
    metric (best_val_mae); failed ones as FAIL. With ``storage`` (e.g. ``sqlite:///.../optuna.db``)
    it is saved there as ``crystaltune-NAME`` (replacing an earlier copy), for optuna-dashboard and
    ``--warm-start``. Rebuilt from the tracker, so it is complete after --resume too."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {p.name: p.dist for p in space.params}
    name = runs.experiment_name(space.name)
    if storage is not None and name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)
    study = optuna.create_study(direction="minimize", storage=storage, study_name=name if storage else None)
    for r in sorted(rows, key=lambda r: r.trial):  # the order the trials ran (t001, t002, ...), not rank order
        raw = tracker.trials[r.trial_id].config
        params = {k: v for k, v in raw.items() if k in dists}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: dists[k] for k in params},
                value=float(r.best_val_mae) if r.ranked else None,
                state=optuna.trial.TrialState.COMPLETE if r.ranked else optuna.trial.TrialState.FAIL,
                user_attrs={"trial": r.trial, "mlflow_run_id": r.run_id, "default": r.default},
            )
        )
    return study


def parity_plots(checkpoint: Path, title: str, folder: Path, stem: str, dataset=None):
    """A checkpoint's parity plot and error histogram on its test split, one ``stem_TARGET.png`` per
    target in ``folder``; returns its prepared trial data and an error summary line per target."""
    from ..checkpoint import load_checkpoint
    from ..train.metrics import predict_indices
    from ..train.trial_data import prepare_trial_data

    loaded = load_checkpoint(checkpoint)
    data = prepare_trial_data(loaded.config, dataset)
    p, y = predict_indices(loaded.model, data.store, data.test, data.targets, loaded.normalizer, "cpu")
    summaries = {}
    for t, target in enumerate(data.targets):
        m = np.isfinite(y[:, t])
        render.parity_plot(y[m, t], p[m, t], f"{title} - {target}", folder / f"{stem}_{target}.png", target)
        summaries[target] = render.error_summary(target, y[m, t], p[m, t])
    return data, summaries


def pyfunc_signature(example, checkpoint: Path):
    """The pyfunc's signature, inferred from running it on the example, with ``id`` optional (rows
    without one are numbered): MLflow alone would mark every column of the example required."""
    from types import SimpleNamespace

    from mlflow.models import infer_signature
    from mlflow.types.schema import ColSpec, Schema

    from .mlflow_model import CrystaltunePyfunc

    model = CrystaltunePyfunc()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(checkpoint)}))
    signature = infer_signature(example, model.predict(None, example))
    signature.inputs = Schema([ColSpec(c.type, c.name, required=c.name != "id") for c in signature.inputs.inputs])
    return signature


def config_example(cfg):
    """The input example of a model trained with ``cfg``: the first crystal of its test split."""
    from ..train.trial_data import load_trial_dataset, prepare_trial_data

    dataset = load_trial_dataset(cfg)
    return _input_example(dataset, prepare_trial_data(cfg, dataset))


def _input_example(dataset, data):
    """One test crystal as the pyfunc takes it: a DataFrame with ``id`` and ``structure`` (CIF text)."""
    import pandas as pd

    from ..data import read_source

    rid = str(data.store.ids[data.test[0]])
    rec = next(r for r in read_source(dataset.source).records if r["id"] == rid)
    if isinstance(rec["structure"], str):
        text = rec["structure"]
    else:
        from pymatgen.core import Structure

        text = Structure.from_dict(rec["structure"]).to(fmt="cif")
    return pd.DataFrame({"id": [rid], "structure": [text]})


def describe_registered_model(client, name: str, info, space, best) -> None:
    """The registered version says what it is: search, trial, MAEs; alias ``best``; the trial links to it."""
    version = info.registered_model_version
    if version is None:
        return
    text = (
        f"Best trial `{best.name}` of the `{space.name}` search (selection: lowest best_val_mae). "
        f"best_val_mae {best.best_val_mae:.4f}, test_mae {best.test_mae:.4f}. Trial run {best.run_id}."
    )
    client.update_model_version(name, str(version), description=text)
    for key, value in (
        ("best_val_mae", f"{best.best_val_mae:.6g}"),
        ("test_mae", f"{best.test_mae:.6g}"),
        ("trial", best.name),
        ("trial_run_id", best.run_id),
        ("search", space.name),
    ):
        client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_alias(name, "best", str(version))
    client.update_registered_model(
        name, description=f"Best models of crystaltune `{space.name}` searches; alias `best`: the latest. {text}"
    )
    client.set_registered_model_tag(name, "search_space", space.name)
    client.set_tag(best.run_id, runs.REGISTERED_MODEL, f"models:/{name}@best (version {version})")


def log_search_artifacts(tracker, rows, cfg, dataset, output: Path) -> dict[str, Any]:
    """Write the artifacts into ``output`` and log them to the parent run, the best trial's model
    (``rows[0]``, configured as ``cfg``) to its own run; failures become tags."""
    client, parent, space, best = tracker.client, tracker.parent_run_id, tracker.space, rows[0]
    made: dict[str, Any] = {}
    art = output / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    shutil.copy(output / "leaderboard.csv", art / "leaderboard.csv")
    (art / "search_space.yaml").write_text(Path(space.source).read_text() if Path(space.source).is_file() else "")
    shutil.copy(output / "best_config.yaml", art / "best_config.yaml")
    shutil.copy(output / "top_configs.yaml", art / "top_configs.yaml")
    try:
        study = optuna_study(tracker, space, rows, f"sqlite:///{output / 'optuna.db'}")
        made["optuna_storage"] = f"sqlite:///{output / 'optuna.db'}"
        made.update(_study_plots(study, art))
    except Exception as exc:  # a plotting problem must not lose the search
        client.set_tag(parent, runs.OPTUNA_ERROR, str(exc)[:500])
    ck = Path(best.checkpoint, "best.pt") if best.checkpoint else None
    if ck is not None and ck.exists():
        try:
            made.update(_best_model_artifacts(tracker, best, cfg, dataset, ck, output, art))
        except Exception as exc:  # a checkpoint that will not load must not cost the final step
            if is_disk_full(exc):  # but a full disk stops the search (the caller says so)
                raise
            client.set_tag(parent, runs.MODEL_LOG_ERROR, f"{type(exc).__name__}: {exc}"[:500])
            log.warning(
                f"{best.name}'s model was not plotted or registered ({type(exc).__name__}: {exc}); "
                "the search goes on, and the reason is the parent run's tag " + runs.MODEL_LOG_ERROR
            )
    client.log_artifacts(parent, str(art), artifact_path=runs.SEARCH_DIR)
    # under names of their own: the parent never sorts among its trials by the selection metric
    client.log_metric(parent, runs.PARENT_BEST_VAL, float(best.best_val_mae))
    if math.isfinite(best.test_mae):
        client.log_metric(parent, runs.PARENT_BEST_TEST, float(best.test_mae))
    client.set_tag(parent, runs.BEST_RUN, best.name)
    return made


def _best_model_artifacts(tracker, best, cfg, dataset, ck: Path, output: Path, art: Path) -> dict[str, Any]:
    """The best trial's checkpoint copied out, its parity plots (into ``art``), and its registered model."""
    shutil.copy(ck, output / "best_trial.pt")
    data, _ = parity_plots(output / "best_trial.pt", best.name, art, "parity", dataset)
    made = {"parity": [str(art / f"parity_{n}.png") for n in data.targets]}
    made["model_uri"] = _register_best_model(
        tracker, best, cfg, _input_example(dataset, data), output / "best_trial.pt"
    )
    return made


def _study_plots(study, art: Path) -> dict[str, Any]:
    """History (trials in run order, best-so-far line) and fANOVA importances: PNG and JSON."""
    import optuna
    import optuna.visualization.matplotlib as ovm

    plt = pyplot()

    made: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = {t.number: t.user_attrs.get("trial", f"#{t.number}") for t in study.trials}
        ax = ovm.plot_optimization_history(study)
        ax.set_title("Best val MAE per trial, in the order they ran")
        _label_trials(ax, names)
        ax.figure.savefig(art / "optuna_history.png", dpi=110, bbox_inches="tight")
        plt.close(ax.figure)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        history = [
            {"number": t.number, "trial": names[t.number], "value": t.value, "params": t.params} for t in complete
        ]
        (art / "optuna_history.json").write_text(json.dumps(history, indent=1, default=str))
        if len(study.trials) >= 3:
            # one method for the JSON, the PNG and the report: fANOVA, seeded
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            made["importances"] = optuna.importance.get_param_importances(study, evaluator=evaluator)
            (art / "param_importances.json").write_text(json.dumps(made["importances"], indent=1))
            ax = ovm.plot_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
            ax.set_title("Hyperparameter importances (fANOVA on best val MAE)", loc="left")  # Optuna's spot
            ax.figure.savefig(art / "param_importances.png", dpi=110, bbox_inches="tight")
            plt.close(ax.figure)
    return made


def _label_trials(ax, names: dict[int, str], most: int = 20) -> None:
    """Tick the x axis with the trials' run names (t001, ...), not Optuna's 0-based numbers, so a
    point on the plot reads as the MLflow run it is."""
    numbers = sorted(names)
    ticks = numbers[:: max(1, math.ceil(len(numbers) / most))]
    ax.set_xticks(ticks)
    ax.set_xticklabels([names[n] for n in ticks], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("trial (its MLflow run name)")


def _register_best_model(tracker, best, cfg, example, checkpoint: Path) -> str:
    """The best trial as an MLflow pyfunc model logged in the trial's own run (its source run, its
    metrics), registered and described."""
    import mlflow

    space = tracker.space
    mlflow.set_tracking_uri(tracker.tracking_uri)
    status = tracker.client.get_run(best.run_id).info.status  # FINISHED, or KILLED if interrupted
    mlflow.start_run(run_id=best.run_id)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.pyfunc.log_model(
                name="best_model",
                python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts={"checkpoint": str(checkpoint)},
                registered_model_name=runs.model_name(space.name),
                pip_requirements=["crystaltune", "torch", "torch-geometric", "pymatgen"],
                params={k: str(v)[:500] for k, v in cfg.used_flat().items()},  # the best trial's own config
                input_example=example,
                signature=pyfunc_signature(example, checkpoint),
            )
    finally:
        mlflow.end_run(status)  # as it was: a failed model log must not mark the trial FAILED
    describe_registered_model(tracker.client, runs.model_name(space.name), info, space, best)
    return info.model_uri
