"""pytest-benchmark suite: ``pytest benchmarks`` (install with ``pip install -e ".[bench]"``).

Compare contenders of one group in the same run: ``pytest benchmarks --benchmark-group-by=group``.
"""
import pytest
import torch

import peers

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def ou():
    return peers.ou_problem()


@pytest.mark.benchmark(group="ou-em-10k-paths-1k-steps")
@pytest.mark.parametrize("who", ["flowsde", "hand_loop_generic", "hand_loop", "torchsde"])
def test_ou_euler_maruyama(benchmark, ou, who):
    fn = {"flowsde": peers.ou_flowsde, "hand_loop_generic": peers.ou_hand_loop_generic,
          "hand_loop": peers.ou_hand_loop, "torchsde": peers.ou_torchsde}[who]
    rounds = 2 if who == "torchsde" else 5
    ys = benchmark.pedantic(fn, args=ou, rounds=rounds, warmup_rounds=1)
    assert ys.shape == (2, 10_000, 1)


@pytest.fixture(scope="module")
def mlp():
    return peers.mlp_problem()


@pytest.mark.benchmark(group="rk4-mlp-4096-50-steps")
@pytest.mark.parametrize("who", ["flowsde", "torchdiffeq"])
def test_rk4_mlp(benchmark, mlp, who):
    fn = {"flowsde": peers.mlp_flowsde, "torchdiffeq": peers.mlp_torchdiffeq}[who]
    ys = benchmark.pedantic(fn, args=mlp, rounds=5, warmup_rounds=1)
    assert ys.shape == (51, 4096, 2)


@pytest.mark.benchmark(group="odeint-adjoint-dopri5-mlp-1024")
@pytest.mark.parametrize("who", ["flowsde", "torchdiffeq"])
def test_odeint_adjoint(benchmark, who):
    field, y0, t = peers.adjoint_ode_problem()
    lib = {"flowsde": peers.flowsde, "torchdiffeq": peers.torchdiffeq}[who]
    grads = benchmark.pedantic(peers.adjoint_ode, args=(lib, field, y0, t), rounds=3, warmup_rounds=1)
    assert grads[0].shape == y0.shape


@pytest.mark.benchmark(group="sdeint-adjoint-stratonovich-256")
@pytest.mark.parametrize("who", ["flowsde", "torchsde"])
def test_sdeint_adjoint(benchmark, who):
    sde, y0, ts = peers.adjoint_sde_problem()
    lib = {"flowsde": peers.flowsde, "torchsde": peers.torchsde}[who]
    grads = benchmark.pedantic(peers.adjoint_sde, args=(lib, sde, y0, ts), rounds=3, warmup_rounds=1)
    assert grads[0].shape == y0.shape


@pytest.mark.benchmark(group="sdeint-adjoint-reversible-heun-256")
@pytest.mark.parametrize("who", ["flowsde", "torchsde"])
def test_sdeint_adjoint_reversible_heun(benchmark, who):
    sde, y0, ts = peers.adjoint_sde_problem()
    lib = {"flowsde": peers.flowsde, "torchsde": peers.torchsde}[who]
    grads = benchmark.pedantic(peers.adjoint_sde, args=(lib, sde, y0, ts), kwargs=dict(method="reversible_heun"),
                               rounds=3, warmup_rounds=1)
    assert grads[0].shape == y0.shape
