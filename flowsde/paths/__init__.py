"""Probability paths (schedules, conversions between model parametrisations, exact Gaussian-mixture
fields). The paths arrive with the paths-and-sampling work; this package holds their place."""
__all__ = []
