import os

import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.overrides import TorchFunctionMode

torch.set_num_threads(min(2, torch.get_num_threads()))

SYNC_CALLS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"}


class SyncCounter(TorchFunctionMode):
    """Counts tensor -> host reads (the calls that synchronise with a device)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_CALLS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def sync_counter():
    return SyncCounter


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # the suite pins the backend explicitly; tests that exercise the variable set it themselves
    monkeypatch.delenv("FLOWSDE_BACKEND", raising=False)
    yield
