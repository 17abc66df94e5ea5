#!/usr/bin/env bash
# Benchmarks on a CUDA machine in one command: the CUDA tests, then every benchmark that takes
# --device cuda, at their quick sizes where they have them. Results are merged into
# benchmarks/results-gpu.json (never into results.json), each section with the machine, plus a
# "gpu" section naming the device. About 5-8 minutes on one H200. Never part of CI.
#
#   bash benchmarks/gpu.sh                    # uses $PYTHON, else .venv/bin/python, else python
#   RESULTS_GPU=/tmp/r.json bash benchmarks/gpu.sh
#
# Exit status: 2 when no CUDA device is visible (nothing is run or written), otherwise the
# number of steps that failed (every step runs even if an earlier one failed).
set -uo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
RESULTS="${RESULTS_GPU:-benchmarks/results-gpu.json}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False);" \
        "run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi

failed=0
step() {  # step SECONDS NAME COMMAND...: run with a time limit, report, keep going
    local limit=$1 name=$2
    shift 2
    echo
    echo "== gpu.sh: $name (limit ${limit} s)"
    local t0=$SECONDS
    timeout --signal=INT "$limit" "$@"
    local rc=$?
    echo "== gpu.sh: $name: exit $rc after $((SECONDS - t0)) s"
    if [[ $rc -ne 0 ]]; then failed=$((failed + 1)); fi
}

"$PYTHON" - "$RESULTS" <<'EOF'
import sys, torch
sys.path.insert(0, "benchmarks")
from common import machine, update_section
p = torch.cuda.get_device_properties(0)
update_section(sys.argv[1], "gpu", {
    "device": torch.cuda.get_device_name(0), "memory_bytes": p.total_memory,
    "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
    "bf16": torch.cuda.is_bf16_supported(), "count": torch.cuda.device_count(),
    "machine": machine(),
})
print("gpu.sh:", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", "torch",
      torch.__version__, "CUDA", torch.version.cuda)
EOF

B=benchmarks
step 240 "CUDA tests" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_layer_perf.py -k cuda
step 120 "bench_layer --quick (peak, key case fp32/bf16)" \
    "$PYTHON" $B/bench_layer.py --quick --device cuda --results "$RESULTS"
step 120 "bench_groups" "$PYTHON" $B/bench_groups.py --device cuda --repeats 3 --results "$RESULTS"
step 90 "bench_generate" "$PYTHON" $B/bench_generate.py --device cuda --repeats 3 --results "$RESULTS"
step 90 "bench_train" "$PYTHON" $B/bench_train.py --device cuda --repeats 5 --results "$RESULTS"
step 60 "bench_train --fsm" "$PYTHON" $B/bench_train.py --fsm --device cuda --repeats 10 \
    --results "$RESULTS"

echo
echo "gpu.sh: results in $RESULTS; $failed step(s) failed"
exit "$failed"
