#!/usr/bin/env bash
# The GPU checks in one run, on a machine with a CUDA GPU: parity and speed of the torch backend,
# the CUDA tests, a folder evaluated on the GPU and on the CPU, and nnU-Net prediction on CUDA.
#
#   bash benchmarks/gpu_suite.sh OUTDIR [N_CASES]
#
# Writes OUTDIR/env.txt, gpu_check.txt, pytest_cuda.txt, folder.txt. Needs oarbench with its
# torch, nnunet and test extras installed. Run from the repository root.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUTDIR [N_CASES]}
cases=${2:-20}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, numpy, scipy; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'numpy', numpy.__version__, 'scipy', scipy.__version__)"
    nproc; lscpu | grep -E 'Model name|^CPU\(s\)'
} >"$out/env.txt" 2>&1

# 1. parity and timings on the 19-structure case, file reading excluded
python3 benchmarks/gpu_check.py --repeats 5 --threads 1 2 4 8 --profile >"$out/gpu_check.txt" 2>&1
echo "gpu_check exit $?" >>"$out/gpu_check.txt"

# 2. the tests that skip without a GPU (torch backend on CUDA, nnU-Net prediction on CUDA)
python3 -m pytest -q -p no:cacheprovider -m "cuda" tests/test_metrics_torch.py tests/test_robustness_nnunet.py \
    >"$out/pytest_cuda.txt" 2>&1
echo "pytest exit $?" >>"$out/pytest_cuda.txt"

# 3. a folder of N cases of the same size: oarbench evaluate on the GPU and on the CPU
{
    t0=$EPOCHREALTIME
    python3 benchmarks/make_case.py --out "$work" --cases "$cases" >/dev/null
    echo "made $cases cases in $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
    for dev in cuda cpu; do
        for run in 1 2; do
            t0=$EPOCHREALTIME
            python3 -m oarbench evaluate --reference "$work/folder/labelsTr" --prediction "$work/folder/predictions" \
                --labels "$work/folder/dataset.json" --device $dev --workers "$( [ $dev = cpu ] && nproc || echo 1 )" \
                --out "$work/out_$dev" --force --quiet || echo "evaluate --device $dev failed"
            echo "evaluate --device $dev run $run: $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
        done
    done
    python3 - "$work" <<'PY'
import sys, pandas as pd
w = sys.argv[1]
a, b = (pd.read_csv(f"{w}/out_{d}/metrics.csv") for d in ("cuda", "cpu"))
cols = ["dsc", "hd95", "hd", "msd", "assd", "sdsc", "ref_ml", "pred_ml", "tp", "fp", "fn"]
key = ["case", "structure"]
m = a.merge(b, on=key, suffixes=("_gpu", "_cpu"))
print("rows", len(a), len(b), "matched", len(m), "status equal", bool((m.status_gpu == m.status_cpu).all()))
for c in cols:
    x, y = m[c + "_gpu"], m[c + "_cpu"]
    fin = x.notna() & y.notna() & (x.abs() != float("inf"))
    print(c, "max abs diff", float((x[fin] - y[fin]).abs().max()) if fin.any() else 0.0)
PY
} >"$out/folder.txt" 2>&1
rm -rf "$work"
