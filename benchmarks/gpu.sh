#!/usr/bin/env bash
# The GPU figures the issues ask for, in one short run on one accelerator:
#   - PPO training loop (rollout + update), lidar MLP, JAX backend: steps/s   (issue 5, goal >= 1e6)
#   - the JAX simulator alone, lidar (and camera): steps/s                     (issue 4, goal >= 1e6)
#   - pretraining step, bf16: samples/s and MFU, seed and ViT-B widths        (issue 3, goals 25% / 40%)
#   - PPO training loop, multimodal policy of the full pretraining config: steps/s (issue 5)
#   - the from-scratch Austria recipe, trained and evaluated end to end: wall time (issue 12,
#     goal <= 5 min)
#   - PPO training loop, multimodal policy over the seed config's encoders, frozen (features
#     reused by the update) and fine-tuned: steps/s (issue 13, goals >= 1e5 and >= 2e4)
#
#   bash benchmarks/gpu.sh [LOG]        # LOG defaults to gpu_bench.log
#
# Every step runs under its own time limit (seconds, GPU_STEP_S scales them) and a failure is
# logged and skipped, so one broken figure does not cost the others. SMALL=1 shrinks every size
# for a dry run on a CPU. The first lines record the device and the library versions.
set -u
LOG=${1:-gpu_bench.log}
PY=${PYTHON:-python3}
SCALE=${GPU_STEP_S:-1}
export PYTHONUNBUFFERED=1
export RACEFORMER_CACHE=${RACEFORMER_CACHE:-$(mktemp -d)}

if [ "${SMALL:-0}" = 1 ]; then
  ENVS_BIG=256; ENVS_HUGE=512; SIM_ENVS="256 512"; PRE_BS=2; PRE_STEPS=2; MM_ENVS=4; UPD=1
  PRE_CFG=configs/pretrain_tiny.toml; SCRATCH_MAX=(--set ppo.total_timesteps=16384
  --set "stages=[{name='contact', total_timesteps=16384, env={terminate_on_collision=false}}]")
else
  ENVS_BIG=16384; ENVS_HUGE=65536; SIM_ENVS="4096 16384 65536"; PRE_BS=64; PRE_STEPS=20
  MM_ENVS=256; UPD=4; PRE_CFG=configs/pretrain_cmht.toml; SCRATCH_MAX=()
fi
RUNS=$(mktemp -d)

step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$(( $2 * SCALE )); shift 2
  echo "=== $name (limit ${secs}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$secs" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $(( SECONDS - t0 ))s" | tee -a "$LOG"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"
} 2>&1 | tee -a "$LOG"

step ppo_lidar_${ENVS_BIG} 110 $PY -m benchmarks.ppo --num-envs "$ENVS_BIG" --num-steps 64 \
  --updates "$UPD" --set ppo.num_minibatches=4
step sim_lidar 100 $PY -m benchmarks.envs --envs $SIM_ENVS --steps 100
step pretrain_seed_vitb 170 $PY -m benchmarks.pretrain --config "$PRE_CFG" \
  --batch-size "$PRE_BS" --steps "$PRE_STEPS" --dtype bfloat16
step ppo_multimodal 120 $PY -m benchmarks.ppo --policy multimodal --pretrain-config "$PRE_CFG" \
  --num-envs "$MM_ENVS" --num-steps 32 --updates "$UPD"
step ppo_lidar_${ENVS_HUGE} 110 $PY -m benchmarks.ppo --num-envs "$ENVS_HUGE" --num-steps 64 \
  --updates "$UPD" --set ppo.num_minibatches=4
step pretrain_seed_cudnn 90 $PY -m benchmarks.pretrain --config "$PRE_CFG" --preset seed \
  --batch-size $(( PRE_BS * 4 )) --steps "$PRE_STEPS" --dtype bfloat16 \
  --set model.attention_impl=cudnn
step scratch_recipe_train 420 $PY -m rl.ppo --config configs/rl_austria_scratch.toml \
  --set "runs_dir='$RUNS'" "${SCRATCH_MAX[@]}"
step scratch_recipe_eval 300 $PY -m rl.evaluate --ckpt "$RUNS/ppo_austria_scratch/ckpt" \
  --tracks austria --episodes 10 --time-limit 160 --collision terminate --no-plots

# ---- issue 13 §2: the multimodal policy over the seed config's encoders (configs/pretrain_cmht.toml,
# random weights: the speed does not depend on them), whole PPO loop, Austria in the JAX backend.
# Goals on one H100: encoders frozen >= 1e5 policy steps/s (their features computed once per env
# step, reused by the update), fine-tuned >= 2e4 (encoders in every minibatch, forward and
# backward). Each prints policy_steps_per_s; the frozen one also the parts of an update
# (breakdown: sim, BEV adapter, encoder forward, update) in ms per policy step of all envs.
mm_policy_steps() {
  local fro=8192 fin=2048 mb=16
  if [ "${SMALL:-0}" = 1 ]; then fro=8; fin=4; mb=2; fi
  step ppo_mm_frozen 200 $PY -m benchmarks.ppo --policy multimodal --pretrain-config "$PRE_CFG" \
    --track austria --num-envs "$fro" --num-steps 32 --updates 2 --rounds 2 --breakdown \
    --set finetune.freeze_encoders=true --set ppo.num_minibatches=8
  step ppo_mm_finetuned 200 $PY -m benchmarks.ppo --policy multimodal --pretrain-config "$PRE_CFG" \
    --track austria --num-envs "$fin" --num-steps 32 --updates 2 --rounds 2 \
    --set finetune.freeze_encoders=false --set ppo.num_minibatches="$mb"
}
mm_policy_steps
# ---- end of issue 13 §2

echo "=== summary" | tee -a "$LOG"
grep -E '"policy"|"num_envs"|policy_steps_per_s"|physics_steps_per_s"|^jax  |MFU|rc=|  laps ' "$LOG"
