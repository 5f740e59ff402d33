#!/usr/bin/env bash
# The reference command, with its hyperparameters from environment variables (defaults: the reference values).
# Run it once per node; flags given to this script are appended to the trainer's.
#
#   OUTPUT_DIR=/shared/controlnet-tile SHARDS="/data/laion400m-data/{00000..10200}.tar" scripts/train_laion.sh
#
# Multi-node: NUM_MACHINES, MACHINE_RANK and MASTER_ADDR (scripts/train_slurm.sbatch sets them). The launch is
# elastic (c10d rendezvous, MAX_RESTARTS restarts): a rank that dies restarts the whole group, which resumes from
# the newest complete checkpoint. It runs under scripts/preemptible.sh: a stop signal saves a checkpoint and exits 0.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)  # relative paths in the variables stay relative to where this is run

MODEL_NAME=${MODEL_NAME:-lambdalabs/miniSD-diffusers}
OUTPUT_DIR=${OUTPUT_DIR:-controlnet-tile}
SHARDS=${SHARDS:-/data/laion400m-data/{00000..10200\}.tar}
MAX_STEPS=${MAX_STEPS:-10000}
MAX_TRAIN_SAMPLES=${MAX_TRAIN_SAMPLES:-80000000}
LR=${LR:-1e-5}
BS=${BS:-32}                                   # per GPU
GRAD_ACCUM=${GRAD_ACCUM:-1}
PROMPT_DROPOUT=${PROMPT_DROPOUT:-0.05}
RESOLUTION=${RESOLUTION:-256}
CONDITION_RESOLUTION=${CONDITION_RESOLUTION:-64}
NUM_WORKERS=${NUM_WORKERS:-8}                  # dataloader workers per GPU
MIXED_PRECISION=${MIXED_PRECISION:-fp16}
REPORT_TO=${REPORT_TO:-wandb}
TRACKER_PROJECT=${TRACKER_PROJECT:-controlnet}
VALIDATION_STEPS=${VALIDATION_STEPS:-100}
CHECKPOINTING_STEPS=${CHECKPOINTING_STEPS:-1000}
CHECKPOINTS_TOTAL_LIMIT=${CHECKPOINTS_TOTAL_LIMIT:-10}
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}  # per node
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-3}
[ "$NUM_GPUS" -ge 1 ] || { echo "train_laion.sh: no GPU found; set NUM_GPUS" >&2; exit 2; }

# torchrun shares one rendezvous store across restarts by default; a restarted rank can then read the dead rank's
# address from the first attempt and the restart fails. A fresh store per restart avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

cmd=(
  "$repo/scripts/preemptible.sh"
  accelerate launch --multi_gpu --num_machines "$NUM_MACHINES" --num_processes $((NUM_GPUS * NUM_MACHINES))
  --machine_rank "$MACHINE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
  --rdzv_backend c10d --max_restarts "$MAX_RESTARTS" --mixed_precision "$MIXED_PRECISION" --dynamo_backend no
  "$repo/train_controlnet.py"
  --pretrained_model_name_or_path="$MODEL_NAME"
  --output_dir="$OUTPUT_DIR"
  --condition_resolution="$CONDITION_RESOLUTION" --resolution="$RESOLUTION"
  --learning_rate="$LR" --max_train_steps="$MAX_STEPS" --max_train_samples="$MAX_TRAIN_SAMPLES"
  --dataloader_num_workers="$NUM_WORKERS" --train_shards_path_or_url="$SHARDS"
  --validation_image "$repo/conditioning_image_1.png" "$repo/conditioning_image_2.jpeg"
  --validation_prompt "a dog sitting on the grass" "home office" --validation_steps="$VALIDATION_STEPS"
  --checkpointing_steps="$CHECKPOINTING_STEPS" --checkpoints_total_limit="$CHECKPOINTS_TOTAL_LIMIT"
  --train_batch_size="$BS" --gradient_checkpointing --enable_xformers_memory_efficient_attention
  --gradient_accumulation_steps="$GRAD_ACCUM" --use_8bit_adam --resume_from_checkpoint=latest
  --mixed_precision="$MIXED_PRECISION" --tracker_project_name="$TRACKER_PROJECT" --report_to="$REPORT_TO"
  --proportion_empty_prompts "$PROMPT_DROPOUT"
  "$@"
)
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
