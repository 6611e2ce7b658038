"""What the compiler makes of every kernel flowsde launches, without a GPU:

    python benchmarks/sass_report.py [--arch 90] [--check] [--json FILE]

Each case below makes the same call the solvers make, on CPU tensors; instead of launching, Triton's own
launch path is asked only to compile (``warmup``), for a CUDA target of the given compute capability
(default 90: H100 / H200), with the argument specialisations a GPU launch of the same call would get
(dtypes, 16-byte alignment, integers divisible by 16, constexprs). The cubin is disassembled with the
``cuobjdump`` that ships with Triton, and the report gives per kernel: registers per thread, stack and
local memory, the width of every global load and store of data (``LDG.E.128`` moves 16 bytes per
thread, the widest), the static instruction count per element (code of slow paths that never run,
such as the large-argument reduction of ``cos``, included) and the instructions per element on the path
a thread runs (those slow paths left out: :func:`run_path`), and the bytes of registers ptxas spilled.

``--check`` fails (exit 1) if an elementwise step kernel over full operands moves its data in anything
narrower than 16-byte accesses or spills to local memory: the test suite runs it, so a change that
breaks the kernels' vectorisation is caught on machines without a GPU. Needs Triton's NVIDIA backend
(``ptxas``, ``cuobjdump``) and must run without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import re
import subprocess
import sys

if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover - a usage error
    sys.exit("sass_report.py compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
N = 1 << 16  # elements per state: a multiple of the block, as the large states the kernels are tuned for


class _CompileOnly:
    """A stand-in for the CUDA driver that names a target and launches nothing."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _capture(call):
    """Run ``call()`` with every Triton launch turned into a compile-only warm-up; returns the compiled
    kernels in launch order."""
    compiled = []
    run = JITFunction.run

    def warm(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel, kwargs.get("num_warps", 4)))
        return kernel
    JITFunction.run = warm
    try:
        call()
    finally:
        JITFunction.run = run
    return compiled


def _cases():
    """``{name: (call, elements per program or None, step)}``: ``step`` is ``None`` for kernels that are only
    reported, else the narrower-than-16-byte global accesses a full-operand elementwise step kernel may
    make (``{}``: none; the 8-byte read of a key held in device memory)."""
    from flowsde import kernels
    from flowsde.brownian import VirtualBrownianTree
    from flowsde.kernels import PhiloxNoise
    from flowsde.kernels.combine import CONFIG
    from flowsde.solvers.linear import solve_linear_sde

    kernels.resolve_backend = lambda *a, **k: "triton"  # CPU tensors stand for CUDA ones here
    ops = kernels.TritonOps()
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    def rk4(dtype):
        y, k1, k2, k3, k4 = (r(N, dtype=dtype) for _ in range(5))
        return lambda: ops.lincomb(y, [(0.1, k1), (0.3, k2), (0.3, k3), (0.1, k4)])

    y, f, gg, dw = (r(N) for _ in range(4))
    B = N // 4
    y2, f2, g2, g3 = r(B, 4), r(B, 4), r(B, 1), r(B, 4, 1)
    G, dwm = r(B // 16, 4, 3), r(B // 16, 3)
    bm = VirtualBrownianTree(0.0, 1.0, (B, 4), seed=1, device="cpu")
    t_rows = torch.rand(B, generator=g, dtype=torch.float64)
    x0, ts = r(N), torch.tensor([0.0, 1.0])
    blk = CONFIG["block"]
    step, key_load = {}, {"LDG.E.64": 1}
    return {
        "rk4 update, float32": (rk4(torch.float32), blk, step),
        "rk4 update, float16": (rk4(torch.float16), blk, step),
        "rk4 update, bfloat16": (rk4(torch.bfloat16), blk, step),
        "rk4 update, float64": (rk4(torch.float64), blk, step),
        "euler-maruyama, given dW": (lambda: ops.sde_update(y, [(0.01, f)], [(0.1, gg)], dw, "diagonal"), blk, step),
        "euler-maruyama, in-kernel noise": (
            lambda: ops.sde_update(y, [(0.01, f)], [(0.1, gg)], PhiloxNoise(1), "diagonal"), blk, step),
        "ddim + cfg + eta noise": (
            lambda: ops.combine([(0.9, y), (-0.75, f), (1.25, gg)], [(0.1, None)], PhiloxNoise(2)), blk, step),
        "ddim + cfg + eta noise, key in memory": (
            lambda: ops.combine([(0.9, y), (-0.75, f), (1.25, gg)], [(0.1, None)],
                                PhiloxNoise(torch.tensor(2))), blk, key_load),
        "scalar noise (one draw per row)": (
            lambda: ops.sde_update(y2, [(0.01, f2)], [(0.1, g3)], PhiloxNoise(3), "scalar"), blk, None),
        "per-row broadcast operand": (lambda: ops.combine([(1.0, y2), (0.5, g2)]), blk, None),
        "general noise (matrix times dW)": (
            lambda: ops.sde_update(y2[:B // 16], [(0.01, f2[:B // 16])], [(0.1, G)], dwm, "general"), blk, None),
        "general noise, dW in kernel (m = 3)": (
            lambda: ops.sde_update(y2[:B // 16], [(0.01, f2[:B // 16])], [(0.1, G)], PhiloxNoise(4), "general"),
            blk, None),
        "per-sample error norm": (lambda: ops.error_norm(y2, y2, f2, 1e-3, 1e-6), None, None),
        "philox normals": (lambda: ops.normal(5, (N,), torch.float32, "cpu"), blk, None),
        "whole-trajectory linear SDE (per step)": (
            lambda: solve_linear_sde(x0, ts, 1 / 8, a=-1.0, d=0.5, seed=0, backend="triton"), None, None),
        "virtual Brownian tree query": (lambda: bm.at(t_rows, ops=ops), blk, None),
    }


def _sass(cubin: bytes):
    path = "/tmp/flowsde_sass_%d.cubin" % os.getpid()
    with open(path, "wb") as fh:
        fh.write(cubin)
    try:
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.remove(path)
    return sass, res


_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P[0-9T] )?)([A-Z0-9_.]+)([^;]*);", re.M)


def _instructions(sass: str):
    """``[(address, predicate, opcode, arguments)]`` of a disassembly, and the addresses of the
    out-of-line slow paths (see :func:`run_path`)."""
    ins = [(int(a, 16), p, op, arg) for a, p, op, arg in _INSTR.findall(sass)]
    at = {a: op for a, _, op, _ in ins}
    skipped = set()
    for a, pred, op, arg in ins:
        addr = re.findall(r"0x[0-9a-f]+", arg)
        if op != "BRA" or not pred or not addr:
            continue
        target = int(addr[-1], 16)
        if target > a and "BSYNC" in (at.get(target), at.get(target + 0x10)):
            skipped.update(b for b, *_ in ins if a < b < target)
    return ins, skipped


def run_path(sass: str) -> int:
    """Instructions on the path a thread runs when it skips every out-of-line slow path: the code between a
    predicated forward branch and the ``BSYNC`` it jumps to (or the instruction before it) is left out.
    In these kernels those regions are the large-argument reductions of ``sin`` / ``cos`` (and ``log``'s
    subnormal fix-up), which arguments in [0, 2 pi) never enter: this is the static estimate of the
    instructions each thread executes."""
    ins, skipped = _instructions(sass)
    return len(ins) - len(skipped)


def run_path_stack(sass: str) -> int:
    """Stack (local-memory) loads and stores on the run path (:func:`run_path`). Some Triton versions
    (3.6) give the large-argument reduction of ``sin`` / ``cos`` a 32-byte stack array; its accesses lie
    in the slow path, which costs a thread that never enters it nothing."""
    ins, skipped = _instructions(sass)
    return sum(1 for a, _, op, _ in ins if op.startswith(("LDL", "STL")) and a not in skipped)


_SPILLS = re.compile(r"Function properties for (\w+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                     r"(\d+) bytes spill loads")


def _spills(call):
    """``(compiled kernels of call(), {kernel name: spill bytes (stores + loads)})``: the kernels are compiled
    afresh (no cache) with ptxas's own report (``-v``, which Triton runs) printed and read here — spilled
    registers go to the stack frame, so the stack size alone cannot tell a spill from a stack array."""
    knobs = triton.knobs
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = _capture(call)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    spills = collections.Counter()
    for fn, _, stores, loads in _SPILLS.findall(log.getvalue()):
        spills[fn] = max(spills[fn], int(stores) + int(loads))
    return compiled, spills


def report(arch: int = 90) -> list:
    """One dict per compiled kernel of every case (see the module docstring)."""
    saved = driver._active
    driver.set_active(_CompileOnly(arch))
    try:
        rows = []
        for name, (call, per_program, step) in _cases().items():
            compiled, spills = _spills(call)
            for kname, kernel, warps in compiled:
                sass, res = _sass(kernel.asm["cubin"])
                ops = [op for _, _, op, _ in _INSTR.findall(sass)]  # any address width (the tree: > 0xffff)
                usage = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", res))
                mem = collections.Counter(o for o in ops if o.startswith(("LDG", "STG")) and ".CONSTANT" not in o)
                per_thread = per_program // (32 * warps) if per_program else None
                rows.append(dict(case=name, kernel=kname, warps=warps, regs=int(usage.get("REG", 0)),
                                 stack=int(usage.get("STACK", 0)), local=int(usage.get("LOCAL", 0)),
                                 loads_stores=dict(mem), instructions=len(ops),
                                 per_element=len(ops) / per_thread if per_thread else None,
                                 run_per_element=run_path(sass) / per_thread if per_thread else None,
                                 run_stack=run_path_stack(sass), spill=spills.get(kname), step=step))
        return rows
    finally:
        driver._active = saved


def problems(rows) -> list:
    """What ``--check`` rejects: any kernel that spills registers (ptxas's report) or has local memory; a
    full-operand step kernel with stack accesses on its run path (:func:`run_path_stack`), or a global
    access narrower than 16 bytes beyond those its case allows. (The tree kernel's float64 ``cos`` keeps a
    small stack array for its large-argument reduction, a path its arguments in [0, 2 pi) never take.)"""
    out = []
    for r in rows:
        if r.get("spill") is None:
            out.append(f"{r['case']}: ptxas reported no spill figures for {r['kernel']}")
        elif r["spill"]:
            out.append(f"{r['case']}: {r['kernel']} spills {r['spill']} bytes of registers (stores + loads)")
        if r["local"] or (r["step"] is not None and r["run_stack"]):
            out.append(f"{r['case']}: {r['run_stack']} stack accesses on the run path ({r['stack']} B stack), "
                       f"{r['local']} B local memory")
        if r["step"] is not None:
            narrow = {k: v for k, v in r["loads_stores"].items() if not k.endswith(".128")}
            if narrow != r["step"] or not r["loads_stores"]:
                out.append(f"{r['case']}: global accesses narrower than 16 bytes: {narrow or 'none found'}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100 / H200)")
    ap.add_argument("--check", action="store_true", help="exit 1 on narrow accesses or spills")
    ap.add_argument("--json", help="also write the report to this JSON file")
    args = ap.parse_args(argv)
    rows = report(args.arch)
    print(f"## sm_{args.arch} SASS of flowsde's kernels (triton {triton.__version__}, compile only, no GPU)\n")
    print("| case | kernel | warps | regs | stack / local / spilled B | global data accesses | SASS instr. | per element "
          "| run per element |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        acc = ", ".join(f"{v} {k}" for k, v in sorted(r["loads_stores"].items()))
        pe, rpe = ("" if r[k] is None else f"{r[k]:.0f}" for k in ("per_element", "run_per_element"))
        print(f"| {r['case']} | {r['kernel']} | {r['warps']} | {r['regs']} | {r['stack']} / {r['local']} / {r['spill']} | {acc} "
              f"| {r['instructions']} | {pe} | {rpe} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    bad = problems(rows)
    for p in bad:
        print("PROBLEM:", p)
    return 1 if (bad and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
