"""Probability paths: schedules with exact derivatives, Gaussian conditional paths, conversions between
model parametrisations, exact Gaussian-mixture fields, time grids and training losses."""
from .gaussian import (PREDICTIONS, VE, EDM, CondOT, GaussianPath, Schedule, VPCosine, VPLinear,
                       check_prediction)
from .grids import time_grid
from .losses import flow_matching_loss, ot_pairing, score_matching_loss
from .mixture import GaussianMixture

__all__ = ["GaussianPath", "CondOT", "VPCosine", "VPLinear", "EDM", "VE", "Schedule", "GaussianMixture",
           "PREDICTIONS", "check_prediction", "time_grid", "flow_matching_loss", "score_matching_loss",
           "ot_pairing"]
