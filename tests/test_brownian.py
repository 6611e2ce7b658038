"""GridBrownian: reproducible, order-independent, additive across grid steps, with the right law."""
import math

import numpy as np
import pytest
import torch
import torchsde

import flowsde
from flowsde.brownian import GridBrownian, VirtualBrownianTree, step_key, step_keys


def test_increments_are_keyed_by_seed_and_step():
    a = GridBrownian(t0=0.0, t1=1.0, steps=16, shape=(5, 3), seed=7, dtype=torch.float64)
    b = GridBrownian(t0=0.0, t1=1.0, steps=16, shape=(5, 3), seed=7, dtype=torch.float64)
    c = GridBrownian(t0=0.0, t1=1.0, steps=16, shape=(5, 3), seed=8, dtype=torch.float64)
    backwards = [b.step(k) for k in reversed(range(16))][::-1]  # asked in another order: same values
    for k in range(16):
        assert torch.equal(a.step(k), backwards[k])
        assert not torch.equal(a.step(k), c.step(k))
    assert step_keys(7, 16) == [step_key(7, k) for k in range(16)]


def test_queries_over_several_steps_sum_the_fine_increments():
    bm = GridBrownian(t0=0.0, t1=2.0, steps=64, shape=(4, 2), seed=1, dtype=torch.float64)
    w = bm.path()
    assert w.shape == (65, 4, 2) and torch.equal(w[0], torch.zeros(4, 2, dtype=torch.float64))
    for ia, ib in [(0, 64), (3, 17), (16, 48), (63, 64)]:
        ta, tb = float(bm.grid[ia]), float(bm.grid[ib])
        assert torch.allclose(bm(ta, tb), w[ib] - w[ia], atol=1e-12, rtol=0)
    assert torch.allclose(bm(1.0), w[32], atol=1e-12, rtol=0)  # bm(t) = W(t) - W(t0)
    # coarse grid times computed another way still match the grid within the tolerance
    assert torch.allclose(bm(0.0, 3 * (2.0 / 8)), w[24], atol=1e-12, rtol=0)


def test_off_grid_and_reversed_queries_are_refused():
    bm = GridBrownian(t0=0.0, t1=1.0, steps=10, shape=(2,), seed=0)
    with pytest.raises(ValueError, match="not a point of this GridBrownian's grid"):
        bm(0.0, 0.55)
    with pytest.raises(ValueError, match="ta < tb"):
        bm(0.5, 0.2)
    with pytest.raises(ValueError, match="strictly increasing"):
        GridBrownian(grid=[0.0, 0.5, 0.5, 1.0], shape=(2,))
    with pytest.raises(ValueError, match="needs either grid"):
        GridBrownian(shape=(2,))


def test_increments_have_the_brownian_law():
    n, B = 8, 50000
    bm = GridBrownian(grid=np.linspace(0.0, 2.0, n + 1) ** 1.5, shape=(B,), seed=3, dtype=torch.float64)
    h = np.diff(bm.grid)
    incs = torch.stack([bm.step(k) for k in range(n)])
    for k in range(n):
        se = math.sqrt(h[k] / B)
        assert abs(float(incs[k].mean())) < 5 * se
        assert abs(float(incs[k].var()) / h[k] - 1.0) < 5 * math.sqrt(2.0 / B)
    corr = np.corrcoef(incs.numpy())  # independent increments
    assert np.abs(corr - np.eye(n)).max() < 5 / math.sqrt(B)


def test_default_brownian_equals_an_explicit_one_on_the_same_grid():
    sde = flowsde.problems.GeometricBrownianMotion()
    y0 = torch.ones(6, 2, dtype=torch.float64)
    ts = torch.linspace(0, 1, 3, dtype=torch.float64)
    a = flowsde.sdeint(sde, y0, ts, dt=1 / 8, seed=11)
    bm = GridBrownian(t0=0.0, t1=1.0, steps=8, shape=(6, 2), seed=11, dtype=torch.float64)
    b = flowsde.sdeint(sde, y0, ts, dt=1 / 8, bm=bm)
    assert torch.equal(a, b)
    c = flowsde.sdeint(sde, y0, ts, dt=1 / 8, bm=torchsde.BrownianInterval(0.0, 1.0, size=(6, 2),
                                                                          dtype=torch.float64, entropy=0))
    assert not torch.equal(a, c)


def test_virtual_tree_is_consistent_whatever_the_query_order():
    from flowsde.brownian import VirtualBrownianTree
    times = [0.3, 0.71, 0.05, 0.5, 0.999, 0.3, 0.123456]
    a = VirtualBrownianTree(0.0, 1.0, shape=(4, 3), seed=2, dtype=torch.float64)
    first = {t: a.value(t) for t in times}
    b = VirtualBrownianTree(0.0, 1.0, shape=(4, 3), seed=2, dtype=torch.float64)
    for t in reversed(times):
        assert torch.equal(b.value(t), first[t])
    assert torch.equal(a.value(0.3), first[0.3])
    assert torch.allclose(a(0.05, 0.71), a(0.05, 0.3) + a(0.3, 0.71), atol=1e-14, rtol=0)
    assert torch.equal(a(1.0), a.value(1.0)) and float(a.value(0.0).abs().max()) == 0.0
    c = VirtualBrownianTree(0.0, 1.0, shape=(4, 3), seed=3, dtype=torch.float64)
    assert not torch.equal(c.value(0.5), first[0.5])
    with pytest.raises(ValueError, match="outside"):
        a.value(1.5)


def test_virtual_tree_has_the_brownian_law():
    from scipy import stats

    from flowsde.brownian import VirtualBrownianTree
    B = 40000
    bm = VirtualBrownianTree(0.0, 2.0, shape=(B,), seed=5, dtype=torch.float64)
    s, t, u = 0.37, 1.1, 1.73
    ws, wt, wu = bm.value(s), bm.value(t), bm.value(u)
    for w, var in [(ws, s), (wt, t), (wt - ws, t - s), (wu - wt, u - t)]:
        assert abs(float(w.mean())) < 5 * math.sqrt(var / B)
        assert abs(float(w.var()) / var - 1) < 5 * math.sqrt(2 / B)
    assert stats.kstest((wu - wt).numpy() / math.sqrt(u - t), "norm").pvalue > 1e-3
    cov = float(((ws - ws.mean()) * (wt - wt.mean())).mean())       # Cov(W_s, W_t) = min(s, t)
    assert abs(cov - s) < 5 * math.sqrt(s * t / B)
    inc_corr = float(torch.corrcoef(torch.stack([ws, wu - wt]))[0, 1])   # independent increments
    assert abs(inc_corr) < 5 / math.sqrt(B)
    # the bridge: given W(0) and W(2), W(1) has mean W(2)/2 and variance 1/2
    resid = bm.value(1.0) - 0.5 * bm.value(2.0)
    assert abs(float(resid.var()) - 0.5) < 5 * 0.5 * math.sqrt(2 / B)


def test_virtual_tree_as_sdeint_brownian_motion():
    from flowsde.brownian import VirtualBrownianTree
    from flowsde.problems import GeometricBrownianMotion
    sde = GeometricBrownianMotion()
    y0 = torch.ones(200, 1, dtype=torch.float64)
    bm = VirtualBrownianTree(0.0, 1.0, shape=(200, 1), seed=1, dtype=torch.float64)
    ys = flowsde.sdeint(sde, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), bm=bm, method="milstein", dt=1 / 512)
    exact = sde.exact(y0, 1.0, bm.value(1.0))
    assert float((ys[-1] - exact).abs().mean()) < 0.01
    b = torchsde.sdeint(sde, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), bm=bm, method="milstein",
                        dt=1 / 512)
    assert float((ys[-1] - b[-1].detach()).abs().max()) < 1e-10


def test_virtual_tree_device_queries_equal_host_queries_per_row():
    """``at`` (device times, one per row, any subset of rows) gives the values ``value`` gives at host times;
    a row's path does not depend on the batch size; ``dyadic_path`` equals the queries at dyadic times."""
    from flowsde.brownian import VirtualBrownianTree
    bm = VirtualBrownianTree(0.5, 2.5, shape=(6, 2, 3), seed=4, dtype=torch.float64)
    times = torch.tensor([0.5, 0.61, 1.5, 2.4999, 2.5, 0.9], dtype=torch.float64)
    got = bm.at(times)
    assert got.shape == (6, 2, 3)
    for r, t in enumerate(times.tolist()):
        assert torch.allclose(got[r], bm.value(t)[r], rtol=0, atol=1e-14)
    assert float(got[0].abs().max()) == 0.0 and torch.equal(got[4], bm.value(2.5)[4])
    rows = torch.tensor([5, 1, 3])
    assert torch.allclose(bm.at(times[rows], rows), got[rows], rtol=0, atol=1e-14)
    assert torch.equal(bm.at(torch.tensor(1.7, dtype=torch.float64)), bm.value(1.7))
    small = VirtualBrownianTree(0.5, 2.5, shape=(2, 2, 3), seed=4, dtype=torch.float64)
    assert torch.allclose(small.value(1.3), bm.value(1.3)[:2], rtol=0, atol=1e-14)
    path = bm.dyadic_path(5)
    grid = np.linspace(0.5, 2.5, 33)
    assert path.shape == (33, 6, 2, 3)
    assert float((path - torch.stack([bm.value(t) for t in grid])).abs().max()) < 1e-14
    with pytest.raises(ValueError, match="level"):
        bm.dyadic_path(bm.depth + 1)
    with pytest.raises(ValueError, match="query times"):
        bm.at(times[:4])


def test_virtual_tree_per_row_times_have_the_brownian_law():
    """Each row asked at its own time: W(t_r) / sqrt(t_r) is standard normal, and the bridge inside a
    leaf-scale interval is right (increments over short spans have variance of their length)."""
    from scipy import stats

    from flowsde.brownian import VirtualBrownianTree
    B = 20000
    bm = VirtualBrownianTree(0.0, 1.0, shape=(B,), seed=8, dtype=torch.float64)
    t = torch.rand(B, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.98 + 0.01
    z = bm.at(t) / t.sqrt()
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    h = 1e-4  # a short increment per row, at a random place: N(0, h)
    inc = (bm.at(t + h) - bm.at(t)) / math.sqrt(h)
    assert stats.kstest(inc.numpy(), "norm").pvalue > 1e-3
    assert abs(float(torch.corrcoef(torch.stack([z, inc]))[0, 1])) < 5 / math.sqrt(B)


def test_sampled_dyadic_path_drives_a_fixed_step_solve_as_the_tree_does():
    from flowsde.brownian import SampledPath, VirtualBrownianTree
    from flowsde.problems import GeometricBrownianMotion
    sde = GeometricBrownianMotion()
    y0 = torch.ones(16, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    bm = VirtualBrownianTree(0.0, 1.0, shape=(16, 1), seed=1, dtype=torch.float64)
    fine = SampledPath(np.linspace(0.0, 1.0, 2 ** 6 + 1), bm.dyadic_path(6))
    a = flowsde.sdeint(sde, y0, ts, bm=bm, dt=2.0 ** -6, method="milstein")
    b = flowsde.sdeint(sde, y0, ts, bm=fine, dt=2.0 ** -6, method="milstein")
    assert float((a - b).abs().max()) < 1e-12


def test_slivers_offsets_and_shapes_of_grid_brownian_motions():
    """Review cases: two times within the grid tolerance of one grid time give no increment (torchsde's
    solvers end on such slivers); a philox motion that is rows row_start.. of a larger batch drives sdeint
    with those rows, on its own grid too; a philox motion of the wrong shape is refused."""
    import torchsde

    import flowsde
    from flowsde.problems import BrownianMotionProblem
    bm = GridBrownian(t0=0.0, t1=1.0, steps=10, shape=(3,), seed=0, dtype=torch.float64)
    assert torch.equal(bm(0.5, 0.5 + 1e-12), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(bm(0.0), torch.zeros(3, dtype=torch.float64))  # bm(t0): W(t0) - W(t0)
    sde, y0 = BrownianMotionProblem(1.0), torch.zeros(4, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for steps, t1 in ((20, 2.0), (10, 1.0)):  # torchsde's dt = 0.1 sums to 0.9999999999999999, then a sliver
        bm = GridBrownian(t0=0.0, t1=t1, steps=steps, shape=(4, 1), seed=0, dtype=torch.float64)
        assert torch.allclose(torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=0.1)[-1], bm(0.0, 1.0),
                              atol=1e-12)
    full = GridBrownian(t0=0.0, t1=1.0, steps=8, shape=(8, 1), seed=3, dtype=torch.float64, stream="philox")
    part = GridBrownian(t0=0.0, t1=1.0, steps=8, shape=(4, 1), seed=3, dtype=torch.float64, stream="philox",
                        row_start=4)
    for dt in (1 / 8, 1 / 4):  # on the motion's own grid, and on a coarser one
        x = flowsde.sdeint(sde, y0, ts, bm=part, dt=dt)[-1]
        assert torch.allclose(x, full(0.0, 1.0)[4:], atol=1e-12)
    small = GridBrownian(t0=0.0, t1=1.0, steps=8, shape=(2, 1), seed=3, dtype=torch.float64, stream="philox")
    with pytest.raises(ValueError, match=r"bm \(Brownian increment\) returned shape \(2, 1\), expected \(4, 1\)"):
        flowsde.sdeint(sde, y0, ts, bm=small, dt=1 / 8)


def test_fixed_steps_below_the_trees_leaves_warn():
    """Inside a leaf the tree is linear: increments of steps shorter than a leaf have too little variance
    (a 1e-7 step on a [0, 1] tree: Var/dt ~ 0.1), so sdeint warns."""
    import warnings
    from flowsde.problems import OrnsteinUhlenbeck
    y0, ts = torch.ones(4, 1, dtype=torch.float64), torch.tensor([0.0, 1e-3], dtype=torch.float64)
    bm = flowsde.VirtualBrownianTree(0.0, 1e-3, (4, 1), seed=0, tol=2.5e-4, dtype=torch.float64)  # 4 leaves
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flowsde.sdeint(OrnsteinUhlenbeck(), y0, ts, bm=bm, dt=2.5e-4)  # a leaf per step: silent
    with pytest.warns(UserWarning, match="below the VirtualBrownianTree's resolution"):
        flowsde.sdeint(OrnsteinUhlenbeck(), y0, ts, bm=bm, dt=1.25e-4)


def test_tree_refuses_queries_outside_a_short_or_distant_interval():
    """The float32-rounding slack at the ends is at most a thousandth of the interval (it was absolute:
    on [0, 1e-7] a query at 1e-6 returned a zero increment, silently; torchsde warns)."""
    for t0, t1, far in ((0.0, 1e-7, 1e-6), (1000.0, 1000.001, 1000.0019)):
        bm = VirtualBrownianTree(t0, t1, shape=(2,), seed=0, dtype=torch.float64)
        with pytest.raises(ValueError, match="outside the tree's interval"):
            bm(t1, far)
    bm = VirtualBrownianTree(0.0, 0.1, shape=(2,), seed=0)
    assert torch.equal(bm(torch.tensor(0.1)), bm(0.1))  # float32 0.1 (0.10000000149) is still the end


def test_grid_motions_take_torchsdes_float32_step_times():
    """torchsde steps a float32 state with float32 times t + dt (0.01 is 0.0099999998, and the rounding
    accumulates): a GridBrownian / SampledPath takes them as their grid times, so torchsde.sdeint on them
    gives flowsde.sdeint's solution to float32 rounding; float64 queries stay strict."""
    from flowsde.brownian import SampledPath
    from flowsde.problems import OrnsteinUhlenbeck
    sde, y0, ts = OrnsteinUhlenbeck(), torch.ones(8, 2), torch.tensor([0.0, 1.0])
    for n in (100, 1000):
        grid_bm = GridBrownian(t0=0.0, t1=1.0, steps=n, shape=(8, 2), seed=0)
        for bm in (grid_bm, SampledPath(grid_bm.grid, grid_bm.path())):
            theirs = torchsde.sdeint(sde, y0, ts, bm=bm, dt=1.0 / n, method="euler")
            ours = flowsde.sdeint(sde, y0, ts, bm=bm, dt=1.0 / n)
            assert float((theirs - ours).abs().max()) < 1e-4
    bm = GridBrownian(t0=0.0, t1=1.0, steps=100, shape=(2,), seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="not a point"):
        bm(0.0, 0.01 + 1e-6)
    with pytest.raises(ValueError, match="not a point"):
        bm(torch.tensor(0.0), torch.tensor(0.013))  # a float32 time a third of a step off: still refused


def test_float32_ts_on_a_grid_motion_snap_to_its_grid_in_flowsde_sdeint():
    """float32 ts whose ends are not float32-exact (0.1 is 0.10000000149) on a GridBrownian / SampledPath:
    flowsde.sdeint takes them as the grid times within float32 rounding (it refused them; torchsde ran)."""
    from flowsde.brownian import SampledPath
    from flowsde.problems import OrnsteinUhlenbeck
    ts = torch.tensor([0.1, 0.6, 1.1])
    bm = GridBrownian(t0=0.1, t1=1.1, steps=100, shape=(5, 2), seed=2)
    want = torchsde.sdeint(OrnsteinUhlenbeck(), torch.ones(5, 2), ts, bm=bm, method="euler", dt=0.01)
    for motion in (bm, SampledPath(bm.grid, bm.path())):
        got = flowsde.sdeint(OrnsteinUhlenbeck(), torch.ones(5, 2), ts, bm=motion, method="euler", dt=0.01)
        assert float((got - want).abs().max()) < 1e-5
