"""``flowsde.odeint_adjoint``: torchdiffeq's adjoint method, gradients in memory that does not grow with the
number of steps.

The forward solve runs without recording a graph; the backward pass integrates, interval by interval from
the last output time to the first, the augmented system ``(y, a, a_p)`` with ``y' = f(t, y)``,
``a' = -a^T df/dy`` and ``a_p' = -a^T df/dp`` (Pontryagin; Chen et al. 2018), restarting ``y`` from the
forward solution at every output time and adding that time's incoming gradient to ``a``. The vector-Jacobian
products come from one ``torch.autograd.grad`` per evaluation. The augmented state is a tuple (the state's
parts, their adjoints, the parameters' adjoints), so the adaptive methods' error norm is the largest of
the parts' RMS norms: torchdiffeq's default adjoint norm, so both take the same backward steps
(``adjoint_options=dict(norm="seminorm")`` leaves the parameters' adjoints out of it, as torchdiffeq).
"""
from __future__ import annotations

import torch

#: options the backward solves do not take over from ``options`` (torchdiffeq drops ``norm``); a fixed-step
#: method's event search options are not options of its backward solves
_FORWARD_ONLY = ("return_stats", "norm")
_EVENT_ONLY = ("max_num_steps", "check_every")


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None):
    """:func:`flowsde.odeint` with gradients by the adjoint method (torchdiffeq's ``odeint_adjoint``:
    the same arguments and results).

    ``adjoint_params``: the tensors to differentiate besides ``y0`` (default: ``func.parameters()``;
    ``func`` must then be an ``nn.Module``); those that do not require grad are left out. ``adjoint_rtol``
    / ``adjoint_atol`` / ``adjoint_method`` / ``adjoint_options``: the backward solves' (default: the
    forward's; a different ``adjoint_method`` with ``options`` given needs ``adjoint_options``, as in
    torchdiffeq). With ``event_fn`` the backward pass integrates from the event time at that time, without
    a gradient through it (torchdiffeq's convention; :func:`flowsde.odeint_event` with
    ``odeint_interface=odeint_adjoint`` links it up). A ``t`` that requires grad gets its gradient as in
    torchdiffeq (not with ``event_fn``); ``per_sample`` / ``capturable`` are refused.
    """
    from .ode import ADAPTIVE_ODE_METHODS, odeint  # (ode imports this module)

    params = differentiated_params(func, adjoint_params, "odeint_adjoint: func")
    t_grad = isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()
    if t_grad and event_fn is not None:
        raise ValueError("odeint_adjoint: gradients with respect to t are not supported with event_fn (use "
                         "odeint_event for the event time's gradient); pass t.detach()")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    for name in ("per_sample", "capturable"):
        if options.get(name):
            raise ValueError(f"odeint_adjoint: option {name} is not supported")
    adjoint_rtol = rtol if adjoint_rtol is None else adjoint_rtol
    adjoint_atol = atol if adjoint_atol is None else adjoint_atol
    adjoint_method = method if adjoint_method is None else adjoint_method
    if adjoint_options is None:
        if adjoint_method != method and options:
            raise ValueError("odeint_adjoint: with adjoint_method != method the backward options cannot be taken "
                             "from options: pass adjoint_options too")
        drop = _FORWARD_ONLY + (() if adjoint_method is None or adjoint_method in ADAPTIVE_ODE_METHODS else _EVENT_ONLY)
        adjoint_options = {k: v for k, v in options.items() if k not in drop}
    elif not isinstance(adjoint_options, dict):
        raise TypeError(f"adjoint_options must be a dict, got {type(adjoint_options).__name__}")
    else:
        adjoint_options = dict(adjoint_options)
        if adjoint_options.get("return_stats"):
            raise ValueError("adjoint_options: return_stats is not an option of the backward solves (their stats "
                             "are not returned); pass it in options for the forward solve's")

    parts = isinstance(y0, tuple)
    y_parts = tuple(y0) if parts else (y0,)
    for i, v in enumerate(y_parts):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"y0{f'[{i}]' if parts else ''} must be a tensor, got {type(v).__name__}")
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, dtype=y_parts[0].dtype)
    stats = {}

    def forward(*ys):
        out = odeint(func, tuple(ys) if parts else ys[0], t.detach(), rtol=rtol, atol=atol, method=method,
                     options=options, event_fn=event_fn)
        if options.get("return_stats", False):
            stats.update(out[-1])
            out = out[:-1] if event_fn is not None else out[0]
        if event_fn is not None:
            event_t, sol = out
            return (event_t,) + (tuple(sol) if parts else (sol,))
        return tuple(out) if parts else (out,)

    adjoint_options = _adjoint_norm(adjoint_options, options.get("norm"), len(y_parts), parts)

    def backward(times, sols, grads):
        return _backward(odeint, func, times, sols, grads, params, parts, adjoint_rtol, adjoint_atol,
                         adjoint_method, adjoint_options, t_grad)

    out = _Adjoint.apply(forward, backward, t, event_fn is not None, len(y_parts), *y_parts, *params)
    if event_fn is not None:
        event_t, sol = out[0], out[1:]
        result = (event_t, tuple(sol) if parts else sol[0])
    else:
        result = tuple(out) if parts else out[0]
    if options.get("return_stats", False):
        return result + (stats,) if event_fn is not None else (result, stats)
    return result


def _adjoint_norm(adjoint_options: dict, state_norm, k: int, parts: bool) -> dict:
    """The backward solves' error norm, as torchdiffeq chooses it (``adjoint_options["norm"]``). The
    augmented state is the tuple ``(a_t, y..., a_y..., a_p...)`` (``k`` parts each of ``y`` and ``a_y``;
    ``parts``: ``y0`` was a tuple):

    * absent: ``max(|a_t|, n(y), n(a_y), mixed(a_p))``, ``n`` the forward solve's norm (``options["norm"]``:
      RMS, or the mixed norm of a tuple state, unless given) and ``mixed`` the largest of the parameters'
      RMS norms — with the default forward norm, the mixed norm of the whole augmented state;
    * ``"seminorm"`` (Kidger, Chen & Lyons 2021, "Hey, that's not an ODE"): the same without the
      parameters' adjoints, which then never reject a step: fewer backward steps, same gradients to the
      tolerance;
    * a callable: given ``(a_t, *y, *a_y, *a_p)`` (the state's parts, for a tuple ``y0`` each part)."""
    from .adaptive import _rms

    norm = adjoint_options.get("norm")
    if norm is not None and not isinstance(norm, str):
        return adjoint_options  # (a callable: odeint hands it the augmented tuple's parts)
    if norm is not None and norm != "seminorm":
        raise ValueError(f"adjoint_options norm must be 'seminorm' or a callable, got {norm!r}")
    if norm is None and state_norm is None:
        return adjoint_options  # (odeint's default, the mixed norm over the augmented tuple, is this rule)
    if state_norm is not None and (isinstance(state_norm, str) or not callable(state_norm)):
        return adjoint_options  # (the forward odeint refuses it, by name, before any backward pass)
    seminorm = norm == "seminorm"

    def n(ps):
        if state_norm is None:
            return [_rms(p) for p in ps]
        r = state_norm(tuple(ps) if parts else ps[0])  # (a tuple for a tuple state, 1-tuples included)
        return [r if isinstance(r, torch.Tensor) else torch.as_tensor(r, device=ps[0].device)]

    def augmented_norm(state):
        a_t, ys, adj, ps = state[0], state[1:1 + k], state[1 + k:1 + 2 * k], state[1 + 2 * k:]
        rs = [a_t.abs()] + n(ys) + n(adj) + ([] if seminorm else [_rms(p) for p in ps if p.numel()])
        return torch.stack([r.reshape(()).to(torch.float64) for r in rs]).max()
    return dict(adjoint_options, norm=augmented_norm)


def differentiated_params(owner, adjoint_params, what: str) -> tuple:
    """The tensors an adjoint differentiates besides the state: ``adjoint_params`` (checked: floating-point
    tensors), else ``owner.parameters()`` of an ``nn.Module``; those that do not require grad left out."""
    if adjoint_params is None:
        if not isinstance(owner, torch.nn.Module):
            raise ValueError(f"{what} must be an nn.Module to find the parameters to differentiate, or pass them as "
                             f"adjoint_params (adjoint_params=() when there are none)")
        adjoint_params = tuple(owner.parameters())
    else:
        adjoint_params = tuple(adjoint_params)
    for i, p in enumerate(adjoint_params):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"adjoint_params[{i}] must be a floating-point tensor, got "
                            f"{p.dtype if isinstance(p, torch.Tensor) else type(p).__name__}")
    return tuple(p for p in adjoint_params if p.requires_grad)


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward, backward, t, events, n_parts, *inputs):
        with torch.no_grad():
            out = forward(*inputs[:n_parts])
        ctx.backward, ctx.events, ctx.n_parts, ctx.n_inputs = backward, events, n_parts, len(inputs)
        times = torch.stack([t[0].detach().to(out[0].dtype), out[0].detach()]) if events else t.detach()
        ctx.save_for_backward(times, *out[1 if events else 0:])
        if events:
            ctx.mark_non_differentiable(out[0])
        return out

    @staticmethod
    def backward(ctx, *grads):
        times, *sols = ctx.saved_tensors
        grads = grads[1:] if ctx.events else grads  # (no gradient through the event time: torchdiffeq's)
        grads = [torch.zeros_like(s) if g is None else g for s, g in zip(sols, grads)]
        with torch.no_grad():
            adj_y, adj_p, adj_t = ctx.backward(times, sols, grads)
        return (None, None, adj_t, None, None, *adj_y, *adj_p)


def _backward(odeint, func, times, sols, grads, params, parts, rtol, atol, method, options, t_grad=False):
    """The adjoint sweep: ``(adjoints of y0's parts, adjoints of params, gradient of t or None)``. The augmented
    state leads with the time adjoint ``a_t' = -a^T df/dt``, as torchdiffeq's does: it counts in the adaptive
    error norm, so leaving it out would take other backward steps than torchdiffeq's whenever ``f`` depends
    on ``t``. With ``t_grad`` (as torchdiffeq): ``dL/dt_i = f(t_i, y_i) . dL/dy_i`` for ``i > 0`` (one
    evaluation each), subtracted from ``a_t`` there, and ``dL/dt_0 = a_t(t_0)`` (``= -a(t_0) . f(t_0, y_0)``)."""
    k = len(sols)
    ydt = [s.dtype for s in sols]  # (the flat augmented state may be wider: float64 parameters, float32 state)

    def augmented(tt, state):
        ys, adj = state[1:1 + k], [a.to(d) for a, d in zip(state[1 + k:1 + 2 * k], ydt)]
        with torch.enable_grad():
            tv = tt.detach().to(ydt[0]).requires_grad_(True)
            yv = [y.detach().to(d).requires_grad_(True) for y, d in zip(ys, ydt)]
            f = func(tv, tuple(yv) if parts else yv[0])
            fs = tuple(f) if parts else (f,)
            live = [(o, -a) for o, a in zip(fs, adj) if o.requires_grad]
            wrt = [tv] + yv + list(params)
            vjps = (torch.autograd.grad([o for o, _ in live], wrt, [a for _, a in live], allow_unused=True)
                    if live else [None] * len(wrt))
        vjps = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, vjps)]
        return (vjps[0],) + tuple(o.detach() for o in fs) + tuple(vjps[1:])

    wide = torch.promote_types(times.dtype, ydt[0])
    for p in params:
        wide = torch.promote_types(wide, p.dtype)
    times = times.to(wide)  # times at least as precise as the widest part (odeint's rule for its state)
    host = times.tolist()  # (one read, before the sweep: which intervals have length)
    n = times.shape[0]
    state = ([torch.zeros((), dtype=sols[0].dtype, device=sols[0].device)] + [s[-1] for s in sols]
             + [g[-1] for g in grads] + [torch.zeros_like(p) for p in params])
    t_vjps = [None] * n

    def output_time_vjp(i):  # f(t_i, y_i) . dL/dy_i, the gradient of the output at t_i with respect to t_i
        f = func(times[i].to(device=sols[0].device, dtype=ydt[0]), tuple(s[i] for s in sols) if parts else sols[0][i])
        fs = tuple(f) if parts else (f,)
        return sum((o.to(g.dtype) * g[i]).sum() for o, g in zip(fs, grads)).to(state[0].dtype)
    for i in range(n - 1, 0, -1):
        if t_grad:
            t_vjps[i] = output_time_vjp(i)
            state[0] = state[0] - t_vjps[i]
        if host[i] != host[i - 1]:  # (an event at the start: an interval of no length, nothing to integrate)
            try:
                out = odeint(augmented, tuple(state), times[i - 1:i + 1].flip(0), rtol=rtol, atol=atol,
                             method=method, options=options)
            except RuntimeError as e:  # (a budget or a step-size underflow: say which solve it was)
                raise RuntimeError(f"odeint_adjoint, backward pass from t={host[i]!r} to t={host[i - 1]!r} "
                                   f"(adjoint_rtol / adjoint_atol / adjoint_options): {e}") from e
            state = [o[1] for o in out]
        state[1:1 + k] = [s[i - 1] for s in sols]  # restart from the forward solution there
        state[1 + k:1 + 2 * k] = [a + g[i - 1] for a, g in zip(state[1 + k:1 + 2 * k], grads)]
    if not t_grad:
        return state[1 + k:1 + 2 * k], state[1 + 2 * k:], None
    t_vjps[0] = state[0]
    return state[1 + k:1 + 2 * k], state[1 + 2 * k:], torch.stack(t_vjps).to(times.device)  # (t's device: host
    # times beside a CUDA state are allowed)
