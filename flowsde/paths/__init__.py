"""Probability paths: schedules with exact derivatives, Gaussian conditional paths, conversions between
model parametrisations, exact Gaussian-mixture fields, time grids and training losses."""
from .gaussian import (PREDICTIONS, VE, EDM, CondOT, GaussianPath, Schedule, VPCosine, VPLinear,
                       check_prediction)
from .mixture import GaussianMixture

__all__ = ["GaussianPath", "CondOT", "VPCosine", "VPLinear", "EDM", "VE", "Schedule", "GaussianMixture",
           "PREDICTIONS", "check_prediction"]
