"""Training helpers and the learned-field problem."""
import itertools

import pytest
import torch

import flowsde
from flowsde.paths import CondOT, GaussianMixture, VPCosine, flow_matching_loss, ot_pairing, score_matching_loss
from flowsde.problems import MLPVelocity, learned_field, ring_mixture
from flowsde.studies import sliced_wasserstein

F64 = torch.float64


def test_flow_matching_loss_targets_and_minimiser():
    mix = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], [0.1, 0.2])
    path = VPCosine()
    g = torch.Generator().manual_seed(0)
    z = mix.sample(20000, generator=g)
    t = torch.rand(20000, dtype=F64, generator=g) * 0.98 + 0.01
    eps = torch.randn(20000, 2, dtype=F64, generator=g)
    exact = lambda x, tt: mix.velocity(x, tt, path)  # noqa: E731  the marginal field minimises the loss
    l0 = flow_matching_loss(exact, z, path, t=t, eps=eps)
    for shift in (0.1, -0.1):
        assert float(flow_matching_loss(lambda x, tt: exact(x, tt) + shift, z, path, t=t, eps=eps)) > float(l0)
    # the loss is the mean squared error to alpha' z + beta' eps
    m = lambda x, tt: torch.zeros_like(x)  # noqa: E731
    manual = (path.dalpha(t)[:, None] * z + path.dbeta(t)[:, None] * eps).pow(2).mean()
    assert float(flow_matching_loss(m, z, path, t=t, eps=eps)) == pytest.approx(float(manual), rel=1e-12)


def test_score_matching_parametrisations_agree():
    path = CondOT()
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(500, 3, dtype=F64, generator=g), torch.randn(500, 3, dtype=F64, generator=g)
    t = torch.rand(500, dtype=F64, generator=g) * 0.9 + 0.05
    eps_model = lambda x, tt: 0.3 * x  # noqa: E731
    score_model = lambda x, tt: -eps_model(x, tt) / path.beta(tt)[:, None]  # noqa: E731
    a = score_matching_loss(eps_model, z, path, "epsilon", t=t, eps=eps)
    b = score_matching_loss(score_model, z, path, "score", t=t, eps=eps)
    assert float(a) == pytest.approx(float(b), rel=1e-12)
    with pytest.raises(ValueError, match="parametrization"):
        score_matching_loss(eps_model, z, path, "velocity")


def test_ot_pairing_is_the_exact_assignment():
    g = torch.Generator().manual_seed(2)
    z, eps = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    perm = ot_pairing(z, eps)
    cost = lambda p: float(((z - eps[list(p)]) ** 2).sum())  # noqa: E731
    best = min(itertools.permutations(range(6)), key=cost)
    assert cost(perm.tolist()) == pytest.approx(cost(best))
    assert sorted(perm.tolist()) == list(range(6))
    loss = flow_matching_loss(lambda x, t: torch.zeros_like(x), z, ot=True, generator=g)
    assert torch.isfinite(loss)


def test_learned_field_samples_match_its_training_distribution():
    model, mix = learned_field()
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        x = flowsde.sample(model, x0, method="heun", steps=40)
        untrained = flowsde.sample(MLPVelocity(generator=torch.Generator().manual_seed(5)), x0, method="heun",
                                   steps=40)
    ref = mix.sample(4000, generator=torch.Generator().manual_seed(12)).float()
    floor = sliced_wasserstein(mix.sample(4000, generator=torch.Generator().manual_seed(13)).float(), ref)
    d = sliced_wasserstein(x, ref)
    assert d < 0.15, (d, floor)                         # measured ~0.08 against a Monte Carlo floor of ~0.02
    assert sliced_wasserstein(untrained, ref) > 0.3     # the distance tells a trained field from an untrained one
    assert model is learned_field()[0]                  # cached: trained once per process
    assert ring_mixture().K == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_data_draws_times_inside_t_range(dtype):
    """Times for half data are drawn in float32 and rounded into the range's representable part (bfloat16
    rounded 0.9999 up to 1.0, where the score target on a VP path is infinite: the loss was inf)."""
    from flowsde.paths import VPLinear
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4096, 2, generator=g).to(dtype)
    seen = []

    def model(x, t):
        seen.append(t)
        return torch.zeros_like(x)
    for _ in range(3):
        loss = flow_matching_loss(model, z, path=VPLinear(), prediction="score", t_range=(0.5, 0.9999), generator=g)
        assert torch.isfinite(loss)
    t = torch.cat(seen)
    assert t.dtype == dtype and float(t.min()) >= 0.5 and float(t.max()) <= 0.9999
    for bad in ((0.5, 0.2), (-0.1, 0.5), (0.0, 1.5)):
        with pytest.raises(ValueError, match="t_range"):
            flow_matching_loss(model, z, t_range=bad)
    with pytest.raises(ValueError, match="holds no"):
        flow_matching_loss(model, z, t_range=(0.9991, 0.9992))
