"""Integrations: other libraries' conventions, converted at the boundary (never inside the solvers).

- :mod:`flowsde.integrations.kdiffusion`: k-diffusion-style sampler functions (sigma space, denoisers).
"""
