"""crystaltune: distributed hyperparameter search for crystal graph neural networks."""

import os as _os

# Ray reads its authentication mode once per process, on first use: set it before anything imports
# Ray, so every Ray this process starts or joins requires the token (see crystaltune.raysession).
_os.environ.setdefault("RAY_AUTH_MODE", "token")

__version__ = "0.1.0"
