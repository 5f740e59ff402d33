#!/usr/bin/env python
# coding=utf-8
"""Train a ControlNet *tile* model on WebDataset shards (img2dataset / LAION layout).

An adaptation of diffusers' `examples/controlnet/train_controlnet.py`: same flags, same loop, same output layout.
What differs: data comes from tar shards instead of HF datasets, and the conditioning image is made from the
training image itself, downsampled to `--condition_resolution` and upsampled back to `--resolution`.
"""

import argparse
import gc
import io
import itertools
import logging
import math
import os
import random
import re
import shutil
from datetime import timedelta
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fast tokenizers in forked workers can deadlock

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

logger = logging.getLogger(__name__)

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "text", "caption")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SHUFFLE_BUFFER = 1000  # raw (undecoded) samples per worker, ~30 MB for LAION jpgs


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Train a ControlNet tile model on WebDataset shards.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default="lambdalabs/miniSD-diffusers",
        help="Path to a pretrained SD-1.x model folder or hub identifier.",
    )
    parser.add_argument(
        "--controlnet_model_name_or_path",
        type=str,
        default=None,
        help="Path or hub identifier of a ControlNet to start from. If not set, it is initialised from the UNet.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the hub.")
    parser.add_argument(
        "--variant", type=str, default=None, help="Variant of the model files of the pretrained model, e.g. fp16."
    )
    parser.add_argument(
        "--tokenizer_name", type=str, default=None, help="Pretrained tokenizer name or path if not the model's own."
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default="controlnet-model",
        help="Where checkpoints, validation grids and the final ControlNet are written.",
    )
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models are stored.")
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument(
        "--resolution",
        type=int,
        default=256,
        help="Target resolution: each training image is resized so its short side is this, then randomly cropped"
        " to a square of this size. Must be divisible by 8.",
    )
    parser.add_argument(
        "--condition_resolution",
        type=int,
        default=64,
        help="Tile condition: the target crop is downsampled to this size and upsampled back to --resolution."
        " Validation images larger than this are reduced to it the same way.",
    )
    parser.add_argument(
        "--interpolation",
        type=str,
        default="bicubic",
        choices=sorted(INTERPOLATIONS),
        help="PIL filter used for every resize (target and condition).",
    )
    parser.add_argument(
        "--train_shards_path_or_url",
        type=str,
        default=None,
        help="WebDataset shard spec: local paths or URLs with brace ranges, e.g."
        " '/data/laion400m-data/{00000..10200}.tar', 'pipe:aws s3 cp s3://b/{0..9}.tar -', several joined by '::'.",
    )
    parser.add_argument(
        "--train_batch_size", type=int, default=4, help="Batch size (per device) for the training dataloader."
    )
    parser.add_argument("--num_train_epochs", type=int, default=1, help="Epochs to train if --max_train_steps is unset.")
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total number of optimisation steps. If provided, overrides --num_train_epochs.",
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save the training state to output_dir/checkpoint-N every N steps; resume with --resume_from_checkpoint.",
    )
    parser.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to keep."
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Resume from a checkpoint directory saved by --checkpointing_steps, or 'latest' for the newest one in"
        " output_dir (none yet: start a new run).",
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Number of batches to accumulate before each optimisation step.",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Use gradient checkpointing in the ControlNet to save memory at the expense of a slower backward pass.",
    )
    parser.add_argument("--learning_rate", type=float, default=5e-6, help="Learning rate after warmup.")
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        default=False,
        help="Scale the learning rate by the number of GPUs, gradient accumulation steps and batch size.",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='One of ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"].',
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup steps of the lr scheduler.")
    parser.add_argument(
        "--lr_num_cycles", type=int, default=1, help="Number of hard resets in the cosine_with_restarts scheduler."
    )
    parser.add_argument("--lr_power", type=float, default=1.0, help="Power factor of the polynomial scheduler.")
    parser.add_argument("--use_8bit_adam", action="store_true", help="Use bitsandbytes' 8-bit AdamW.")
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Dataloader worker processes per rank; 0 loads in the main process. Shards are split across ranks and"
        " workers.",
    )
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="The beta1 parameter for the Adam optimizer.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="The beta2 parameter for the Adam optimizer.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Weight decay to use.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-08, help="Epsilon value for the Adam optimizer.")
    parser.add_argument("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    parser.add_argument("--push_to_hub", action="store_true", help="Push the final model to the Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="The token to use to push to the Hub.")
    parser.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository to keep in sync with output_dir."
    )
    parser.add_argument(
        "--logging_dir", type=str, default="logs", help="TensorBoard log directory, relative to output_dir."
    )
    parser.add_argument(
        "--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs (faster training)."
    )
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='Trackers: "tensorboard" (default), "wandb", "comet_ml", several comma-separated, "all" or "none".',
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; defaults to the accelerate config. fp16 needs a CUDA GPU.",
    )
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers attention where it runs on this device; otherwise warn once and keep PyTorch SDPA.",
    )
    parser.add_argument(
        "--set_grads_to_none", action="store_true", help="Set grads to None instead of zero to save memory."
    )
    parser.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Samples in one epoch (the shards are streamed, so this sets the epoch length:"
        " epoch steps = max_train_samples / (train_batch_size * num_processes * gradient_accumulation_steps)).",
    )
    parser.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0,
        help="Proportion of captions replaced with the empty string (for classifier-free guidance).",
    )
    parser.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        nargs="+",
        help="Prompts evaluated every --validation_steps: as many as --validation_image, or one for all images.",
    )
    parser.add_argument(
        "--validation_image",
        type=str,
        default=None,
        nargs="+",
        help="Conditioning images for validation: as many as --validation_prompt, or one for all prompts. Each is"
        " turned into a condition exactly as training images are.",
    )
    parser.add_argument(
        "--num_validation_images", type=int, default=4, help="Images generated per validation image/prompt pair."
    )
    parser.add_argument("--validation_steps", type=int, default=100, help="Run validation every X steps.")
    parser.add_argument(
        "--tracker_project_name",
        type=str,
        default="train_controlnet",
        help="The project name passed to Accelerator.init_trackers (the wandb project).",
    )
    parser.add_argument(
        "--ddp_timeout",
        type=int,
        default=7200,
        help="Seconds a rank may wait in a collective (e.g. while rank 0 validates or saves) before aborting.",
    )

    args = parser.parse_args(input_args)
    check_args(args, parser.error)
    return args


def check_args(args, error):
    """Reject bad input with one clear line before anything heavy is loaded."""
    if args.train_shards_path_or_url is None:
        error("--train_shards_path_or_url is required")
    if args.resolution % 8 != 0:
        error("--resolution must be divisible by 8 (the VAE and ControlNet encoders downsample by 8)")
    if not 0 < args.condition_resolution <= args.resolution:
        error(f"--condition_resolution must be in (0, --resolution={args.resolution}]")
    if not 0 <= args.proportion_empty_prompts <= 1:
        error("--proportion_empty_prompts must be in the range [0, 1]")
    if args.max_train_steps is None and args.max_train_samples is None:
        error("set --max_train_steps or --max_train_samples: a stream of shards has no length of its own")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps"):
        if getattr(args, name) < 1:
            error(f"--{name} must be >= 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        error("--max_train_steps must be >= 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        error("--checkpoints_total_limit must be >= 1")
    if args.dataloader_num_workers < 0:
        error("--dataloader_num_workers must be >= 0")
    if (args.validation_prompt is None) != (args.validation_image is None):
        error("--validation_prompt and --validation_image must be given together")
    if args.validation_image is not None:
        n_img, n_prompt = len(args.validation_image), len(args.validation_prompt)
        if n_img != 1 and n_prompt != 1 and n_img != n_prompt:
            error("give 1 --validation_image, 1 --validation_prompt, or as many of each")
        for path in args.validation_image:
            if not os.path.isfile(path):
                error(f"--validation_image not found: {path}")
    if args.hub_token is not None and "wandb" in args.report_to:
        error("--hub_token cannot be used with --report_to=wandb (it would expose the token); use `hf auth login`")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        error("--mixed_precision=fp16 needs a CUDA GPU; use --mixed_precision=no or bf16 on this machine")
    if args.resume_from_checkpoint not in (None, "latest"):
        if resolve_checkpoint(args.resume_from_checkpoint, args.output_dir) is None:
            error(f"--resume_from_checkpoint: no checkpoint at {args.resume_from_checkpoint}")
    urls = wds.shardlists.expand_urls(args.train_shards_path_or_url)
    local = [u.removeprefix("file:") for u in urls if not u.startswith("pipe:") and "://" not in u]
    if urls and len(local) == len(urls) and not any(os.path.isfile(u) for u in local):
        error(f"no shard of --train_shards_path_or_url exists: {args.train_shards_path_or_url}")


# ----------------------------------------------------------------------------------------------------------------
# Tile pairs: one place that turns an image into (target, condition), used by training and validation alike


def square_crop(image, size, interpolation, rng=None):
    """Resize so the short side is `size`, then crop a size x size square (random with `rng`, else centred)."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), interpolation)
    left = rng.randint(0, new_w - size) if rng else (new_w - size) // 2
    top = rng.randint(0, new_h - size) if rng else (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def tile_condition(image, condition_resolution, interpolation):
    """The tile condition: the image reduced to condition_resolution and enlarged back to its own size."""
    small = image.resize((condition_resolution, condition_resolution), interpolation)
    return small.resize(image.size, interpolation)


def to_rgb(image):
    """RGB with transparency composited onto white, so transparent pixels read as paper, not their hidden colour."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def decode_image(data, resolution):
    """Decode image bytes to RGB, refusing decompression bombs from their header alone."""
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"image of {image.width}x{image.height} px is over PIL's limit")
    image.draft("RGB", (resolution, resolution))  # JPEG only: decode at 1/2..1/8 scale when that is still enough
    return to_rgb(image)


def image_to_tensor(image):
    """PIL RGB -> float CHW tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def make_tile_pair(sample, tokenizer, resolution, condition_resolution, interpolation, proportion_empty_prompts):
    """One raw webdataset sample -> model inputs: target in [-1, 1], condition in [0, 1], caption token ids."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_KEYS)})")
    caption_key = next((k for k in CAPTION_KEYS if k in sample), None)
    caption = sample[caption_key].decode("utf-8", errors="replace").strip() if caption_key else ""
    if random.random() < proportion_empty_prompts:
        caption = ""
    filt = INTERPOLATIONS[interpolation]
    target = square_crop(decode_image(sample[image_key], resolution), resolution, filt, rng=random)
    condition = tile_condition(target, condition_resolution, filt)
    input_ids = tokenizer(
        caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids[0]
    return {
        "pixel_values": image_to_tensor(target) * 2.0 - 1.0,
        "conditioning_pixel_values": image_to_tensor(condition),
        "input_ids": input_ids,
        "key": sample["__key__"],
    }


def collate_fn(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "conditioning_pixel_values": torch.stack([e["conditioning_pixel_values"] for e in examples]),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "keys": [e["key"] for e in examples],
    }


# ----------------------------------------------------------------------------------------------------------------
# Data pipeline


def warn_and_continue(exn):
    logger.warning(f"skipping bad data: {exn!r}")
    return True


def consumer_samples(urls, seed, start_step):
    """Endless, shuffled stream of raw samples for this (rank, dataloader worker).

    Shards are dealt round-robin to the ranks x workers consumers; with fewer shards than consumers every consumer
    reads all shards and keeps every N-th sample instead. Each consumer cycles through its part forever, so every
    rank can run the same number of steps and none waits on another that ran dry. Each cycle is one pass: shard
    order and the shuffle buffer are renewed per cycle, so no sample repeats within a pass. The seed includes the
    step the run (re)started from, so a resumed run does not replay the samples it began with.
    """
    rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
    consumers, me = world_size * num_workers, rank * num_workers + worker
    by_shard = len(urls) >= consumers
    mine = urls[me::consumers] if by_shard else list(urls)
    for cycle in itertools.count():
        # In by-sample mode all consumers must read in the same order, so `me` stays out of that seed.
        rng = random.Random(f"{seed}-{start_step}-{cycle}-{me if by_shard else 'all'}")
        order = rng.sample(mine, len(mine))
        samples = wds.tarfile_samples([{"url": u} for u in order], handler=warn_and_continue)
        if not by_shard:
            samples = (s for i, s in enumerate(samples) if i % consumers == me)
        used = 0
        for sample in wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER // 10, rng=rng)(samples):
            used += 1
            yield sample
        if used == 0:
            raise RuntimeError(f"no readable sample in the shards of consumer {me}: {order[:3]}...")


def make_train_dataloader(args, tokenizer, start_step=0):
    """open_clip-style pipeline: this consumer's shuffled raw samples -> tile pairs -> batches."""
    urls = wds.shardlists.expand_urls(args.train_shards_path_or_url)
    seed = 0 if args.seed is None else args.seed
    to_pair = partial(
        make_tile_pair,
        tokenizer=tokenizer,
        resolution=args.resolution,
        condition_resolution=args.condition_resolution,
        interpolation=args.interpolation,
        proportion_empty_prompts=args.proportion_empty_prompts,
    )
    pipeline = wds.DataPipeline(
        partial(consumer_samples, urls, seed, start_step),
        wds.map(to_pair, handler=warn_and_continue),
        wds.batched(args.train_batch_size, collation_fn=collate_fn, partial=False),
    )
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,  # batched in the pipeline
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.dataloader_num_workers > 0,
        prefetch_factor=4 if args.dataloader_num_workers > 0 else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Validation


def validation_pairs(args):
    images, prompts = args.validation_image, args.validation_prompt
    if len(images) == 1:
        images = images * len(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(images)
    return list(zip(images, prompts))


def validation_condition(path, args):
    """A validation image becomes a condition the way a training image does (centre crop instead of random)."""
    filt = INTERPOLATIONS[args.interpolation]
    image = square_crop(to_rgb(Image.open(path)), args.resolution, filt)
    return tile_condition(image, args.condition_resolution, filt)


def image_grid(rows):
    """rows: lists of equally sized PIL images -> one image, one row per list."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * w, y * h))
    return grid


def log_validation(vae, text_encoder, tokenizer, unet, controlnet, noise_scheduler, args, accelerator, weight_dtype,
                   step, is_final_validation=False):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    logger.info(f"Running validation at step {step}...")
    # Sample from a plain copy in the frozen modules' dtype, as upstream's final validation does: no CUDA-only
    # autocast, no accelerate fp32-output wrapper, and the fp32 weights being trained stay untouched.
    controlnet_copy = ControlNetModel.from_config(controlnet.config)
    controlnet_copy.load_state_dict(controlnet.state_dict())
    controlnet_copy.set_attn_processor(controlnet.attn_processors)
    controlnet = controlnet_copy.to(accelerator.device, dtype=weight_dtype).eval()
    pipeline = StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler=UniPCMultistepScheduler.from_config(noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(0 if args.seed is None else args.seed)

    image_logs = []
    for path, prompt in validation_pairs(args):
        condition = validation_condition(path, args)
        with torch.no_grad():
            images = pipeline(
                [prompt] * args.num_validation_images,
                condition,
                num_inference_steps=20,
                generator=generator,
                height=args.resolution,
                width=args.resolution,
            ).images
        image_logs.append({"validation_image": condition, "images": images, "validation_prompt": prompt})

    grid = image_grid([[log["validation_image"]] + log["images"] for log in image_logs])
    grid_dir = Path(args.output_dir, "validation")
    grid_dir.mkdir(parents=True, exist_ok=True)
    grid.save(grid_dir / (f"final-{step:06d}.png" if is_final_validation else f"step-{step:06d}.png"))

    tracker_key = "test" if is_final_validation else "validation"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for log in image_logs:
                stack = np.stack([np.asarray(im) for im in [log["validation_image"]] + log["images"]])
                tracker.writer.add_images(f"{tracker_key}/{log['validation_prompt']}", stack, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            formatted = []
            for log in image_logs:
                formatted.append(wandb.Image(log["validation_image"], caption="ControlNet tile condition"))
                formatted.extend(wandb.Image(im, caption=log["validation_prompt"]) for im in log["images"])
            tracker.log({tracker_key: formatted}, step=step)
        else:
            logger.warning(f"image logging not implemented for {tracker.name}")

    del pipeline
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return image_logs


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(output_dir):
    """Complete checkpoints in output_dir as [(step, path)], oldest first. Other names are ignored."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, d)) for d in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(d))]
    return sorted(found)


def resolve_checkpoint(spec, output_dir):
    """'latest' or a path (or a checkpoint name inside output_dir) -> (step, path), or None."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    for path in (spec, os.path.join(output_dir, spec)):
        m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
        if m and os.path.isdir(path):
            return int(m.group(1)), path
    return None


def save_checkpoint(accelerator, args, step):
    """Write checkpoint-N under a temporary name and rename it when complete, then prune old ones."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    partial_path = os.path.join(args.output_dir, f".checkpoint-{step}.partial")
    shutil.rmtree(partial_path, ignore_errors=True)
    accelerator.save_state(partial_path)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial_path, final)
    logger.info(f"Saved state to {final}")
    if args.checkpoints_total_limit is not None:
        for _, old in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
            logger.info(f"removing checkpoint {old} (--checkpoints_total_limit={args.checkpoints_total_limit})")
            shutil.rmtree(old)


def save_model_card(output_dir, base_model, image_logs=None, repo_id=None):
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    img_str = ""
    for i, log in enumerate(image_logs or []):
        image_grid([[log["validation_image"]] + log["images"]]).save(os.path.join(output_dir, f"images_{i}.png"))
        img_str += f"prompt: {log['validation_prompt']}\n\n![images_{i}](./images_{i}.png)\n\n"
    description = f"""
# controlnet-tile {repo_id or ''}

ControlNet **tile** weights trained on {base_model}: the condition is the image reduced to a low resolution and
enlarged back, so the model learns to add detail that follows the low-resolution layout (upscaling / re-detailing).
Each row below shows the condition, then generated images.

{img_str}
"""
    # Built from diffusers' template directly: its loader would look the card up on the hub first.
    card = ModelCard.from_template(
        ModelCardData(license="creativeml-openrail-m", library_name="diffusers", inference=True, base_model=base_model),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=description,
    )
    tags = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "controlnet",
            "controlnet-tile", "diffusers-training"]
    populate_model_card(card, tags=tags).save(os.path.join(output_dir, "README.md"))


# ----------------------------------------------------------------------------------------------------------------
# Models


def enable_xformers(models, device):
    """Switch models to xformers attention if its kernels really run on `device`; else warn once and keep SDPA."""
    try:
        import xformers.ops

        q = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        xformers.ops.memory_efficient_attention(q, q, q)
        for model in models:
            model.enable_xformers_memory_efficient_attention()
        logger.info("Using xformers memory-efficient attention")
        return True
    except Exception as exn:  # missing package, no kernels for this device, or a torch/xformers build mismatch
        logger.warning(f"xformers attention unavailable on {device.type} ({type(exn).__name__}); using PyTorch SDPA")
        return False


def load_models(args):
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(
        args.tokenizer_name or args.pretrained_model_name_or_path,
        subfolder=None if args.tokenizer_name else "tokenizer",
        use_fast=False,
        **common,
    )
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler", **common)
    text_encoder = CLIPTextModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="text_encoder", variant=args.variant, **common
    )
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **common)
    unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", variant=args.variant, **common
    )
    if args.controlnet_model_name_or_path:
        logger.info("Loading existing controlnet weights")
        controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path, cache_dir=args.cache_dir)
    else:
        logger.info("Initializing controlnet weights from unet")
        controlnet = ControlNetModel.from_unet(unet)
    return tokenizer, noise_scheduler, text_encoder, vae, unet, controlnet


# ----------------------------------------------------------------------------------------------------------------
# Training


def main(args):
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
    from diffusers import ControlNetModel
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to.split(","),
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
    )
    logger.info(str(accelerator.state).replace("\n", " | "))
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()

    if args.seed is not None:
        set_seed(args.seed, device_specific=True)  # otherwise every rank draws the same crops, noise and timesteps

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        repo_id = None
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(
                repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id

    tokenizer, noise_scheduler, text_encoder, vae, unet, controlnet = load_models(args)

    def unwrap_model(model):
        model = accelerator.unwrap_model(model)
        return getattr(model, "_orig_mod", model)

    # Checkpoints hold the ControlNet in diffusers format (controlnet/) next to accelerate's optimizer/RNG state.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                unwrap_model(model).save_pretrained(os.path.join(output_dir, "controlnet"))
            weights.clear()  # saved above; accelerate must not save them again

    def load_model_hook(models, input_dir):
        while models:
            model = models.pop()
            loaded = ControlNetModel.from_pretrained(input_dir, subfolder="controlnet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    controlnet.train()

    if args.enable_xformers_memory_efficient_attention:
        enable_xformers([unet, controlnet], accelerator.device)
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    if unwrap_model(controlnet).dtype != torch.float32:
        raise ValueError(f"ControlNet loaded as {unwrap_model(controlnet).dtype}; trainable weights must be float32")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes

    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("To use 8-bit Adam, install bitsandbytes: `pip install bitsandbytes`.")
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(
        controlnet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # Epoch length comes from --max_train_samples, as in diffusers' webdataset scripts.
    samples_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if args.max_train_samples is not None:
        num_update_steps_per_epoch = max(1, math.ceil(args.max_train_samples / samples_per_step))
    else:
        num_update_steps_per_epoch = args.max_train_steps
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    # A prepared scheduler steps once per process per optimisation step (upstream convention, diffusers#8312).
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device, dtype=weight_dtype)
    unet.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)

    if accelerator.is_main_process:
        # Trackers get every setting but secrets; tensorboard cannot store lists.
        tracker_config = {k: v for k, v in vars(args).items() if k not in ("hub_token", "validation_prompt", "validation_image")}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    global_step = 0
    if args.resume_from_checkpoint:
        found = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if found is None:
            accelerator.print(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
        else:
            global_step, path = found
            accelerator.print(f"Resuming from checkpoint {path}")
            accelerator.load_state(path)

    # The loader is kept out of accelerator.prepare: each rank reads its own shards (see consumer_samples) instead
    # of rank 0 reading for everyone and broadcasting.
    train_dataloader = make_train_dataloader(args, tokenizer, start_step=global_step)
    batches = iter(train_dataloader)

    logger.info("***** Running training *****")
    logger.info(f"  Shards = {len(wds.shardlists.expand_urls(args.train_shards_path_or_url))}")
    logger.info(f"  Num Epochs = {args.num_train_epochs} of {num_update_steps_per_epoch} steps")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {samples_per_step}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}, starting at {global_step}")
    if global_step >= args.max_train_steps:
        logger.info(f"Checkpoint is already at step {global_step} >= --max_train_steps; no more training steps")

    progress_bar = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,  # once per machine
    )
    image_logs = None
    while global_step < args.max_train_steps:
        batch = next(batches)
        with accelerator.accumulate(controlnet):
            pixel_values = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype, non_blocking=True)
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor

            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
            noisy_latents = noise_scheduler.add_noise(latents.float(), noise.float(), timesteps).to(dtype=weight_dtype)

            encoder_hidden_states = text_encoder(batch["input_ids"].to(accelerator.device), return_dict=False)[0]
            controlnet_image = batch["conditioning_pixel_values"].to(accelerator.device, dtype=weight_dtype)

            down_block_res_samples, mid_block_res_sample = controlnet(
                noisy_latents,
                timesteps,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=controlnet_image,
                return_dict=False,
            )
            model_pred = unet(
                noisy_latents,
                timesteps,
                encoder_hidden_states=encoder_hidden_states,
                down_block_additional_residuals=[s.to(dtype=weight_dtype) for s in down_block_res_samples],
                mid_block_additional_residual=mid_block_res_sample.to(dtype=weight_dtype),
                return_dict=False,
            )[0]

            if noise_scheduler.config.prediction_type == "epsilon":
                target = noise
            elif noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")

            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(controlnet.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=args.set_grads_to_none)

        if not accelerator.sync_gradients:
            continue
        progress_bar.update(1)
        global_step += 1

        if accelerator.is_main_process:
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, global_step)
            if args.validation_prompt is not None and global_step % args.validation_steps == 0:
                image_logs = log_validation(
                    vae, text_encoder, tokenizer, unet, unwrap_model(controlnet), noise_scheduler, args,
                    accelerator, weight_dtype, global_step,
                )

        logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
        progress_bar.set_postfix(**logs)
        accelerator.log({**logs, "epoch": global_step // num_update_steps_per_epoch}, step=global_step)
    progress_bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrap_model(controlnet).save_pretrained(args.output_dir)
        logger.info(f"Saved the ControlNet to {args.output_dir}")

        image_logs = None
        if args.validation_prompt is not None:
            # Validate what was written to disk, so a broken save shows up here rather than in the user's hands.
            image_logs = log_validation(
                vae, text_encoder, tokenizer, unet, ControlNetModel.from_pretrained(args.output_dir), noise_scheduler, args,
                accelerator, weight_dtype, global_step, is_final_validation=True,
            )
        save_model_card(args.output_dir, args.pretrained_model_name_or_path, image_logs, repo_id)
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=["step_*", "epoch_*", "checkpoint-*", ".checkpoint-*", "logs/*"],
                token=args.hub_token,
            )

    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean teardown avoids gloo's rare abort at exit


if __name__ == "__main__":
    main(parse_args())
