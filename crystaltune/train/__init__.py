"""Training one trial: data preparation, the fit loop, metrics; the CLI is ``python -m crystaltune.train``."""

from .loop import TrialDiverged, fit
from .trial_data import TrialData, load_trial_dataset, prepare_trial_data

__all__ = ["TrialData", "TrialDiverged", "fit", "load_trial_dataset", "prepare_trial_data"]
