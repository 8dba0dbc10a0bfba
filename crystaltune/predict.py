"""``python -m crystaltune.predict --checkpoint PATH --input CIFS|DIR|JSONL --output out.csv``.

Accepts crystaltune checkpoints and reference CGCNN ``.pth.tar`` files. A crystal that fails to
parse gets a row with its error; the others are predicted.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import LoadedModel
from .errors import CrystaltuneError, cli_main
from .graphs.cache import GraphParams, build_store
from .graphs.store import GraphStore
from .readers import read_source


def read_inputs(inputs: list[str]):
    """Raw records from CIF files, folders (id_prop.csv or *.cif / *.json) and dataset files."""
    from .readers import RawDataset

    out = RawDataset(Path(inputs[0]) if inputs else Path("."))
    cifs: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and not (p / "id_prop.csv").exists() and any(p.glob("*.cif")):
            cifs += sorted(p.glob("*.cif"))
        elif p.suffix.lower() == ".cif":
            if not p.exists():
                raise CrystaltuneError(f"{p}: no such file")
            cifs.append(p)
        else:
            raw = read_source(p)
            out.records += raw.records
            out.skipped += raw.skipped
    for i, cif in enumerate(cifs, start=1):
        out.records.append(
            {"id": cif.stem, "line": i, "structure": cif.read_text(errors="replace"), "props": {}, "fmt": "cif"}
        )
    if not out.records and not out.skipped:
        raise CrystaltuneError(f"no crystals found in {', '.join(inputs)}")
    _refuse_duplicate_ids(out.records, cifs)
    return out


def _refuse_duplicate_ids(records: list[dict], cifs: list[Path]) -> None:
    """Two inputs with the same id would get one prediction between them: refuse, naming both."""
    where = {c.stem: c for c in cifs}
    seen: dict[str, int] = {}
    for rec in records:
        rid = rec["id"]
        if rid in seen:
            first = where.get(rid, f"record {seen[rid]}")
            raise CrystaltuneError(
                f"two inputs have the id {rid!r} ({first} and another); rename one so each crystal "
                "gets its own prediction"
            )
        seen[rid] = rec["line"]


@torch.no_grad()
def predict_store(loaded: LoadedModel, store: GraphStore, batch_size: int = 256) -> np.ndarray:
    """Denormalised predictions, (len(store), n_targets)."""
    model = loaded.model.eval()
    device = next(model.parameters()).device
    preds = []
    for start in range(0, len(store), batch_size):
        idx = np.arange(start, min(start + batch_size, len(store)))
        batch = store.batch(idx, []).to(device)
        preds.append(loaded.normalizer.denorm(model(batch)).cpu())
    return torch.cat(preds).numpy() if preds else np.zeros((0, len(loaded.targets)))


def predict(checkpoint: str, inputs: list[str]) -> tuple[list[str], list[dict], dict | None]:
    """Header, rows (id, one column per target named as the target, ``<target>_std`` for an ensemble,
    flags, error) in input order, and the model's training domain. ``flags`` says when a crystal
    leaves that domain (unseen elements, a value outside the training range, a negative band gap)."""
    from .checkpoint import load_members

    members = load_members(checkpoint)
    header, rows = predict_records(members, read_inputs(inputs))
    return header, rows, members[0].domain


def predict_records(members: list, raw) -> tuple[list[str], list[dict]]:
    """Predictions of one model or an ensemble's members (mean, and std across members) for raw
    records, in their order; what the CLI and the MLflow pyfunc both return."""
    from .domain import flags

    targets, domain = members[0].targets, members[0].domain
    preds, zs, errors = [], {}, {}
    for loaded in members:
        p, z, e = _member_predictions(loaded, raw)
        preds.append(p)
        zs.update(z)
        errors.update(e)
    by_id = {}
    for rid, z in zs.items():
        if rid in errors:
            continue
        stack = np.stack([p[rid] for p in preds])
        values = dict(zip(targets, map(float, stack.mean(0))))
        scale = members[0].std_scale  # calibrated on the validation split when the ensemble was built
        stds = {f"{t}_std": float(scale * v) for t, v in zip(targets, stack.std(0))} if len(members) > 1 else {}
        by_id[rid] = {**values, **stds, "flags": flags(z, values, domain)}
    std_cols = [f"{t}_std" for t in targets] if len(members) > 1 else []
    header = ["id", *targets, *std_cols, "flags", "error"]
    rows = []
    for rec_id in [r["id"] for r in raw.records] + [s["id"] for s in raw.skipped]:
        res = by_id.get(rec_id, {"error": errors.get(rec_id, "skipped")})
        rows.append({"id": rec_id, **{k: res.get(k, "") for k in header[1:-1]}, "error": res.get("error", "")})
    return header, rows


def _member_predictions(loaded, raw) -> tuple[dict[str, np.ndarray], dict[str, set[int]], dict[str, str]]:
    """One model's predictions by id, the elements of each crystal, and why a crystal got none."""
    from .featurizers import unsupported_crystals

    # a reference CGCNN checkpoint gets the reference code's own neighbours (ties included), so its
    # published predictions are reproduced exactly
    mode = "reference" if loaded.kind == "reference-cgcnn" else "crystaltune"
    store, skipped, _ = build_store(raw, GraphParams(loaded.cutoff, loaded.max_neighbors, mode), progress=False)
    out = predict_store(loaded, store) if len(store) else np.zeros((0, len(loaded.targets)))
    bad = unsupported_crystals(store.arrays["z"], store.node_ptr, loaded.config.model.node_featurizer)
    errors = {str(store.ids[g]): reason for g, reason in bad.items()}
    errors.update({s["id"]: s["reason"] for s in skipped})
    zs = {str(rid): set(store.graph(i)["z"].tolist()) for i, rid in enumerate(store.ids)}
    return {str(rid): out[i] for i, rid in enumerate(store.ids)}, zs, errors


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crystaltune.predict", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="crystaltune checkpoint or reference CGCNN .pth.tar")
    p.add_argument("--input", required=True, nargs="+", help="CIF files, a folder of CIFs, or a dataset file")
    p.add_argument("--output", default="-", help="CSV file (default: stdout)")
    args = p.parse_args(argv)
    if args.output != "-":
        from .outputs import check_output_file

        check_output_file(args.output, "--output")  # before predicting
    header, rows, loaded_domain = predict(args.checkpoint, args.input)
    fh = sys.stdout if args.output == "-" else open(args.output, "w", newline="")
    try:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    finally:
        if fh is not sys.stdout:
            fh.close()
    if args.output != "-":  # units and the model's domain beside the CSV
        from .domain import UNITS

        units = {t: (loaded_domain or {}).get("units", {}).get(t) or UNITS.get(t, "") for t in header[1:-2]}
        Path(f"{args.output}.json").write_text(
            json.dumps({"checkpoint": args.checkpoint, "units": units, "domain": loaded_domain}, indent=1)
        )
    errors = sum(1 for r in rows if r["error"])
    print(
        f"predicted {len(rows) - errors} crystal(s), {errors} error row(s)"
        + (f" -> {args.output}" if args.output != "-" else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
