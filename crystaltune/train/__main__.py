"""``python -m crystaltune.train --config FILE.yaml [--dataset ...] [--epochs ...]``: train one
configuration, print a line per epoch and a summary, write the best-val checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import TrialConfig
from ..errors import CrystaltuneError, cli_main
from ..outputs import dumps_json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crystaltune.train", description=__doc__)
    p.add_argument("--config", help="trial config YAML (e.g. best_config.yaml from a search); defaults otherwise")
    p.add_argument("--dataset", help="dataset name or path (overrides data.dataset)")
    p.add_argument("--data", help="file for a registry dataset (e.g. SNUMAT)")
    p.add_argument("--targets", nargs="+")
    p.add_argument("--model", help="model name (overrides model.name)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, help="training seed (the split keeps data.split_seed)")
    p.add_argument("--limit", type=int, help="use a seeded subset of N crystals")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--output", help="checkpoint path (default: crystaltune-results/train/<dataset>-<model>-s<seed>.pt)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def config_from_args(args) -> TrialConfig:
    raw = TrialConfig.from_yaml(args.config).to_dict() if args.config else TrialConfig().to_dict()
    overrides = {
        ("data", "dataset"): args.dataset,
        ("data", "file"): args.data,
        ("data", "targets"): args.targets,
        ("model", "name"): args.model,
        ("train", "epochs"): args.epochs,
        ("train", "batch_size"): args.batch_size,
        ("optim", "lr"): args.lr,
        ("train", "seed"): args.seed,
        ("data", "limit"): args.limit,
        ("train", "device"): args.device,
        ("train", "num_threads"): args.threads,
    }
    for (section, key), value in overrides.items():
        if value is not None:
            raw[section][key] = value
    if args.output:
        raw["output"] = args.output
    if not raw.get("output"):
        name = Path(str(raw["data"]["dataset"])).name.split(".")[0]
        raw["output"] = f"crystaltune-results/train/{name}-{raw['model']['name']}-s{raw['train']['seed']}.pt"
    return TrialConfig.from_dict(raw, where=args.config or "arguments")


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    from ..outputs import check_output_file

    check_output_file(cfg.output, "--output")  # before training, not after it
    from .loop import TrialDiverged, fit
    from .trial_data import prepare_trial_data

    data = prepare_trial_data(cfg)
    print(
        f"{data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test crystals, "
        f"targets {', '.join(data.targets)}; "
        f"model {cfg.model.name} ({cfg.model.edge_featurizer}/{cfg.model.node_featurizer})",
        flush=True,
    )
    try:
        summary = fit(cfg, data=data, verbose=True)
    except TrialDiverged as exc:
        raise CrystaltuneError(f"training diverged: {exc}") from None
    if args.json:
        print(dumps_json(summary))  # strict JSON: a NaN metric is null
    else:
        print(
            f"best epoch {summary['best_epoch']}: val_mae {summary['val_mae']:.4f}  "
            f"test_mae {summary['test_mae']:.4f}  "
            f"test_rmse {summary['test_rmse']:.4f}  test_r2 {summary['test_r2']:.3f}  "
            f"alignment {summary.get('alignment', float('nan')):.4f}  "
            f"uniformity {summary.get('uniformity', float('nan')):.4f}"
        )
        print(f"checkpoint: {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
