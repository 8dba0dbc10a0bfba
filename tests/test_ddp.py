"""DDP through a real Ray Train worker group (gloo on CPU): 2 workers reach the val MAE of 1."""

from __future__ import annotations

import pytest

from crystaltune.config import TrialConfig
from crystaltune.train.distributed import fit_distributed


@pytest.mark.slow
def test_two_cpu_workers_match_one_worker():
    cfg = TrialConfig.from_dict(
        {
            "data": {"limit": 240},
            "model": {"hidden": 32, "head_hidden": 32, "layers": 2},
            "optim": {"lr": 3e-3},
            "train": {"epochs": 4, "batch_size": 32},
        }
    )
    import ray

    from crystaltune.raysession import start_local_ray

    start_local_ray(num_cpus=3)
    try:
        one = fit_distributed(cfg, num_workers=1)
        two = fit_distributed(cfg, num_workers=2)
    finally:
        ray.shutdown()
    assert one["epoch"] == two["epoch"] == 4
    # same crystals per optimiser step; only per-rank batch-norm statistics differ
    assert two["best_val_mae"] == pytest.approx(one["best_val_mae"], rel=0.05)
    assert two["test_mae"] == pytest.approx(one["test_mae"], rel=0.05)
    print(
        f"1 worker val {one['best_val_mae']:.4f} test {one['test_mae']:.4f}; "
        f"2 workers val {two['best_val_mae']:.4f} test {two['test_mae']:.4f}"
    )
