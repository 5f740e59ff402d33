#!/usr/bin/env bash
# Quickstart, offline and on CPU: venv, a tiny SD-1.x pipeline, real-photo shards, then a short ControlNet-tile
# training run through `accelerate launch`, with validation grids, checkpoints and tensorboard logs.
set -euo pipefail
cd "$(dirname "$0")/.."
QS=${QUICKSTART_DIR:-quickstart}
STEPS=${MAX_TRAIN_STEPS:-300}

bash tools/setup_env.sh
.venv/bin/python tools/make_tiny_pipeline.py --output_dir "$QS/tiny-sd" --skip_verify
.venv/bin/python tools/make_shards.py --output_dir "$QS/shards" --num_shards 8 --samples_per_shard 64

export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1
.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_controlnet.py \
  --pretrained_model_name_or_path="$QS/tiny-sd" \
  --output_dir="$QS/controlnet-tile" \
  --train_shards_path_or_url="$QS/shards/{00000..00007}.tar" \
  --resolution=64 --condition_resolution=16 \
  --train_batch_size=8 --learning_rate=1e-3 --lr_warmup_steps=0 --max_train_steps="$STEPS" \
  --dataloader_num_workers=1 --seed=0 \
  --checkpointing_steps=100 --checkpoints_total_limit=2 --resume_from_checkpoint=latest \
  --validation_image ./conditioning_image_1.png ./conditioning_image_2.jpeg \
  --validation_prompt "a dog sitting on the grass" "home office" \
  --validation_steps=100 --num_validation_images=2 \
  --report_to=tensorboard --proportion_empty_prompts=0.05 "$@"

echo
echo "Done. Look at:"
echo "  $QS/controlnet-tile/validation/*.png      validation grids (condition | samples, one row per prompt)"
echo "  $QS/controlnet-tile/                      final ControlNet (config.json + diffusion_pytorch_model.safetensors)"
echo "  .venv/bin/tensorboard --logdir $QS/controlnet-tile/logs   loss, lr and validation images"
