"""Solvers: methods as data (Butcher tableaux, SDE schemes with their orders) and the fixed-step driver."""
from .adjoint import odeint_adjoint
from .ode import ADAPTIVE_ODE_METHODS, ODE_METHODS, odeint, odeint_event
from .rk import ButcherTableau, rk_step
from .sde import sdeint
from .sde_adjoint import sdeint_adjoint
from .sde_methods import NOISE_TYPES, SDE_METHODS, SDE_TYPES, SDEMethod

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "sdeint", "sdeint_adjoint", "ODE_METHODS", "ADAPTIVE_ODE_METHODS", "SDE_METHODS", "SDEMethod",
           "ButcherTableau", "rk_step", "NOISE_TYPES", "SDE_TYPES"]
