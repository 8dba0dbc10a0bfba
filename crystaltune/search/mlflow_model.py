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
    optional ``id`` column. Output: one column per target (NaN where a structure is unusable)."""

    def load_context(self, context):
        from crystaltune.checkpoint import load_checkpoint

        self.loaded = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:  # noqa: D401
        import json

        import numpy as np

        from crystaltune.data.readers import RawDataset
        from crystaltune.graphs.cache import GraphParams, build_store
        from crystaltune.predict import predict_store

        ids = [str(i) for i in (model_input["id"] if "id" in model_input else range(len(model_input)))]
        records = []
        for i, (rid, s) in enumerate(zip(ids, model_input["structure"])):
            if isinstance(s, str) and s.lstrip().startswith("{"):
                s = json.loads(s)
            records.append({"id": rid, "line": i + 1, "structure": s, "props": {}})
        from pathlib import Path

        store, _, _ = build_store(
            RawDataset(Path("."), records),
            GraphParams(self.loaded.cutoff, self.loaded.max_neighbors),
            workers=1,
            progress=False,
        )
        from crystaltune.domain import flags

        preds = predict_store(self.loaded, store) if len(store) else np.zeros((0, len(self.loaded.targets)))
        targets = self.loaded.targets
        by_id = {rid: preds[k] for k, rid in enumerate(store.ids)}
        notes = {
            rid: flags(set(store.graph(k)["z"].tolist()), dict(zip(targets, map(float, preds[k]))), self.loaded.domain)
            for k, rid in enumerate(store.ids)
        }
        rows = [by_id.get(rid, np.full(len(targets), np.nan)) for rid in ids]
        out = pd.DataFrame(np.array(rows).reshape(len(ids), -1), columns=targets, index=ids)
        out["flags"] = [notes.get(rid, "structure could not be used") for rid in ids]  # outside the training domain
        return out


mlflow.models.set_model(CrystaltunePyfunc())
