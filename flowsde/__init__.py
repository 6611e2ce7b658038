"""flowsde: ODE/SDE solvers for flow-matching and diffusion models.

Time runs from t=0 (noise) to t=1 (data), as in Holderrieth & Erives, "An Introduction to Flow Matching
and Diffusion Models" (arXiv 2506.02070). ``odeint`` mirrors torchdiffeq, ``sdeint`` mirrors torchsde.
"""
__version__ = "0.1.0"

from . import brownian, kernels, paths, problems, solvers, studies  # noqa: E402
from .brownian import BrownianMotion, GridBrownian, VirtualBrownianTree  # noqa: E402
from .solvers import ODE_METHODS, SDE_METHODS, odeint, odeint_adjoint, odeint_event, sdeint, sdeint_adjoint  # noqa: E402
from .sampling import sample  # noqa: E402
from .solvers.linear import solve_linear_sde  # noqa: E402

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "sdeint", "sdeint_adjoint", "sample", "solve_linear_sde", "ODE_METHODS", "SDE_METHODS", "BrownianMotion", "GridBrownian",
           "VirtualBrownianTree", "brownian", "kernels", "paths", "problems", "solvers", "studies", "__version__"]
