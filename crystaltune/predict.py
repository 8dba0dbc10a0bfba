"""``python -m crystaltune.predict --checkpoint PATH --input CIFS|DIR|JSONL --output out.csv``.

Accepts crystaltune checkpoints and reference CGCNN ``.pth.tar`` files. A crystal that fails to
parse gets a row with its error; the others are predicted. Every input gets its own row: rows are
never merged by id, and an entry of a folder that cannot be read (a link loop, a dangling link, a
folder named x.cif, a FIFO) gets an error row naming it.

The CSV is UTF-8. Ids holding a backslash, a control character or a file name's undecodable byte are
written with backslash escapes (``\\\\``, ``\\n``, ``\\xff``), so distinct ids stay distinct. A text cell that
starts with ``=``, ``+``, ``-``, ``@``, a tab, a carriage return or ``'`` gets a leading ``'`` (OWASP's
defence against spreadsheet formula injection; remove one leading ``'`` to read the value back).
Values are written with 6 decimals, magnitudes below 0.001 with 6 significant digits (1.23457e-07).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import LoadedModel
from .errors import CrystaltuneError, cli_main
from .graphs.cache import GraphParams, build_store
from .graphs.store import GraphStore
from .readers import RawDataset, ReadError, escape_id, path_kind, read_cif, read_source, short, shown


def read_inputs(inputs: list[str]) -> RawDataset:
    """Raw records from CIF files, folders (id_prop.csv or *.cif / *.json) and dataset files."""
    out = RawDataset(Path(inputs[0]) if inputs else Path("."))
    cifs: list[tuple[Path, bool]] = []  # (file, named on the command line)
    for item in inputs:
        p = Path(item)
        if p.is_dir() and not os.path.lexists(p / "id_prop.csv") and any(p.glob("*.cif")):
            cifs += [(c, False) for c in sorted(p.glob("*.cif"))]
        elif p.suffix.lower() == ".cif":
            cifs.append((p, True))
        else:
            raw = read_source(p)
            out.records += raw.records
            out.skipped += raw.skipped
    for i, (cif, named) in enumerate(cifs, start=1):
        _add_cif(out, cif, i, named)
    if not out.records and not out.skipped:
        raise CrystaltuneError(f"no crystals found in {', '.join(inputs)}")
    _refuse_duplicate_ids(out.records)
    return out


def _add_cif(out: RawDataset, cif: Path, line: int, named: bool) -> None:
    """One CIF file as a record. One found in a folder that cannot be read (a folder named x.cif, a link
    loop, a dangling link, a FIFO) becomes a skipped entry naming it, so the folder's other crystals are
    still predicted; one named on the command line is the user's error (one line, exit 2)."""
    rid = escape_id(cif.stem)  # names that are not UTF-8 come as surrogateescape text: written \\xHH
    try:
        text = read_cif(cif)
    except ReadError as exc:
        if named:
            raise
        out.skipped.append({"id": rid, "reason": f"{shown(cif)}: {exc.why}"})
        return
    out.records.append({"id": rid, "line": line, "structure": text, "props": {}, "fmt": "cif", "path": cif})


def _refuse_duplicate_ids(records: list[dict]) -> None:
    """Two inputs with the same id would get one prediction between them: refuse, naming both."""
    seen: dict[str, dict] = {}
    for rec in records:
        rid = rec["id"]
        if rid in seen:
            first = seen[rid].get("path") or f"record {seen[rid]['line']}"
            raise CrystaltuneError(
                f"two inputs have the id {short(rid)!r} ({shown(first)} and another); rename one so each crystal "
                "gets its own prediction"
            )
        seen[rid] = rec


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


def predict_records(members: list, raw: RawDataset) -> tuple[list[str], list[dict]]:
    """Predictions of one model or an ensemble's members (mean, and std across members) for raw
    records, one row per record in their order, then one per skipped entry (its reason); what the CLI
    and the MLflow pyfunc both return. Rows are matched to records by position, never by id."""
    from .domain import flags

    targets, domain = members[0].targets, members[0].domain
    per_member = [_member_predictions(loaded, raw) for loaded in members]
    std_cols = [f"{t}_std" for t in targets] if len(members) > 1 else []
    header = ["id", *targets, *std_cols, "flags", "error"]
    blank = dict.fromkeys(header[1:-1], "")
    rows = []
    for i, rec in enumerate(raw.records):
        error = next((m[i][2] for m in per_member if m[i][2]), "")
        if error:
            rows.append({"id": rec["id"], **blank, "error": error})
            continue
        stack = np.stack([m[i][0] for m in per_member])
        values = dict(zip(targets, map(float, stack.mean(0))))
        scale = members[0].std_scale  # calibrated on the validation split when the ensemble was built
        stds = {f"{t}_std": float(scale * v) for t, v in zip(targets, stack.std(0))} if std_cols else {}
        rows.append(
            {"id": rec["id"], **values, **stds, "flags": flags(per_member[0][i][1], values, domain), "error": ""}
        )
    rows += [{"id": s["id"], **blank, "error": s["reason"]} for s in raw.skipped]
    return header, rows


def _member_predictions(loaded, raw: RawDataset) -> list[tuple[np.ndarray | None, set[int] | None, str]]:
    """One model's (prediction, elements, why none) for each record, in order. Graphs are built under
    the records' positions as ids, so two records that share an id (or an id like "line 2") stay apart."""
    from .featurizers import unsupported_crystals

    keyed = RawDataset(raw.source, [{**rec, "id": str(i)} for i, rec in enumerate(raw.records)])
    # a reference CGCNN checkpoint gets the reference code's own neighbours (ties included), so its
    # published predictions are reproduced exactly
    mode = "reference" if loaded.kind == "reference-cgcnn" else "crystaltune"
    store, skipped, _ = build_store(keyed, GraphParams(loaded.cutoff, loaded.max_neighbors, mode), progress=False)
    out = predict_store(loaded, store) if len(store) else np.zeros((0, len(loaded.targets)))
    bad = unsupported_crystals(store.arrays["z"], store.node_ptr, loaded.config.model.node_featurizer)
    graph_of = {int(key): g for g, key in enumerate(store.ids)}
    why = {int(s["id"]): s["reason"] for s in skipped}
    result = []
    for i, rec in enumerate(raw.records):
        g = graph_of.get(i)
        if g is None:
            result.append((None, None, _named(why.get(i, "skipped"), i, rec)))
        elif g in bad:
            result.append((None, None, bad[g]))
        else:
            result.append((out[g], set(store.graph(g)["z"].tolist()), ""))
    return result


def _named(reason: str, key: int, rec: dict) -> str:
    """A build_store reason, which starts with the record's positional key, with its real id instead."""
    prefix = f"{key} (line {rec['line']})"
    return f"{short(rec['id'])} (line {rec['line']}){reason[len(prefix) :]}" if reason.startswith(prefix) else reason


#: characters a spreadsheet reads as the start of a formula (OWASP), and the escape's own quote
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(value) -> str | float:
    """A value as the CSV writes it: floats with 6 decimals (6 significant digits below 0.001, so 1e-7
    is not 0.000000), text as valid UTF-8 with a leading ' when a spreadsheet would run it as a formula."""
    if isinstance(value, float):
        return f"{value:.6g}" if value != 0 and math.isfinite(value) and abs(value) < 1e-3 else f"{value:.6f}"
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate as \\udcff
    return "'" + text if text.startswith(FORMULA_START) else text


def side_file(output: str) -> Path | None:
    """Where the units and domain go beside --output (``out.csv.json``); None when the output is stdout or a
    pipe/device (nothing lies beside it). A folder or special file there is refused before any work."""
    if output == "-" or path_kind(output) not in ("file", "missing"):
        return None
    side = Path(f"{output}.json")
    kind = path_kind(side)
    if kind not in ("file", "missing"):
        what = "a folder" if kind == "folder" else kind
        raise CrystaltuneError(
            f"{shown(side)} is {what}; predict writes the units and model domain there beside --output "
            f"{shown(output)}: remove it or give another --output"
        )
    return side


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m crystaltune.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="crystaltune checkpoint or reference CGCNN .pth.tar")
    p.add_argument("--input", required=True, nargs="+", help="CIF files, a folder of CIFs, or a dataset file")
    p.add_argument(
        "--output",
        default="-",
        help="CSV file (default: stdout); units and the model's domain go to OUTPUT.json beside it. "
        "Text cells starting with = + - @ tab CR or ' get a leading ' (formula injection)",
    )
    args = p.parse_args(argv)
    side = None
    if args.output != "-":
        from .outputs import check_output_file

        check_output_file(args.output, "--output")  # before predicting
        side = side_file(args.output)
    header, rows, loaded_domain = predict(args.checkpoint, args.input)
    fh = sys.stdout if args.output == "-" else open(args.output, "w", newline="", encoding="utf-8")
    try:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow({k: csv_cell(v) for k, v in r.items()})
    finally:
        if fh is not sys.stdout:
            fh.close()
    if side is not None:  # units and the model's domain beside the CSV
        from .domain import UNITS

        units = {t: (loaded_domain or {}).get("units", {}).get(t) or UNITS.get(t, "") for t in header[1:-2]}
        side.write_text(json.dumps({"checkpoint": args.checkpoint, "units": units, "domain": loaded_domain}, indent=1))
    errors = sum(1 for r in rows if r["error"])
    print(
        f"predicted {len(rows) - errors} crystal(s), {errors} error row(s)"
        + (f" -> {shown(args.output)}" if args.output != "-" else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
