#!/usr/bin/env bash
# `make gpu-check`: everything a GPU machine lent for a few minutes should prove, in one command.
#
# Steps (each timed, logged and kept going when one fails; the summary says which passed):
#   env       nvidia-smi, python, torch, triton, nvcc versions
#   build     the extension with CUDA (TCM_BUILD_CUDA=1, in place)
#   tests     the whole pytest suite on the GPU (TRITON_INTERPRET unset: every Triton test runs on CUDA)
#   sanitize  compute-sanitizer --tool memcheck on scripts/gpu_smoke.py (sample_mask, submconv, norms,
#             loss, info_nce) when compute-sanitizer is on the PATH
#   train     30 steps of tcm-pretrain device=cuda precision=bf16 per method once the config has a
#             `device` key; until then the ops alone (scripts/gpu_smoke.py without the sanitizer)
#   bench     the GPU benchmark groups in quick mode (python -m benchmarks --quick -k gpu)
# Results: benchmarks/results/gpu-<UTC date>/ (logs, junit XML, smoke JSON, benchmark tables, SUMMARY.md).
# It installs and downloads nothing. Optional peers for the benchmarks (spconv CUDA wheel, spconv-triton)
# are installed from ./.whl when that folder exists (wheels carried there beforehand; see README); the
# embedded-data cache is read from ./.gpu-cache when that folder exists.
# GPU_CHECK_STEPS="build tests" runs a subset; PYTHON picks the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-"env build tests sanitize train bench"}
OUT=benchmarks/results/gpu-$(date -u +%Y-%m-%d)
mkdir -p "$OUT"
SUMMARY="$OUT/SUMMARY.md"
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
JOBS=$(nproc)
START=$(date +%s)
declare -a ROWS

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local t0=$(date +%s) rc
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  local dt=$(( $(date +%s) - t0 )) status=passed
  if (( rc == 124 || rc == 137 )); then status="TIMED OUT"; elif (( rc != 0 )); then status="FAILED (rc $rc)"; fi
  ROWS+=("| $name | $status | $dt | \`$name.log\` |")
  echo "   $status in ${dt}s"
  tail -n 3 "$OUT/$name.log"
}

# the embedded datasets' cache (~/.cache/tcm_mim/*.npz), carried when the machine cannot build it offline
[[ -d .gpu-cache ]] && export TCM_MIM_CACHE="$PWD/.gpu-cache"
if [[ -d .whl ]] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/gpu-check-site"
fi

step env 60 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name()); print(\"triton\", triton.__version__)'; nvcc --version; which compute-sanitizer || true"
step build 300 env TCM_BUILD_CUDA=1 MAX_JOBS="$JOBS" $PY setup.py build_ext --inplace
step tests 330 $PY -m pytest tests -q -p no:cacheprovider -n "$(( JOBS < 8 ? JOBS : 8 ))" --junitxml="$OUT/tests.xml" -rs
if command -v compute-sanitizer > /dev/null; then
  step sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
    $PY scripts/gpu_smoke.py --json "$OUT/sanitize.json"
elif [[ " $STEPS " == *" sanitize "* ]]; then
  ROWS+=("| sanitize | skipped: compute-sanitizer not on the PATH | 0 | |")
fi
if [[ " $STEPS " != *" train "* ]]; then
  :
elif $PY -c "import dataclasses, sys; from tcm_mim.train.config import PretrainConfig as C; sys.exit('device' not in {f.name for f in dataclasses.fields(C)})" 2>/dev/null; then
  step train 240 bash -c "for m in spark tcm anatomask amlp; do $PY -m tcm_mim.train.cli --config configs/pretrain_tcm.yaml method=\$m steps=30 device=cuda precision=bf16 out_dir=$OUT/train_\$m || exit 1; done"
else
  step train 120 $PY scripts/gpu_smoke.py --json "$OUT/train_ops.json"
fi
step bench 240 $PY -m benchmarks --quick --out "$OUT" --tag gpu -k gpu

{
  echo "# make gpu-check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1);" \
       "$(nproc) CPUs; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); total $(( $(date +%s) - START )) s."
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---:|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  if [[ -f "$OUT/tests.xml" ]]; then
    $PY - "$OUT/tests.xml" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(f"Tests: {tot['tests']} collected, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped.")
for s in suites:
    for case in s.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            print(f"* FAILED {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:160]}")
PYEOF
  fi
  echo
  for md in "$OUT"/*_gpu.md; do [[ -f $md ]] && echo "Benchmark tables: \`$(basename "$md")\`"; done
} > "$SUMMARY"
cat "$SUMMARY"
grep -q "FAILED\|TIMED OUT" "$SUMMARY" && exit 1 || exit 0
