#!/usr/bin/env bash
# One bounded GPU check on a machine that has torch and transformers but not the rest of be-bench's dependencies
# (the lent nvidia-h200: no diffusers, pydantic, hydra-core, omegaconf; no internet): the wheels carried in .whl
# go to a --target folder (nothing is built, be-bench is imported from the working tree), then two stages, each
# under a hard timeout, inside a total budget:
#   1. the gpu-marked tests: `pytest -m gpu` on every tests/*.py that uses the gpu marker;
#   2. `make bench-gpu`'s suite: `python -m runners.bench --gpu-suite --device cuda --budget-s B [ARGS...]`.
# A stage that fails or times out is reported and the next one still runs; the script exits 0 only when every
# stage passed. Whatever cases the suite holds run here, and every `name: value` line it prints is collected, so
# new model families in runners/bench.py need no change here.
#
# Usage, from the repo root:  bash scripts/gpu_check.sh [extra runners.bench arguments, which win over ours]
#   e.g. on a CPU (tiny sizes): bash scripts/gpu_check.sh --device cpu --model tiny --resolution 32 --steps 2 \
#        --dtypes float32 --batch 2 --repeats 1
# Files written to $OUT (default ./gpu_check_out), 7, flat (a device run brings back at most 8, 2 folders deep):
#   gpu_check.log (everything), env.txt (versions, nvidia-smi), gpu_tests.log, gpu_tests.xml (JUnit),
#   bench.log, bench_figures.json (the suite's figures), summary.json (each stage: status, rc, seconds).
# Settings (environment): PYTHON (python3), WHEELS (.whl), SITE (/tmp/site), GPU_CHECK_TOTAL_S (450: a device
# run of <= 8 minutes), GPU_TESTS_S (150: the tests' cap), BENCH_BUDGET_S (no new suite case after this many
# seconds; default 60% of the time left for the suite, so the last case started can finish).
set -u -o pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
TOTAL_S=${GPU_CHECK_TOTAL_S:-450}
TESTS_S=${GPU_TESTS_S:-150}
OUT=${OUT:-$PWD/gpu_check_out}
[[ $TOTAL_S =~ ^[0-9]+$ ]] || { echo "gpu_check: GPU_CHECK_TOTAL_S must be whole seconds, got '$TOTAL_S'"; exit 2; }
[[ $TESTS_S =~ ^[0-9]+$ ]] || { echo "gpu_check: GPU_TESTS_S must be whole seconds, got '$TESTS_S'"; exit 2; }
[[ -z ${BENCH_BUDGET_S:-} || $BENCH_BUDGET_S =~ ^[0-9]+([.][0-9]+)?$ ]] \
  || { echo "gpu_check: BENCH_BUDGET_S must be seconds, got '$BENCH_BUDGET_S'"; exit 2; }
mkdir -p "$OUT" || exit 2
exec > >(tee "$OUT/gpu_check.log") 2>&1
tee_pid=$!

# No internet there: a stray hub download fails at once instead of hanging until the stage's timeout.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 WANDB_MODE=disabled MPLBACKEND=Agg
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
declare -A STATUS RC SECS
left() { echo $(( TOTAL_S - (SECONDS - START) )); }
stage() { echo; echo "=== $1 ($(left) s left of ${TOTAL_S} s) ==="; }
record() {  # record NAME RC SECONDS: timeout's 124/137 is a time-out, not a failure of the code under test
  local status=ok
  [[ $2 -ne 0 ]] && status=failed
  [[ $2 -eq 124 || $2 -eq 137 ]] && status=timed_out
  STATUS[$1]=$status RC[$1]=$2 SECS[$1]=$3
  echo "--- $1: $status (rc $2, $3 s)"
}

stage "wheels: $WHEELS -> $SITE"
t=$SECONDS
# A carried wheel is installed only where the machine lacks that package or holds an older version: its own newer
# builds (typing_extensions, say) stay in charge.
mapfile -t needed < <("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md
import pathlib
import sys

from packaging.utils import parse_wheel_filename
from packaging.version import Version

wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
if not wheels:
    sys.exit(f"no wheels in {sys.argv[1]} (a device run needs it named in carry)")
for wheel in wheels:
    name, version, _, _ = parse_wheel_filename(wheel.name)
    try:
        have = Version(md.version(name))
    except md.PackageNotFoundError:
        have = None
    if have is not None and have >= version:
        print(f"keep {name} {have} (carried: {version})", file=sys.stderr)
    else:
        print(f"install {name} {version} (there: {have or 'none'})", file=sys.stderr)
        print(wheel)
EOF
)
rc=$?
if [[ $rc -eq 0 && ${#needed[@]} -gt 0 ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${needed[@]}"
  rc=$?
fi
record wheels $rc $((SECONDS - t))
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"

stage "environment"
t=$SECONDS
{
  echo "python: $(command -v "$PY") ($("$PY" --version 2>&1)); PYTHONPATH=$PYTHONPATH"
  "$PY" - <<'EOF'
import importlib
import importlib.metadata as md

for dist in ("torch", "transformers", "huggingface_hub", "tokenizers", "accelerate", "safetensors", "diffusers",
             "numpy", "scipy", "pandas", "scikit-learn", "pydantic", "pydantic_core", "typing_extensions",
             "hydra-core", "omegaconf", "pyyaml", "pytest"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} MISSING")
import torch

print(f"torch.cuda.is_available {torch.cuda.is_available()}, CUDA {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for module in ("benchmark", "runners.bench"):  # import errors of the wheel set show here first
    print(f"import {module}: {importlib.import_module(module).__file__}")
EOF
  rc=$?
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not on PATH"; fi
  exit $rc
} 2>&1 | tee "$OUT/env.txt"
record environment "${PIPESTATUS[0]}" $((SECONDS - t))

stage "gpu-marked tests"
t=$SECONDS
mapfile -t files < <(grep -lE 'mark\.gpu\b' tests/*.py)
cap=$(( $(left) - 90 < TESTS_S ? $(left) - 90 : TESTS_S ))  # keep at least 90 s for the suite
if [[ ${#files[@]} -eq 0 ]]; then
  echo "no test file uses the gpu marker"; record gpu_tests 5 0
elif [[ $cap -lt 20 ]]; then
  echo "skipped: $cap s would be left for the tests"; STATUS[gpu_tests]=skipped RC[gpu_tests]=-1 SECS[gpu_tests]=0
else
  echo "files: ${files[*]} (timeout $cap s)"
  timeout -k 10 "$cap" "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=10 \
    --junitxml="$OUT/gpu_tests.xml" "${files[@]}" 2>&1 | tee "$OUT/gpu_tests.log"
  record gpu_tests "${PIPESTATUS[0]}" $((SECONDS - t))
fi

stage "bench-gpu suite"
t=$SECONDS
cap=$(( $(left) - 10 ))  # 10 s to write the figures and the summary
budget=${BENCH_BUDGET_S:-$(( cap * 6 / 10 ))}
if [[ $cap -lt 30 ]]; then
  echo "skipped: $cap s would be left for the suite"; STATUS[bench]=skipped RC[bench]=-1 SECS[bench]=0
else
  echo "python -m runners.bench --gpu-suite --device cuda --budget-s $budget $* (timeout $cap s)"
  timeout -k 10 "$cap" "$PY" -m runners.bench --gpu-suite --device cuda --budget-s "$budget" "$@" 2>&1 \
    | tee "$OUT/bench.log"
  record bench "${PIPESTATUS[0]}" $((SECONDS - t))
fi

stage "figures and summary"
# The suite prints one `name: value` line per figure (runners/bench.py); a run cut off by its timeout still leaves
# the figures of the cases it finished in the log, so they are read from there.
summary=$(for name in wheels environment gpu_tests bench; do
  echo "$name ${STATUS[$name]:-not_run} ${RC[$name]:--1} ${SECS[$name]:-0}"; done)
"$PY" - "$OUT" "$summary" <<'EOF'
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
log = out / "bench.log"
figures, notes = {}, []
for line in (log.read_text().splitlines() if log.exists() else []):
    match = re.fullmatch(r"(\w+): ([-+0-9.eE]+|inf|nan)", line.strip())
    if match:
        name, n = match[1], 1
        while name in figures:  # a name printed twice (two cases sharing a tag) keeps both values
            n += 1
            name = f"{match[1]}#{n}"
        figures[name] = float(match[2])
    elif line.strip():
        notes.append(line.strip())
(out / "bench_figures.json").write_text(json.dumps({"figures": figures, "other_lines": notes[-50:]}, indent=1))
stages = {name: {"status": status, "rc": int(rc), "seconds": int(s)}
          for name, status, rc, s in (row.split() for row in sys.argv[2].splitlines())}
(out / "summary.json").write_text(json.dumps({"stages": stages, "n_figures": len(figures)}, indent=1))
print(f"{len(figures)} figures -> {out / 'bench_figures.json'}")
for name, stage in stages.items():
    print(f"{name}: {stage['status']} (rc {stage['rc']}, {stage['seconds']} s)")
EOF
echo "total: $((SECONDS - START)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
code=0
for name in wheels environment gpu_tests bench; do [[ ${STATUS[$name]:-} == ok ]] || code=1; done
exec >&- 2>&-
wait "$tee_pid"  # the whole log is on disk before the device run collects $OUT
exit $code
