"""benchmarks/gpu_kernels.py's CUDA-run sections on CPU tensors (Triton's interpreter), at tiny sizes: the
end-to-end, OU-trajectory, adaptive-SDE and launch-overhead measurements, and ``main``'s report and its
JSON (written after each section, so a run cut short keeps its figures). A broken attribute or signature
in these functions would otherwise only show on a lent GPU."""
import importlib.util
import json
import math
import pathlib

import pytest
import torch

from flowsde import kernels

pytest.importorskip("triton")
pytest.importorskip("torchsde")
pytest.importorskip("torchdiffeq")
pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")

PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"
E2E_ROWS = ["flowsde.sample, backend=triton", "flowsde.sample, backend=torch (auto at this size)",
            "flowsde.sample, cuda_graph=True (triton)", "hand-written loop", "torchdiffeq.odeint",
            "flowsde.odeint"]


def _positive(t):
    return isinstance(t, float) and math.isfinite(t) and t > 0


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("gpu_kernels_script", PATH)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


@pytest.fixture(scope="module")
def measured(mod):
    """Each section once on CPU tensors at tiny sizes (shared by the tests below)."""
    return {
        "launch_overhead": mod.launch_overhead(reps=2, device="cpu"),
        "end_to_end": mod.end_to_end(B=64, steps=3, reps=1, device="cpu"),
        "ou_trajectory": mod.ou_trajectory(B=64, N=10, device="cpu"),
        "adaptive_sde": mod.adaptive_sde(B=16, rtol=0.3, device="cpu", reps=1),
    }


def test_wall_clock_timer_off_cuda(mod):
    calls = []
    t = mod._time(lambda: calls.append(1), reps=3, calls=2, device="cpu")
    assert len(calls) == 1 + 3 * 2 and t >= 0 and math.isfinite(t)


def test_launch_overhead(measured):
    out = measured["launch_overhead"]
    assert list(out) == ["triton combine (2 terms)", "triton combine, Triton's own launch path",
                         "torch.add(y, k, alpha=0.1)"]
    assert all(_positive(t) for t in out.values())


def test_end_to_end(measured):
    out = measured["end_to_end"]
    assert list(out) == [f"{m}: {row}" for m in ("euler", "rk4") for row in E2E_ROWS]
    for name, t in out.items():
        if "cuda_graph" in name:
            assert math.isnan(t)  # no graph to capture off CUDA: reported absent, not a crash
        else:
            assert _positive(t), name


def test_ou_trajectory_against_torchsde(measured):
    t, vs = measured["ou_trajectory"]
    assert _positive(t) and _positive(vs)


def test_adaptive_sde(measured):
    out = measured["adaptive_sde"]
    assert list(out) == ["flowsde_s", "torchsde_s", "query_kernel_s", "query_torch_s"]
    assert all(_positive(t) for t in out.values())


@pytest.fixture(scope="module")
def sections(mod, measured):
    """What ``main``'s sections return, measured once on CPU tensors at tiny sizes."""
    return dict(measured, check_kernels=mod.check_kernels("cpu", n=1 << 7),
                bandwidth=mod.bandwidth(n=1 << 10, reps=1, device="cpu", compile=False),
                backward=mod.backward(n=1 << 10, reps=1, device="cpu"))


def _fake_cuda_main(mod, monkeypatch, sections, fail_at=None):
    """``main``'s CUDA branch with CUDA stood in for: each section returns its CPU measurement; ``fail_at``
    names a section that raises instead (as a run killed there). Returns the list of (section, device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    calls = []

    def stand_in(name):
        def run(*args, device="cuda", **kw):
            calls.append((name, device))
            if name == fail_at:
                raise RuntimeError(f"{name} cut short")
            return sections[name]
        return run
    for name in ("check_kernels", "bandwidth", "backward", "launch_overhead", "end_to_end", "ou_trajectory",
                 "adaptive_sde"):
        monkeypatch.setattr(mod, name, stand_in(name))
    return calls


def test_main_report_and_json(mod, sections, monkeypatch, tmp_path, capsys):
    calls = _fake_cuda_main(mod, monkeypatch, sections)
    out = tmp_path / "gpu.json"
    assert mod.main(["--quick", "--json", str(out)]) == 0
    assert calls == [(name, "cuda") for name in ("check_kernels", "bandwidth", "backward", "launch_overhead",
                                                 "end_to_end", "ou_trajectory", "adaptive_sde")]  # adaptive last
    res = json.loads(out.read_text())
    assert res["complete"] is True and res["device"] == "stand-in GPU"
    assert {"checks", "copy_GBps", "step_kernels", "backward", "launch_overhead_s", "end_to_end_s",
            "ou_trajectory", "adaptive_sde"} <= set(res)
    assert [name for name, _ in res["checks"]] == [name for name, _ in sections["check_kernels"]]
    text = capsys.readouterr().out
    assert "## stand-in GPU" in text and "| kernel check (float64) |" in text
    assert "| step kernel (device time) |" in text and "| under autograd (device time) |" in text
    assert "| host time to enqueue one small update | µs |" in text
    assert "| sampling, MLP 2-64-64-2, B=65,536, 20 steps |" in text
    assert "OU whole trajectory, B=100,000, N=1000:" in text and "Adaptive EM on GBM (rtol 1e-3):" in text
    assert not (tmp_path / "gpu.json.tmp").exists()


@pytest.mark.parametrize("fail_at", ["end_to_end", "adaptive_sde"])
def test_main_keeps_the_sections_before_a_cut(mod, sections, monkeypatch, tmp_path, fail_at):
    """A run killed in a section (the session's time limit) leaves the JSON of every section before it."""
    _fake_cuda_main(mod, monkeypatch, sections, fail_at=fail_at)
    out = tmp_path / "gpu.json"
    with pytest.raises(RuntimeError, match="cut short"):
        mod.main(["--quick", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"] is False
    assert {"checks", "step_kernels", "backward", "launch_overhead_s"} <= set(res)
    if fail_at == "adaptive_sde":
        assert {"end_to_end_s", "ou_trajectory"} <= set(res) and "adaptive_sde" not in res
    else:
        assert "end_to_end_s" not in res and "ou_trajectory" not in res
