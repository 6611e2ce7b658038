"""benchmarks/gpu_session.sh, the one command a GPU session runs, runs end to end on a machine without a
GPU: the GPU tests skip, the kernel checks run in the interpreter, every part reports exit 0."""
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_session_script_runs_every_part_and_summarises(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLOWSDE_TUNE")}
    env["OUT"] = str(tmp_path)
    env["FLOWSDE_HOST_OVERHEAD_ARGS"] = "--calls 200 --rounds 1"  # (the report's layout, not its figures)
    p = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = (tmp_path / "summary.log").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["test_gpu", "host_overhead", "gpu_kernels"]
    assert all(": exit 0 in" in line for line in summary), summary
    assert "max abs error" in (tmp_path / "gpu_kernels.log").read_text()
    assert "skipped" in (tmp_path / "test_gpu.log").read_text()
    assert "| Euler update (2 terms) |" in (tmp_path / "host_overhead.log").read_text()
