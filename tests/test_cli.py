"""The command line and the studies behind it: `flowsde` / `flowsde converge` report the theoretical
orders on every problem and write JSON and a PNG; `flowsde bench` puts flowsde beside its peers; a study
sharded over two gloo processes gives the one-process table."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from flowsde import SDE_METHODS
from flowsde.cli import main
from flowsde.studies import PROBLEMS, convergence, fit_order_ci, methods_for

PNG = b"\x89PNG\r\n\x1a\n"


def test_default_command_prints_every_method_with_orders_near_theory(capsys, tmp_path):
    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    for name in ["euler", "midpoint", "heun", "heun3", "rk4", "rk4_classic", "milstein"]:
        assert re.search(rf"^\s*{name}\s", out, re.M), name
    for m in set(SDE_METHODS) - {"euler_maruyama"}:
        assert re.search(rf"^\s*{m}\s+strong\s+ou", out, re.M), m


@pytest.mark.parametrize("problem", PROBLEMS)
def test_converge_reports_the_theoretical_orders_with_json_and_png(problem, tmp_path, capsys):
    js, png = tmp_path / "c.json", tmp_path / "c.png"
    assert main(["converge", "--problem", problem, "--quick", "--json", str(js), "--plot", str(png)]) == 0
    data = json.loads(js.read_text())
    assert data["problem"] == problem and data["world_size"] == 1
    studied = {(s["method"], s["kind"]) for s in data["studies"]}
    assert {m for m, _ in studied} >= set(methods_for(problem))
    for s in data["studies"]:
        assert abs(s["order"] - s["expected"]) <= 0.12, s
        lo, hi = s["order_ci"]
        assert lo <= s["order"] <= hi
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000


def test_one_method_and_errors(capsys):
    assert main(["converge", "--problem", "gbm", "--method", "milstein", "--quick"]) == 0
    assert "milstein" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["converge", "--problem", "gbm", "--method", "rk4"])
    with pytest.raises(ValueError, match="divide n_fine"):
        convergence("ou", "euler", steps=[3, 6], paths=50)
    with pytest.raises(ValueError, match="unknown problem"):
        convergence("vdp", "euler")
    with pytest.raises(ValueError, match="weak studies run Euler"):
        convergence("ou", "milstein", kind="weak", paths=50)


def test_fit_order_confidence_interval():
    hs = np.array([0.1, 0.05, 0.025, 0.0125])
    rng = np.random.default_rng(0)
    errs = 3.0 * hs ** 2 * np.exp(0.02 * rng.standard_normal(4))
    order, lo, hi = fit_order_ci(hs, errs)
    assert lo < 2.0 < hi and hi - lo < 0.2 and abs(order - 2) < 0.05
    assert np.isnan(fit_order_ci(hs[:2], errs[:2])[1])
    with pytest.raises(ValueError, match="two distinct step sizes"):  # (a slope of equal abscissae: none)
        fit_order_ci([0.1, 0.1], [0.01, 0.02])
    with pytest.raises(ValueError, match="distinct"):
        convergence("ou", "euler", steps=[8, 8, 8], paths=50)


def test_bench_times_after_one_untimed_call():
    from flowsde.bench import _timed
    calls = []
    out, sec = _timed(lambda: calls.append(len(calls)) or len(calls), 3)
    assert len(calls) == 4 and out == 4 and sec >= 0


def test_bench_quick_puts_flowsde_beside_its_peers(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", "--quick", "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(js.read_text())["rows"]
    libs = {r["library"] for r in rows}
    assert {"flowsde", "torchdiffeq", "torchsde", "hand loop"} <= libs
    pytest.importorskip("diffusers")
    assert "diffusers" in libs
    assert {r["method"] for r in rows if r["library"] == "diffusers"} >= {
        "FlowMatchEuler", "FlowMatchHeun", "DDIM", "Euler", "Heun", "DPM-Solver++ 2M", "UniPC"}
    for prob in ("mixture (sampling)", "mixture VP (sampling)"):
        for nfe in (10, 20, 50):
            assert f"Most accurate on {prob} at NFE {nfe}: " in out
    # same numbers: flowsde's and torchdiffeq's RK4 agree; flowsde's and torchsde's EM agree (same path)
    by = {(r["problem"], r["library"], r["method"], r["setting"]): r["error"] for r in rows}
    for (p, lib, m, st), e in by.items():
        if lib == "flowsde" and (p, "torchdiffeq", m, st) in by:
            assert e == pytest.approx(by[(p, "torchdiffeq", m, st)], rel=1e-6)
        if lib == "flowsde" and (p, "torchsde", m, st) in by:
            assert e == pytest.approx(by[(p, "torchsde", m, st)], rel=1e-6)
    for r in rows:  # evaluation counts are per solve (the untimed warm-up call not among them)
        if r["problem"] == "linear (ODE)" and r["method"] == "rk4":
            assert r["nfe"] == 4 * int(r["setting"].split()[0]), r
        if r["problem"] == "ou (SDE)":
            assert r["nfe"] == int(r["setting"].split()[0]), r
    assert png.read_bytes()[:8] == PNG


def test_two_gloo_processes_give_the_one_process_table(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = ["-m", "flowsde", "converge", "--problem", "gbm", "--quick", "--paths", "600"]
    r1 = subprocess.run([sys.executable] + args + ["--json", str(one)], capture_output=True, text=True,
                        timeout=300, env=env)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", "29533"] + args + ["--json", str(two)],
                        capture_output=True, text=True, timeout=300, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    for sa, sb in zip(a["studies"], b["studies"]):
        assert sa["method"] == sb["method"]
        np.testing.assert_allclose(sa["errors"], sb["errors"], rtol=1e-12)
    assert r2.stdout.count("studies in") == 1  # rank 0 alone prints


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "flowsde", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "flowsde" in res.stdout


@pytest.mark.parametrize("argv,message", [
    (["converge", "--problem", "ou", "--method", "milstein", "--kind", "weak"], "no weak study of 'milstein'"),
    (["converge", "--problem", "gbm", "--kind", "weak"], "no method has a weak study on 'gbm'"),
    (["converge", "--problem", "ou", "--kind", "ode"], "is an SDE problem"),
    (["converge", "--problem", "linear", "--kind", "weak"], "is an ODE problem"),
    (["converge", "--problem", "mixture", "--paths", "100"], "--paths is for SDE problems"),
    (["converge", "--device", "foo"], "--device must be cpu or cuda"),
    (["bench", "--json", "/nonexistent/x.json"], "does not exist"),
    (["converge", "--problem", "linear", "--json", "/tmp"], "is a folder"),
    (["converge", "--plot", "figure.txt"], "a figure is written as png, pdf, svg"),
    (["converge", "--seed", str(2 ** 64)], "--seed must be an integer in [0, "),  # (aliased seed 0)
    (["bench", "--seed", "-1"], "--seed must be an integer in [0, "),
    (["converge", "--problem", "linear", "--plot", "/tmp/flowsde_cli_plotdir"], "is a folder"),  # (.png added)
])
def test_options_that_cannot_run_are_usage_errors_before_any_work(argv, message, capsys):
    os.makedirs("/tmp/flowsde_cli_plotdir.png", exist_ok=True)  # a folder where --plot's figure would go
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_weak_kind_runs_the_methods_that_have_one_and_seeds_move_every_study(tmp_path, capsys):
    assert main(["--kind", "weak", "--quick"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s*euler\s+weak", out, re.M) and not re.search(r"milstein|ode", out.split("order:")[-1])
    # an extension-less figure name gets .png, and says so
    assert main(["converge", "--problem", "ou_drift", "--quick", "--plot", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig.png").read_bytes().startswith(PNG) and "fig.png" in capsys.readouterr().out
    # the ODE studies' starting points follow the seed
    a, b, c = (convergence("mixture", "euler", (4, 8), seed=s) for s in (0, 0, 7))
    assert a.errors == b.errors and a.errors != c.errors
    with pytest.raises(ValueError, match="finite"):
        fit_order_ci([0.1, 0.05, 0.025], [float("nan"), 1.0, 2.0])
    with pytest.raises(ValueError, match="paths must be a positive int"):
        convergence("ou", "euler", (8, 16), paths=0)


def test_bench_seed_moves_the_random_inputs():
    from flowsde.bench import bench_ou
    a, b = bench_ou(quick=True, reps=1), bench_ou(quick=True, reps=1, seed=3)
    assert [r["error"] for r in a] != [r["error"] for r in b]
