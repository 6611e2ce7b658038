"""The step ops against their plain formulas, and backend selection."""
import pytest
import torch

from flowsde import kernels
from flowsde.kernels import reference


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(7, 3), (2, 3, 4, 4)])
def test_lincomb_and_noise_updates(shape):
    y, a, b, g, z = randn(*shape), randn(*shape), randn(*shape), randn(*shape), randn(*shape)
    assert torch.allclose(reference.lincomb(y, [(0.3, a), (0.0, b), (-1.5, b)]), y + 0.3 * a - 1.5 * b)
    out = reference.lincomb(y, [])
    assert torch.equal(out, y) and out.data_ptr() != y.data_ptr()
    got = reference.sde_update(y, [(0.1, a)], [(0.5, g), (0.25, b)], z, "diagonal")
    assert torch.allclose(got, y + 0.1 * a + 0.5 * g * z + 0.25 * b * z)
    gs, zs = randn(*shape, 1), randn(shape[0], 1)
    got = reference.sde_update(y, [(0.1, a), (0.2, b)], [(2.0, gs)], zs, "scalar")
    bz = zs.reshape(shape[0], *([1] * (len(shape) - 1)))
    assert torch.allclose(got, y + 0.1 * a + 0.2 * b + 2.0 * gs[..., 0] * bz)


def test_general_noise_product_and_interpolation():
    g, dw, y0, y1, f0, f1 = randn(5, 3, 2), randn(5, 2), randn(5, 3), randn(5, 3), randn(5, 3), randn(5, 3)
    assert torch.allclose(reference.noise_prod(g, dw, "general"), torch.einsum("bdm,bm->bd", g, dw))
    assert torch.allclose(reference.lerp(y0, y1, 0.25), 0.75 * y0 + 0.25 * y1)
    h = reference.hermite(y0, f0, y1, f1, 0.0, 0.3)
    assert torch.allclose(h, y0) and torch.allclose(reference.hermite(y0, f0, y1, f1, 1.0, 0.3), y1)


def test_inputs_untouched():
    y, a, g, z = randn(4, 2), randn(4, 2), randn(4, 2), randn(4, 2)
    copies = [t.clone() for t in (y, a, g, z)]
    reference.sde_update(y, [(0.1, a)], [(1.0, g)], z, "diagonal")
    reference.lincomb(y, [(0.5, a)])
    assert all(torch.equal(u, v) for u, v in zip((y, a, g, z), copies))


def test_backend_resolution(monkeypatch):
    assert kernels.resolve_backend(None) == "torch"            # auto on CPU tensors: PyTorch
    assert kernels.resolve_backend("torch") == "torch"
    monkeypatch.setenv("FLOWSDE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.resolve_backend(None)
    assert kernels.resolve_backend("auto") == "torch"          # the per-call option wins over the variable
    monkeypatch.setenv("FLOWSDE_BACKEND", "triton")
    assert kernels.resolve_backend(None, "cpu") == "triton"    # interpreter on (set by conftest)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.resolve_backend(None, "cpu")
    assert kernels.resolve_backend("torch", "cpu") == "torch"


def test_auto_backend_follows_the_size_of_the_state_on_cuda():
    """auto: Triton on CUDA for large states or captured loops (launch cost hidden), PyTorch for small ones."""
    big, small = kernels.AUTO_TRITON_MIN_NUMEL, kernels.AUTO_TRITON_MIN_NUMEL - 1
    want = "triton" if kernels.HAS_TRITON else "torch"
    assert kernels.resolve_backend("auto", "cuda", numel=big) == want
    assert kernels.resolve_backend("auto", "cuda") == want                 # size unknown: large
    assert kernels.resolve_backend("auto", "cuda", numel=small) == "torch"
    assert kernels.resolve_backend("auto", "cuda", numel=small, captured=True) == want
    assert kernels.resolve_backend("auto", "cpu", numel=big) == "torch"
    assert kernels.resolve_backend("triton", "cpu", numel=small) == "triton"  # an explicit choice wins
