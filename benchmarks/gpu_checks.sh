#!/usr/bin/env bash
# The GPU checks, run on a lent GPU machine from the repository root (the device tool: see CONTRIBUTING.md).
#   bash benchmarks/gpu_checks.sh tests hesd   # tests/test_cuda.py, then the full HESD of GPT-2 small
#   bash benchmarks/gpu_checks.sh scale        # benchmarks/scale.py at 124 M on the GPU, every tool
# The peers travel as wheels in .whl/ (pure Python); hesd runs from src/. Outputs go to $OUT (or ./gpu-out).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD/src:$PWD/benchmarks:/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/nvidia-smi.txt"
for what in "$@"; do
  start=$(date +%s)
  case $what in
    tests)
      timeout "${TESTS_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
        | tee "$OUT/pytest_cuda.txt" | tail -25 ;;
    hesd)
      timeout "${HESD_LIMIT:-420}" python3 benchmarks/gpt2_hesd.py --device cuda --precision "${PRECISION:-tf32}" \
        --out "$OUT/gpt2_hesd.json" 2>&1 \
        | tee "$OUT/gpt2_hesd.txt" | grep -v "^RESULT" ;;
    scale)
      timeout "${SCALE_LIMIT:-240}" python3 benchmarks/scale.py --device cuda --sizes 124M --max-memory free \
        --float64 --timeout 90 --threads 8 2>&1 | tee "$OUT/scale_124M_h200.txt" ;;
  esac
  echo "== $what: $(( $(date +%s) - start )) s"
done
