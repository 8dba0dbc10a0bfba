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
        """Mean and std per target over its finite values, computed in float64 (float32 squares of
        values near 1e30 overflow). A target without spread (constant, a single value, or a std below
        float32's resolution of its mean) is scaled by its own magnitude instead, never by a fixed 1,
        which for targets near 1e-30 made every prediction error larger than the targets themselves."""
        y = y.double()
        means, stds = [], []
        for t in range(y.shape[1]):
            v = y[torch.isfinite(y[:, t]), t]
            mean = v.mean() if len(v) else torch.tensor(0.0, dtype=torch.float64)
            std = v.std() if len(v) > 1 else torch.tensor(0.0, dtype=torch.float64)
            if not (torch.isfinite(std) and std > 1e-6 * mean.abs() and std > 0):
                std = mean.abs() if mean != 0 else torch.tensor(1.0, dtype=torch.float64)
            means.append(mean)
            stds.append(std)
        return cls(torch.stack(means).float(), torch.stack(stds).float())

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
