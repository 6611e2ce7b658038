"""The default job: a convergence table of every method on the OU problem."""
import re
import subprocess
import sys

from flowsde import ODE_METHODS, SDE_METHODS
from flowsde.cli import convergence_rows, main


def test_cli_prints_every_method_with_orders_near_theory(capsys):
    assert main(["--paths", "1000"]) == 0
    out = capsys.readouterr().out
    for name in ["euler", "midpoint", "heun", "heun3", "rk4", "rk4_classic", "milstein"]:
        assert re.search(rf"^\s*{name}\s", out, re.M), name
    rows = convergence_rows("ou", paths=1000)
    assert {r.method for r in rows if r.kind == "ode"} == {"euler", "midpoint", "heun", "heun3", "rk4",
                                                          "rk4_classic"}
    assert {r.method for r in rows if r.kind != "ode"} == set(SDE_METHODS) - {"euler_maruyama"}
    assert set(ODE_METHODS) >= {r.method for r in rows if r.kind == "ode"}
    for r in rows:
        assert abs(r.order - r.expected) <= 0.15, r


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "flowsde", "--problem", "gbm", "--paths", "500"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "gbm" in res.stdout and "order" in res.stdout
