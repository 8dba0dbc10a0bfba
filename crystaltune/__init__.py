"""crystaltune: distributed hyperparameter search for crystal graph neural networks."""

import os as _os

# Ray reads its authentication mode once per process, on first use: set it before anything imports
# Ray, so every Ray this process starts or joins requires the token (see crystaltune.raysession).
_os.environ.setdefault("RAY_AUTH_MODE", "token")
# MLflow draws a progress bar for every artifact download (checkpoints in report, ensembles): noise
_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Tune warns when handling one trial result takes > 0.5 s, which the driver's MLflow writes do on a
# machine whose cores all train: a line per epoch the user cannot act on; warn past 10 s only
_os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "10")

__version__ = "0.1.0"
