"""The training recipe a throughput benchmark times: one model on a dataset's training split, the
same for crystaltune and for the reference code it is compared with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BenchRecipe:
    model: str = "cgcnn"
    dataset: str = "perovskites"
    epochs: int = 3
    batch_size: int = 256
    threads: int = 2
    hidden: int = 64  # atom embedding (the reference code's --atom-fea-len)
    head_hidden: int = 128  # --h-fea-len
    layers: int = 3  # --n-conv
    device: str = "cpu"
    amp: bool = False
    limit: int | None = None  # a seeded subset of N crystals

    def replace(self, **changes: Any) -> BenchRecipe:
        return dataclasses.replace(self, **changes)

    def trial_config(self) -> dict[str, Any]:
        """The recipe as a crystaltune trial config: plain SGD, MSE, no schedule, as the reference trains."""
        return {
            "data": {"dataset": self.dataset, "limit": self.limit},
            "model": {"name": self.model, **self.architecture},
            "optim": {"name": "sgd", "lr": 0.01, "schedule": "none"},
            "loss": {"name": "mse"},
            "train": {
                "epochs": self.epochs,
                "batch_size": self.batch_size,
                "num_threads": self.threads,
                "device": self.device,
                "amp": self.amp,
            },
        }

    def cli_args(self) -> list[str]:
        """The recipe as ``python -m crystaltune.bench train`` arguments."""
        args = ["--model", self.model, "--dataset", self.dataset, "--device", self.device]
        for name in ("epochs", "batch_size", "threads", "hidden", "head_hidden", "layers"):
            args += [f"--{name.replace('_', '-')}", str(getattr(self, name))]
        return args + (["--limit", str(self.limit)] if self.limit else []) + (["--amp"] if self.amp else [])

    @property
    def architecture(self) -> dict[str, int]:
        return {"hidden": self.hidden, "head_hidden": self.head_hidden, "layers": self.layers}
