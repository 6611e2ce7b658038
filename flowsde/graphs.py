"""CUDA-graph capture of a whole sampling loop (``flowsde.sample(..., cuda_graph=True)``).

A fixed-step sampler launches the same sequence of kernels on every call: only the data changes (the
starting state, the condition, the noise keys). :class:`CapturedLoop` runs the loop twice on a side
stream (compiling the kernels and creating library handles), captures it once as a CUDA graph on static
buffers, then answers each call by copying the new inputs into those buffers and replaying the graph: one
launch from the host for the whole loop, however many steps and kernels it has.

The noise of stochastic samplers is drawn inside the kernels from per-step Philox keys that they read from
device memory (:class:`flowsde.brownian.DeviceKeys`), so a new ``seed`` is one small copy into the key
buffer, not a new capture. Captured loops are cached per (model, path and sampler settings, shapes,
dtypes, device); :func:`clear_graph_cache` frees them.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .brownian import DeviceKeys

MAX_CACHED = 8
_CACHE: "OrderedDict[tuple, CapturedLoop]" = OrderedDict()


class CapturedLoop:
    """A sampling loop captured as a CUDA graph on static input buffers.

    ``build(x, cond, uncond, noise) -> (field, run)`` prepares the loop on the static buffers (everything
    that moves data to the device happens here, before the capture); ``run(x) -> x_end`` only launches
    work. Gradients do not flow through a captured loop (it runs under ``torch.no_grad()``).
    """

    def __init__(self, build, x_init: torch.Tensor, cond=None, uncond=None, n_keys: int = 0, warmup: int = 2):
        dev = x_init.device
        self.x = x_init.detach().clone()
        self.cond = None if cond is None else cond.detach().clone()
        self.uncond = None if uncond is None else uncond.detach().clone()
        self.keys = torch.zeros(max(1, n_keys), dtype=torch.int64, device=dev)
        # the loop closes over device tensors made in build (time tables, key views): keep it alive with
        # the graph, or their memory would be freed and reused while the graph still reads it
        self.field, self.run = build(self.x, self.cond, self.uncond, DeviceKeys(self.keys))
        run = self.run

        self.device = dev
        with torch.cuda.device(dev):  # capture on the state's device, not whichever is current
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(warmup):
                    run(self.x)
            torch.cuda.current_stream(dev).wait_stream(side)
            nfe0 = self.field.nfe
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph):
                self.out = run(self.x)
        self.nfe = self.field.nfe - nfe0

    def __call__(self, x_init: torch.Tensor, cond=None, uncond=None, keys=None) -> torch.Tensor:
        """Replay on new inputs; returns a fresh tensor (the static output is copied out)."""
        with torch.cuda.device(self.device):  # replay on the stream of the device it was captured on
            self.x.copy_(x_init)
            if cond is not None:
                self.field.set_condition(cond, uncond)
            if keys is not None:
                self.keys.copy_(torch.as_tensor(keys, dtype=torch.int64))
            self.graph.replay()
            return self.out.clone()


def captured(key: tuple, refs: tuple, build, x_init, cond=None, uncond=None, n_keys: int = 0) -> CapturedLoop:
    """The cached :class:`CapturedLoop` for ``key`` (captured now if absent). ``refs`` are objects the loop
    closes over (model, path): a cached loop is reused only if they are the very same objects."""
    entry = _CACHE.get(key)
    if entry is None or len(entry.refs) != len(refs) or any(a is not b for a, b in zip(entry.refs, refs)):
        entry = CapturedLoop(build, x_init, cond, uncond, n_keys)
        entry.refs = refs
        _CACHE[key] = entry
        while len(_CACHE) > MAX_CACHED:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return entry


def clear_graph_cache() -> None:
    """Drop every captured sampling loop (and the device memory its graph holds)."""
    _CACHE.clear()
