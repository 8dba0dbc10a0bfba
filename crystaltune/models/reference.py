"""Import the reference CGCNN's published ``.pth.tar`` checkpoints into ``cgcnn``.

The reference graphs use radius 8 Å, 12 neighbours, Gaussian 0..8 Å step 0.2 and the atom_init
features; its ``fcs.k``/``fc_out`` layers map onto our per-target head.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import DataConfig, ModelConfig, TrialConfig
from ..errors import CrystaltuneError


def reference_config(ck: dict[str, Any], path) -> TrialConfig:
    args, sd = ck["args"], ck["state_dict"]
    if not isinstance(args, dict) or "embedding.weight" not in sd:
        raise CrystaltuneError(f"{path}: reference checkpoint without args or embedding weights")
    if args.get("task", "regression") != "regression":
        raise CrystaltuneError(f"{path}: only regression checkpoints are supported (task={args.get('task')!r})")
    n_conv = len({k.split(".")[1] for k in sd if k.startswith("convs.")})
    n_h = 1 + len({k.split(".")[1] for k in sd if k.startswith("fcs.")})
    atom_fea_len = sd["embedding.weight"].shape[0]
    if sd["embedding.weight"].shape[1] != 92 or sd["convs.0.fc_full.weight"].shape[1] != 2 * atom_fea_len + 41:
        raise CrystaltuneError(f"{path}: expected 92 atom features and 41 Gaussian edge features")
    model = ModelConfig(
        name="cgcnn",
        hidden=atom_fea_len,
        head_hidden=sd["conv_to_fc.weight"].shape[0],
        layers=n_conv,
        head_layers=n_h,
        pooling="mean",
        node_featurizer="cgcnn",
        edge_featurizer="gaussian",
        edge_params={"step": 0.2},
    )
    return TrialConfig(data=DataConfig(dataset="reference", cutoff=8.0, max_neighbors=12), model=model)


def reference_state_dict(sd: dict[str, torch.Tensor], n_h: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.startswith("fcs."):
            _, i, rest = k.split(".", 2)
            out[f"heads.0.{3 * int(i)}.{rest}"] = v
        elif k.startswith("fc_out."):
            out[f"heads.0.{3 * (n_h - 1)}.{k.split('.', 1)[1]}"] = v
        else:
            out[k] = v
    # the node table is a frozen buffer of ours, not part of the reference weights
    return out
