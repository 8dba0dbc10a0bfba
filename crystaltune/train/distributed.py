"""fit_distributed: one configuration on a Ray Train worker group (DDP over gloo on CPU, NCCL on
GPU), without Tune. The same worker loop the search uses."""

from __future__ import annotations

import tempfile
from typing import Any

from ..config import TrialConfig


def fit_distributed(
    cfg: TrialConfig,
    num_workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    address: str | None = None,
    storage: str | None = None,
) -> dict[str, Any]:
    """Train with ``num_workers`` DDP ranks through a real Ray Train TorchTrainer; returns the last
    report (best-val metrics included). Starts a local Ray instance unless one is running."""
    import ray
    import ray.train
    import ray.train.torch

    from ..search.trainable import train_loop_per_worker

    started = False
    if not ray.is_initialized():
        from ..raysession import init_ray

        init_ray(address, max(int(num_workers * cpus_per_worker), 1) + 1)
        started = True
    try:
        from ..train.trial_data import load_trial_dataset

        data_ref = ray.put(load_trial_dataset(cfg))
        resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        trainer = ray.train.torch.TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "trial": cfg.to_dict(),
                "data_ref": data_ref,
                "use_gpu": use_gpu,
                "cpus_per_worker": cpus_per_worker,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                storage_path=storage or tempfile.mkdtemp(prefix="crystaltune-train-"),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            ),
        )
        result = trainer.fit()
        return dict(result.metrics)
    finally:
        if started:
            ray.shutdown()
