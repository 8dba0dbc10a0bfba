"""The best model as an MLflow pyfunc: a crystaltune checkpoint plus a predict() over structures.

Logged as "models from code" (this file is the model's code, the checkpoint its artifact), so
loading it unpickles nothing. Imports are absolute because MLflow runs this file as a script.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import pandas as pd


class CrystaltunePyfunc(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a ``structure`` column (CIF text or a pymatgen Structure dict) and an
    optional ``id`` column. Output: one column per target (NaN where a structure is unusable), ``<target>_std``
    for an ensemble, and ``flags`` (outside the training domain, or why there is no prediction)."""

    def load_context(self, context):
        from crystaltune.checkpoint import load_members

        self.members = load_members(context.artifacts["checkpoint"])  # one model, or an ensemble's members

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:  # noqa: D401
        import json
        from pathlib import Path

        import numpy as np

        from crystaltune.predict import predict_records
        from crystaltune.readers import RawDataset

        ids = [str(i) for i in (model_input["id"] if "id" in model_input else range(len(model_input)))]
        records = []
        for i, (rid, s) in enumerate(zip(ids, model_input["structure"])):
            if isinstance(s, str) and s.lstrip().startswith("{"):
                s = json.loads(s)
            records.append({"id": rid, "line": i + 1, "structure": s, "props": {}})
        header, rows = predict_records(self.members, RawDataset(Path("."), records))
        out = pd.DataFrame(rows, columns=header).set_index("id")
        numeric = [c for c in header[1:] if c not in ("flags", "error")]
        out[numeric] = out[numeric].replace("", np.nan).astype(float)
        out.loc[out["flags"] == "", "flags"] = out["error"]  # a crystal without a prediction says why
        return out.drop(columns="error")


mlflow.models.set_model(CrystaltunePyfunc())
