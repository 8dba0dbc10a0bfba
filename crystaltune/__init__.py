"""crystaltune: distributed hyperparameter search for crystal graph neural networks."""

import os as _os

# Ray reads its authentication mode once per process, on first use: set it before anything imports
# Ray, so every Ray this process starts or joins requires the token (see crystaltune.raysession).
_os.environ.setdefault("RAY_AUTH_MODE", "token")
# MLflow draws a progress bar for every artifact download (checkpoints in report, ensembles): noise
_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__version__ = "0.1.0"
