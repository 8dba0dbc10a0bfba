"""Target standardisation fitted on the training split; saved in checkpoints as a plain dict."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Normalizer:
    """Per-target standardisation fitted on the training split: y_norm = (y - mean) / std."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, y: torch.Tensor) -> Normalizer:
        mask = torch.isfinite(y)
        mean = torch.stack([y[mask[:, t], t].mean() for t in range(y.shape[1])])
        std = torch.stack(
            [y[mask[:, t], t].std() if mask[:, t].sum() > 1 else torch.tensor(1.0) for t in range(y.shape[1])]
        )
        return cls(mean.float(), torch.where(std > 1e-8, std, torch.ones_like(std)).float())

    def norm(self, y):
        return (y - self.mean.to(y.device)) / self.std.to(y.device)

    def denorm(self, y):
        return y * self.std.to(y.device) + self.mean.to(y.device)

    def to_dict(self):
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d):
        return cls(
            torch.tensor(d["mean"], dtype=torch.float32).reshape(-1),
            torch.tensor(d["std"], dtype=torch.float32).reshape(-1),
        )
