#!/usr/bin/env bash
# Every GPU benchmark of issues 4 and 5 in one device call (H100; see docs/benchmarks.md).
# Run from the repository root: bash benchmarks/gpu_bench.sh OUTDIR [seconds budget]
# Optional: wheels for the MoE-PEFT environment in .whl_moepeft/ (see benchmarks/moe_peft_bench.py).
# Switches (environment): SKIP_KERNEL, SKIP_ENGINE, SKIP_PREFIX, COMPILED, CKPT, PROFILE (profiler tables of one
# training step and one generate call per contender), *_SECS (each step's limit), MOEPEFT_ARGS.
set -u
OUT=${1:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
step() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s) ==="
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name rc=$rc in $((SECONDS - t0))s ==="
}
[ -z "${SKIP_KERNEL:-}" ] && step kernel 70 python3 benchmarks/kernel_bench.py
step bench ${BENCH_SECS:-330} python3 benchmarks/bench.py --mode gpu --reuse-base --budget $(( ${BENCH_SECS:-330} - 40 )) --warmup 2 --repeats 5 --output "$OUT/bench_gpu.json" \
  ${PROFILE:+--profile "$OUT/profile.txt"}
[ -n "${COMPILED:-}" ] && step bench_compiled ${COMPILED_SECS:-240} python3 benchmarks/bench.py --mode gpu --reuse-base --skip-gate --compiled-decode \
  --budget $(( ${COMPILED_SECS:-240} - 40 )) --warmup 2 --repeats 5 --contenders peft_lora_r16 ours_lora_r16 ours_mixlora_fast ours_milora_r16 \
  --output "$OUT/bench_gpu_compiled.json" ${PROFILE:+--profile "$OUT/profile_compiled.txt"}
[ -n "${CKPT:-}" ] && step bench_ckpt ${CKPT_SECS:-150} python3 benchmarks/bench.py --mode gpu --reuse-base --skip-gate --gradient-checkpointing \
  --budget $(( ${CKPT_SECS:-150} - 30 )) --warmup 2 --repeats 5 --contenders peft_lora_r16 ours_mixlora_fast \
  --output "$OUT/bench_gpu_ckpt.json"
[ -z "${SKIP_ENGINE:-}" ] && step engine 120 python3 benchmarks/engine_bench.py --mode gpu --repeats 1 --output "$OUT/engine_gpu.json"
[ -z "${SKIP_PREFIX:-}" ] && step prefix 90 python3 benchmarks/prefix_bench.py --mode gpu --repeats 3 --output "$OUT/prefix_gpu.json"
if ls .whl_moepeft/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_old .whl_moepeft/*.whl \
    > "$OUT/moepeft_install.log" 2>&1
  step moepeft ${MOEPEFT_SECS:-120} env PYTHONPATH=/tmp/site_old python3 benchmarks/moe_peft_bench.py --mode gpu \
    ${MOEPEFT_ARGS:-} --output "$OUT/moe_peft_gpu.json"
fi
