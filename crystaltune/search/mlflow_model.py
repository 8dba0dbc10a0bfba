"""The best model as an MLflow pyfunc: a crystaltune checkpoint plus a predict() over structures.

Logged as "models from code" (this file is the model's code, the checkpoint its artifact), so
loading it unpickles nothing. Imports are absolute because MLflow runs this file as a script.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import pandas as pd


class CrystaltunePyfunc(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a ``structure`` column (CIF text, a pymatgen Structure dict, or that dict
    as JSON text) and an optional ``id`` column. Output, one row per input row in its order: one column
    per target (NaN where a structure is unusable), ``<target>_std`` for an ensemble, ``flags`` (outside
    the training domain, or why there is no prediction) and ``error`` (why there is none, else empty).
    A bad row (JSON that does not parse, not a structure) gets NaN and its reason; the others are predicted."""

    def load_context(self, context):
        from crystaltune.checkpoint import load_members

        self.members = load_members(context.artifacts["checkpoint"])  # one model, or an ensemble's members

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:  # noqa: D401
        from pathlib import Path

        import numpy as np

        from crystaltune.predict import predict_records
        from crystaltune.readers import RawDataset, escape_id, short

        if "structure" not in model_input:
            raise ValueError(f"the input has no 'structure' column (columns: {', '.join(map(str, model_input))})")
        ids = [str(i) for i in (model_input["id"] if "id" in model_input else range(len(model_input)))]
        records, bad = [], {}
        for i, (rid, s) in enumerate(zip(ids, model_input["structure"])):
            s, problem = structure_of(s)
            if problem:
                bad[i] = f"row {i + 1} ({short(escape_id(rid), 80)}): {problem}"
            else:
                records.append({"id": rid, "line": i + 1, "structure": s, "props": {}})
        header, rows = predict_records(self.members, RawDataset(Path("."), records))
        good = iter(rows)
        blank = dict.fromkeys(header[1:-1], "")
        table = [{"id": rid, **blank, "error": bad[i]} if i in bad else next(good) for i, rid in enumerate(ids)]
        out = pd.DataFrame(table, columns=header).set_index("id")
        numeric = [c for c in header[1:] if c not in ("flags", "error")]
        out[numeric] = out[numeric].replace("", np.nan).astype(float)
        out.loc[out["flags"] == "", "flags"] = out["error"]  # a crystal without a prediction says why
        return out


def structure_of(value) -> tuple[object, str | None]:
    """A row's structure as the readers take it (JSON text parsed into its dict), or why it is unusable:
    one bad row must not fail the batch."""
    import json

    if not isinstance(value, str) or not value.lstrip().startswith(("{", "[")):
        return value, None  # CIF/POSCAR text, a dict, or a value the graph builder refuses with its reason
    try:
        return json.loads(value), None
    except ValueError as exc:
        return None, f"structure is not valid JSON ({str(exc)[:120]})"
    except RecursionError:
        return None, "structure is not valid JSON (nested too deeply)"


mlflow.models.set_model(CrystaltunePyfunc())
