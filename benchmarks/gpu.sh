#!/usr/bin/env bash
# docs/performance.md's targets on one H100 / H200 in one short run, and a configs/shapes.py run judged on
# 64 one-object prompts. GPU time is scarce: every step has its own time limit, and one that fails or
# overruns is logged and the rest go on.
#
#   bash benchmarks/gpu.sh targets OUT           # the speed targets: about 10 minutes of GPU time, most of it
#                                                # compiling (one scanned XL train step: 1.5-2 minutes on an H200)
#   bash benchmarks/gpu.sh shapes OUT SECONDS    # train configs/shapes.py for about SECONDS, judge it; the
#                                                # XL compile and memory figures are compiled alongside
#   bash benchmarks/gpu.sh all OUT SECONDS
#
# Figures go to OUT/gpu.jsonl (one JSON line per benchmark), every command's output to OUT/log.txt, and the
# shapes run's metrics.jsonl and sample picture to OUT. DRY_RUN=1 runs every command at a tiny size on any
# machine (a CPU too), to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=${1:?usage: gpu.sh targets|shapes|all OUT [SECONDS]}
out=$(mkdir -p "${2:?the output folder}" && cd "$2" && pwd)
seconds=${3:-240}
log=$out/log.txt
results=$out/gpu.jsonl
run_dir=${RUN_DIR:-runs/shapes_gpu}
export PYTHONUNBUFFERED=1
# Several programs share the GPU in the shapes phase: each takes memory as it needs it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if [ "${DRY_RUN:-0}" = 1 ]; then
  xl=tiny/1x2x2; xl_frames=2; xl_size=8; xl_batch=2; dit_batch=2; dit_size=4
  vae_frames=1; vae_size=16; clip_frames="2 4"; run_frames=2; steps=2; judge=4; gpu_platform=cpu
  shapes_batch=4; shapes=(--model.variant tiny/2x4x4 --data.num_frames 4 --data.size 16)
else
  xl=XL/1x2x2; xl_frames=16; xl_size=32; xl_batch=8; dit_batch=256; dit_size=32
  vae_frames=16; vae_size=256; clip_frames="256 1024 4096"; run_frames=256; steps=10; judge=64; gpu_platform=cuda
  shapes_batch=64; shapes=()
fi
# Scanned blocks: XLA compiles one XL block instead of 28 (an unrolled XL step did not compile in 3.5 minutes).
xl_unrolled=(--config configs/shapes.py --model.variant "$xl" --model.in_channels 4 --latents --dtype bfloat16)
xl_text=("${xl_unrolled[@]}" --scan-layers)

say() { echo "[$(date +%T)] $*" | tee -a "$log"; }

# step NAME LIMIT COMMAND...: runs COMMAND under a time limit, its output appended to the log.
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  say "begin $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  say "end $name: exit $rc after $((SECONDS - start))s"
  return $rc
}

# step_fitting NAME LIMIT COMMAND...: step, and if it failed other than by time (out of memory), the same
# again keeping only the matmul outputs for the backward pass (--remat dots).
step_fitting() {
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$@"
  case $? in
    0|124|137) ;;
    *) step "${name}_remat_dots" "$limit" "$@" --remat dots ;;
  esac
}

last_field() {  # the FIELD of the newest line of gpu.jsonl
  python3 -c "import json, sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])[sys.argv[2]])" "$results" "$1"
}

environment() {
  say "mode $mode, output $out"
  { nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv; } >>"$log" 2>&1
  step versions 60 python3 -c "
import jax, flax, optax, orbax.checkpoint, grain, jaxdit
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'grain', grain.__version__)
print(jax.devices())"
}

targets() {
  attention=auto
  # cuDNN's flash attention against XLA's, forward and backward, in bfloat16; XLA's attention if it fails.
  JAX_PLATFORMS=$gpu_platform step cudnn_tests 90 python3 -m pytest -q -n 0 -p no:cacheprovider tests/test_attention.py \
    -k "cudnn" || { attention=xla; say "cuDNN attention failed its tests: the benchmarks use --attention xla"; }

  # MFU: DiT-XL width on 16x32x32x4 latents (4096 tokens) with text; the profile says where the time goes.
  local xl_mfu=(python3 benchmarks/train.py "${xl_text[@]}" --num-frames "$xl_frames" --size "$xl_size"
    --batch-size "$xl_batch" --attention "$attention" --steps "$steps" --warmup 2 --profile "$out/prof_xl" --out "$results")
  step_fitting xl_mfu 330 "${xl_mfu[@]}"
  step xl_profile 60 python3 benchmarks/profile_summary.py "$out/prof_xl" --top 25
  rm -rf "$out/prof_xl"

  # Images/s: class-conditional DiT-XL/2 at 256x256 (32x32x4 latents, 256 tokens).
  dit=(--config configs/dit_xl2_256.py --latents --num-frames 1 --size "$dit_size" --dtype bfloat16 --scan-layers)
  [ "${DRY_RUN:-0}" = 1 ] && dit+=(--model.variant tiny/1x2x2)
  step_fitting dit_xl2_256 270 python3 benchmarks/train.py "${dit[@]}" --batch-size "$dit_batch" --steps "$steps" \
    --out "$results"

  # Latency: one guided 16x256x256 video, 50 Euler steps at XL width, SD-VAE decode included.
  step xl_sample 270 python3 benchmarks/sample.py --config configs/shapes.py --model.variant "$xl" --sd-vae \
    --num-frames "$vae_frames" --size "$vae_size" --dtype bfloat16 --attention "$attention" --steps 50 --cfg-scale 4 \
    --batch-size 1 --out "$results"
}

# The XL compile time unrolled and the longest clip it trains on, from compiled programs alone (no
# GPU work but the compiler's autotuning): run beside the shapes training, on the host's other cores.
compiled_figures() {
  for frames in $clip_frames; do  # 32x32x4 latents: 256 tokens a frame
    step "xl_memory_${frames}_frames" 300 python3 benchmarks/train.py "${xl_text[@]}" --num-frames "$frames" \
      --size "$xl_size" --batch-size 1 --remat full --compile-only --out "$results" || break
  done
  step xl_compile_unrolled 420 python3 benchmarks/train.py "${xl_unrolled[@]}" --num-frames "$xl_frames" \
    --size "$xl_size" --batch-size "$xl_batch" --compile-only --out "$results"
}

shapes_run() {
  local budget=$1 step_s train_steps
  # The step time of this config on this GPU decides how many steps fit in the budget.
  step shapes_step 150 python3 benchmarks/train.py --config configs/shapes.py --batch-size "$shapes_batch" \
    --steps "$steps" "${shapes[@]}" --out "$results" || return 1
  step_s=$(last_field step_time_s)
  # About 90 s go to compiling, the final samples and judging; the loader and logging cost ~15% of a step.
  train_steps=$(python3 -c "print(max(int(($budget - 90) / ($step_s * 1.15)), 20))")
  say "shapes: ${step_s}s a step, so $train_steps steps in ${budget}s"
  compiled_figures &
  local beside=$!
  # Short-run settings: warm-up and EMA scaled to the run (the config's 1000 and 0.9999 fit 50000 steps);
  # checkpoints and samples only at the end; one loader worker per spare core.
  step shapes_train $((budget + 120)) python3 train.py --config configs/shapes.py --workdir "$run_dir" "${shapes[@]}" \
    --train.batch_size "$shapes_batch" --train.steps "$train_steps" --train.warmup_steps $((train_steps / 10 + 1)) --train.ema_decay 0.999 \
    --train.checkpoint_every "$train_steps" --sample.every 0 --sample.judge_prompts "$judge" --data.num_workers 10
  wait $beside
  step shapes_judge 150 python3 benchmarks/prompt_adherence.py --workdir "$run_dir" --num-prompts "$judge" \
    --cfg-scale 2 4 --save "$out/shapes_judged.png"
  cp "$run_dir/metrics.jsonl" "$out/shapes_metrics.jsonl" 2>/dev/null
  cp "$(ls "$run_dir"/samples/step_*.png | tail -1)" "$out/shapes_samples.png" 2>/dev/null
  # One real step of the longest clip that is cheap to run (the longer ones were only compiled).
  step "xl_train_${run_frames}_frames" 300 python3 benchmarks/train.py "${xl_text[@]}" --num-frames "$run_frames" \
    --size "$xl_size" --batch-size 1 --remat full --steps 1 --warmup 0 --out "$results"
}

environment
case $mode in
  targets) targets ;;
  shapes) shapes_run "$seconds" ;;
  all) targets; shapes_run "$seconds" ;;
  *) echo "unknown mode $mode: targets, shapes or all" >&2; exit 2 ;;
esac
say "done"
python3 - "$results" <<'EOF' | tee -a "$log"
import json, sys
keys = ("benchmark", "variant", "batch_size", "tokens_per_sample", "remat", "scan_layers", "attention", "compile_s",
        "step_time_s", "samples_per_s", "seconds_per_call", "mfu", "memory_per_device_bytes", "peak_memory_bytes")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(" ".join(f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}" for k in keys if k in r))
EOF
