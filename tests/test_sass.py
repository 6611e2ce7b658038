"""The compiled form of the kernels, checked without a GPU: benchmarks/sass_report.py compiles every kernel
specialisation the solvers launch for an H100 (sm_90) and disassembles it with the tools Triton ships."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

import triton

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (TOOLS / "cuobjdump").exists() or not (TOOLS / "ptxas").exists(),
                                reason="Triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")


def _run(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_step_kernels_move_their_data_in_16_byte_accesses_without_spills(tmp_path):
    out = tmp_path / "sass.json"
    p = _run(["benchmarks/sass_report.py", "--check", "--json", str(out)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["case"]: r for r in json.loads(out.read_text())}
    assert all(r["spill"] == 0 for r in rows.values())  # ptxas's own report, read for every kernel
    # every kernel the solvers launch was compiled, once per case
    assert {"combine_kernel", "matrix_noise_kernel", "error_norm_kernel", "randn_kernel",
            "linear_trajectory_kernel", "tree_kernel"} == {r["kernel"] for r in rows.values()}
    for name in ("rk4 update, float32", "rk4 update, float16", "rk4 update, float64", "euler-maruyama, in-kernel noise",
                 "ddim + cfg + eta noise"):
        acc = rows[name]["loads_stores"]
        assert set(acc) == {"LDG.E.128", "STG.E.128"} and rows[name]["local"] == 0, (name, acc)
    # float32, 8 elements per thread: two 16-byte loads per operand, two stores
    assert rows["rk4 update, float32"]["loads_stores"] == {"LDG.E.128": 10, "STG.E.128": 2}
    # the in-kernel noise draws four normals per Philox call, with no shuffles or shared memory to lay them
    # out: ~70 instructions per element on the run path (one normal per call, tl.randn, took ~127)
    for name in ("euler-maruyama, in-kernel noise", "ddim + cfg + eta noise"):
        assert rows[name]["run_per_element"] < 90, (name, rows[name]["run_per_element"])
    # per-row noise is drawn once per run of four elements of a row, not per element (~57 and ~66 on the
    # run path for rows of 4, against ~182 and ~188 drawn per element)
    for name in ("scalar noise (one draw per row)", "general noise, dW in kernel (m = 3)"):
        assert rows[name]["run_per_element"] < 90, (name, rows[name]["run_per_element"])
        assert rows[name]["run_per_element"] < 0.7 * rows[name]["per_element"]  # (3.6: 0.54, 3.9: 0.41)


def test_run_path_leaves_out_the_slow_paths_skipped_by_a_predicated_branch():
    sass = "\n".join([
        "        /*0000*/                   IMAD R1, R2, R3, RZ ;",
        "        /*0010*/                   BSSY B0, 0x0060 ;",
        "        /*0020*/              @!P0 BRA 0x0050 ;",
        "        /*0030*/                   FMUL R4, R4, R4 ;",
        "        /*0040*/                   FADD R4, R4, R4 ;",
        "        /*0050*/                   BSYNC B0 ;",
        "        /*0060*/                   BRA 0x0000 ;",
        "        /*10000*/                  EXIT ;"])
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import sass_report as s\n"
            f"assert s.run_path({sass!r}) == 6, s.run_path({sass!r})\n"
            f"assert s.run_path_stack({sass!r}) == 0\n"
            f"assert s.run_path_stack({sass.replace('FMUL', 'STL')!r}) == 0\n"  # in the slow path
            f"assert s.run_path_stack({sass.replace('IMAD', 'LDL')!r}) == 1\n")
    p = _run(["-c", code])
    assert p.returncode == 0, p.stderr[-3000:]


def test_the_check_rejects_narrow_accesses_and_spills():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import sass_report as s\n"
            "ok = dict(case='a', kernel='k', stack=0, run_stack=0, local=0, spill=0, step={},\n"
            "          loads_stores={'LDG.E.128': 4, 'STG.E.128': 2})\n"
            "narrow = dict(ok, case='b', loads_stores={'LDG.E': 4, 'STG.E.128': 2})\n"
            "spill = dict(ok, case='c', local=16)\n"
            "reported = dict(ok, case='d', step=None, stack=40, run_stack=3, loads_stores={'LDG.E.64': 3})\n"
            "slow_path_stack = dict(ok, case='e', stack=32)\n"  # triton 3.6's sin / cos reduction
            "run_stack = dict(ok, case='f', stack=32, run_stack=2)\n"
            "spilled = dict(ok, case='g', step=None, stack=3344, spill=6688)\n"  # spills go to the stack frame
            "unread = dict(ok, case='h', spill=None)\n"  # no ptxas figures: not taken for no spills
            "p = s.problems([ok, narrow, spill, reported, slow_path_stack, run_stack, spilled, unread])\n"
            "assert [q[:2] for q in p] == ['b:', 'c:', 'f:', 'g:', 'h:'], p\n")
    p = _run(["-c", code])
    assert p.returncode == 0, p.stderr[-3000:]
