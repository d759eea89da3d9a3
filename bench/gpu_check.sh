#!/usr/bin/env bash
# The GPU paths in one short run, under 5 minutes on one CUDA GPU, offline (synthetic data and the digits
# that scikit-learn ships; no pretrained weights, so accuracies mean nothing; what is checked is that every
# path runs and its losses stay finite):
#   - a few steps of every distiller, resnet18 <- swin_tiny at 224 px, with --amp float16 (GradScaler) and
#     with --amp --amp-dtype bfloat16, all in one process;
#   - --channels-last (ofa), --torchcompile (rsd; resnet18 <- deit_tiny, to keep the compile short), the
#     device data path (--device-resize on, digits 8 px -> 224 px);
#   - the step benchmark at 224 px, batch 64, resnet18 <- swin_tiny, fp32, bf16 and fp16 rows;
#   - a 2-process NCCL run (torchrun) where there are two GPUs.
# It prints a table (check, status, seconds, detail) and the step benchmark's table, and exits 1 if any
# check failed.
#
#   bash bench/gpu_check.sh              on a machine with a CUDA GPU
#   CPU=1 bash bench/gpu_check.sh        what a CPU can check (bfloat16, channels-last, the benchmark) with the
#                                        demo's tiny models: a smoke test of this script, not of a GPU
#   METHODS="kd ofa"                     only these distillers (default: every registered one)
#   OUT=folder                           logs and run folders (default: output/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."

CPU=${CPU:-0}
OUT=${OUT:-output/gpu_check}
rm -rf "$OUT"
mkdir -p "$OUT"
RESULTS="$OUT/results.tsv"
: > "$RESULTS"
START=$(date +%s)

if [ "$CPU" = 1 ]; then
    GPUS=0
    BASE=(--dataset fake --fake-samples 16 --img-size 32 --batch-size 8 --epochs 1 --workers 0 --num-classes 10
          --model demo_resnet_student --teacher demo_vit_teacher --log-interval 1)
    BENCH=(--model demo_resnet_student --teacher demo_vit_teacher --img-size 32 --num-classes 10 --rounds 1
           --warmup 1 --precisions fp32 bf16 --threads 1)
else
    GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
    if [ "$GPUS" -lt 1 ]; then
        echo "error: no CUDA GPU visible to torch (CPU=1 runs the CPU-checkable parts)" >&2
        exit 2
    fi
    BASE=(--dataset fake --fake-samples 96 --img-size 224 --batch-size 32 --epochs 1 --workers 2 --num-classes 100
          --model resnet18 --teacher swin_tiny_patch4_window7_224 --log-interval 1)
    BENCH=(--model resnet18 --teacher swin_tiny_patch4_window7_224 --img-size 224 --batch-size 64 --num-classes 100
           --precisions fp32 bf16 fp16)
fi
read -r -a METHOD_LIST <<< "${METHODS:-$(python -c 'import distillers; print(*distillers.distiller_names())')}"

python - <<'EOF' | tee "$OUT/environment.txt"
import platform, subprocess, torch, timm
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA GPU'
cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
           platform.processor()) if platform.system() == 'Linux' else platform.processor()
print(f'{subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()}; '
      f'{gpu} x {torch.cuda.device_count()}; CPU {cpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); '
      f'timm {timm.__version__}')
EOF

# record NAME STATUS SECONDS DETAIL
record() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RESULTS"
}

# check NAME TIMEOUT COMMAND...: run COMMAND, its output in $OUT/<name>.log; PASS on exit status 0.
check() {
    local name=$1 limit=$2
    shift 2
    local log="$OUT/${name//[^A-Za-z0-9_.-]/_}.log" begin=$SECONDS status detail
    echo "== $name" >&2
    if timeout "$limit" "$@" > "$log" 2>&1; then
        status=PASS
        detail=$(grep -o 'Best top-1 [0-9.]*' "$log" | tail -1)
    else
        status=FAIL
        detail=$(grep -v '^\s*$' "$log" | tail -1 | cut -c1-120)
    fi
    record "$name" "$status" "$((SECONDS - begin))" "${detail:--}"
}

skip() {
    record "$1" SKIP 0 "$2"
}

# Every distiller in each AMP dtype, in one process: train.py's main() called once per run.
if [ "$CPU" = 1 ]; then DTYPES="bfloat16"; else DTYPES="float16 bfloat16"; fi
echo "== distillers x AMP dtypes" >&2
timeout 240 python - "$RESULTS" "$OUT/runs" "$DTYPES" "${METHOD_LIST[@]}" -- "${BASE[@]}" > "$OUT/distillers.log" 2>&1 <<'EOF'
import math, sys, time

import train

results, output, dtypes = sys.argv[1], sys.argv[2], sys.argv[3].split()
split = sys.argv.index('--')
methods, base = sys.argv[4:split], sys.argv[split + 1:]
for method in methods:
    for dtype in dtypes:
        name = f'{method}, --amp {dtype}' + (' (GradScaler)' if dtype == 'float16' else '')
        start = time.time()
        try:
            result = train.main(base + ['--distiller', method, '--amp', '--amp-dtype', dtype, '--output', output,
                                        '--experiment', f'{method}-{dtype}'])
            status, detail = 'PASS', f"Best top-1 {result['best_top1']:.2f}"
            if not math.isfinite(result['best_top1']):
                status = 'FAIL'
        except BaseException as error:  # argparse exits too: a failed run is a row of the table, not the end
            status, detail = 'FAIL', f'{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ""}'
        with open(results, 'a') as f:
            f.write(f'{name}\t{status}\t{time.time() - start:.0f}\t{detail}\n')
EOF
read -r -a DTYPE_LIST <<< "$DTYPES"
if [ "$(wc -l < "$RESULTS")" -lt $((${#METHOD_LIST[@]} * ${#DTYPE_LIST[@]})) ]; then
    record "distillers x AMP dtypes" FAIL - "the process stopped early: see $OUT/distillers.log"
fi

check "ofa, --amp --channels-last" 120 python train.py "${BASE[@]}" --distiller ofa --amp --channels-last \
    --output "$OUT/runs" --experiment channels-last
if [ "$CPU" = 1 ]; then
    skip "rsd, --amp --torchcompile" "GPU only (compiling on a CPU takes minutes)"
    skip "kd, --device-resize on (digits)" "GPU only"
else
    check "rsd, --amp --torchcompile" 240 python train.py "${BASE[@]}" --teacher deit_tiny_patch16_224 \
        --distiller rsd --amp --torchcompile --output "$OUT/runs" --experiment compile
    check "kd, --device-resize on (digits)" 120 python train.py --dataset digits --train-subset 512 --img-size 224 \
        --batch-size 64 --epochs 1 --workers 2 --model resnet18 --teacher swin_tiny_patch4_window7_224 \
        --distiller kd --amp --device-resize on --output "$OUT/runs" --experiment device-resize
fi
# The benchmark's student row is vanilla's step already.
BENCH_METHODS=()
for method in "${METHOD_LIST[@]}"; do
    [ "$method" = vanilla ] || BENCH_METHODS+=("$method")
done
[ ${#BENCH_METHODS[@]} -eq 0 ] || BENCH+=(--methods "${BENCH_METHODS[@]}")
check "bench/step.py" 240 python bench/step.py "${BENCH[@]}"
if [ "$GPUS" -ge 2 ]; then
    check "kd, 2 processes, NCCL" 180 torchrun --standalone --nproc_per_node=2 train.py "${BASE[@]}" \
        --distiller kd --amp --output "$OUT/runs" --experiment nccl
else
    skip "kd, 2 processes, NCCL" "needs 2 GPUs, found $GPUS"
fi

echo
cat "$OUT/environment.txt"
echo
echo "| check | status | seconds | detail |"
echo "|---|---|---:|---|"
awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$RESULTS"
echo
grep -A40 '^| variant ' "$OUT/bench_step.py.log" | grep -E '^\||^Teacher|^Wall|^bf16' || true
FAILED=$(awk -F'\t' '$2 == "FAIL"' "$RESULTS" | wc -l)
echo
echo "$((FAILED)) failed; total $(($(date +%s) - START)) s; logs in $OUT/"
[ "$FAILED" -eq 0 ]
