#!/usr/bin/env bash
# Every GPU check of the kernels issue in one command, for a lent CUDA machine (the device tool's `run`):
#
#   bash benchmarks/gpu_session.sh            # through the device tool: run(command="bash benchmarks/gpu_session.sh",
#                                              #   carry=[".whl"], timeout_s=600)
#
# 1. the machine (nvidia-smi, torch / triton versions);
# 2. tests/test_gpu.py: compiled kernels against the reference, Philox = mirror, backend parity, CUDA-graph
#    replays, CUDA's sync detector;
# 3. python benchmarks/host_overhead.py (the host's Python per launch, the kernel call stubbed) and
#    python benchmarks/gpu_kernels.py: the reports to paste into benchmarks/RESULTS.md (also as JSON, rewritten
#    after each section: a part cut off by its time limit keeps the figures measured so far);
# 4. the launch-configuration sweep (--tune), if time is left.
# Logs and the JSON go to $OUT (the device tool brings them back), or to ./gpu_out elsewhere. Each part has
# its own time limit, so one that hangs does not take the others with it; the last lines printed are a
# summary.
#
# The lent machine has torch, triton and torchdiffeq but not torchsde (tests and benchmarks compare with
# it): carry it as wheels (.whl/ is in .gitignore, so `carry` must name it). On the development machine, in
# the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl torchsde==0.2.6 trampoline==0.1.2
# (both are pure-Python wheels). The script installs whatever lies in .whl into /tmp/site.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

status=()
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember the outcome
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    status+=("$name: exit $rc in $((SECONDS - start)) s")
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    python3 -c "import torchsde, torchdiffeq; print('torchsde', torchsde.__version__, 'torchdiffeq', torchdiffeq.__version__)"
} 2>&1 | tee "$OUT/machine.log"

part test_gpu 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
# this host's Python per launch (FLOWSDE_HOST_OVERHEAD_ARGS: other counts, e.g. the CPU test's short run)
part host_overhead 60 python3 benchmarks/host_overhead.py ${FLOWSDE_HOST_OVERHEAD_ARGS:---calls 2000 --rounds 5}
part gpu_kernels 300 python3 benchmarks/gpu_kernels.py --json "$OUT/gpu_kernels.json"
if [ "${FLOWSDE_TUNE:-0}" = 1 ]; then
    part tune 240 python3 benchmarks/gpu_kernels.py --quick --tune --json "$OUT/tune.json"
fi

echo "== summary"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.log"
grep -E "passed|failed|error" "$OUT/test_gpu.log" | tail -n 1
