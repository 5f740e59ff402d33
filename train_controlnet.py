#!/usr/bin/env python
# coding=utf-8
"""Train a ControlNet *tile* model on WebDataset shards (img2dataset / LAION layout).

An adaptation of diffusers' `examples/controlnet/train_controlnet.py`: same flags, same loop, same output layout.
What differs: data comes from tar shards instead of HF datasets, and the conditioning image is made from the
training image itself, downsampled to `--condition_resolution` and upsampled back to `--resolution` (or, for real
low-resolution inputs, reduced by factors drawn from `--condition_scales` and degraded by `--condition_degradation`).
"""

import argparse
import atexit
import collections
import contextlib
import copy
import gc
import io
import itertools
import json
import logging
import math
import multiprocessing.util
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import zipfile
import zlib
from datetime import timedelta
from functools import lru_cache, partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fast tokenizers in forked workers can deadlock

import numpy as np
import psutil
import torch
import torch.nn.functional as F
import webdataset as wds
from webdataset.gopen import Pipe
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
TORCH_FILTERS = ("bilinear", "bicubic")  # filters with antialiased torch kernels; the others go through PIL
SHUFFLE_BUFFER = 1000  # raw (undecoded) samples per worker, ~30 MB for LAION jpgs
READ_AHEAD = 16  # raw samples a shard's reading thread may hold ready for its consumer
COMMAND_GRACE = 5  # seconds a `pipe:` command may take to exit once its tar has been read
END_OF_SHARD = object()
LIVE_READS = {}  # id -> source ({"url", "stream"}) of each shard this process is reading, for end_commands
TILE_CONFIG = "tile_config.json"  # how a saved ControlNet's conditions were made, for upscale.py


# ----------------------------------------------------------------------------------------------------------------
# Command line


def make_parser():
    parser = argparse.ArgumentParser(description="Train a ControlNet tile model on WebDataset shards.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default="lambdalabs/miniSD-diffusers",
        help="Path to a pretrained model folder or hub identifier: SD-1.x, SD-2.x or SDXL (the family is read from"
        " its UNet's config).",
    )
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="Path or hub identifier of a VAE to use instead of the base's, e.g. madebyollin/sdxl-vae-fp16-fix. Under"
        " fp16 an SDXL VAE whose config says force_upcast (the stock one overflows in fp16) stays float32.",
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
        "--condition_scales",
        type=float,
        nargs="+",
        default=None,
        metavar="FACTOR",
        help="Reduction factors of the condition, one drawn per sample (fractional ones too, e.g. 2 3 4 6 8): the"
        " condition is the target reduced by the factor and enlarged back to --resolution. Default: --resolution /"
        " --condition_resolution only. Validation and the held-out metrics keep --condition_resolution.",
    )
    parser.add_argument(
        "--condition_degradation",
        type=str,
        default="none",
        choices=sorted(DEGRADATIONS),
        help="Degrade the condition as real low-resolution images are: 'realesrgan' (Real-ESRGAN's two-stage blur,"
        " resize, noise and JPEG model), 'mild' (the same steps in StableSR's milder ranges) or 'none'. Runs on the"
        " training device; needs a bilinear or bicubic --interpolation.",
    )
    parser.add_argument(
        "--no_degradation_prob",
        type=float,
        default=0.0,
        help="With a --condition_degradation, the share of samples that keep the clean condition (the target reduced"
        " by its factor, nothing else): StableSR's no_degradation_prob (0.01 there), here a lever between fidelity to"
        " clean inputs and robustness to degraded ones.",
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
        help="Use gradient checkpointing in the ControlNet (and, for SDXL, in the frozen UNet, whose activations"
        " dominate its memory) to save memory at the expense of a slower backward pass.",
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
        "--use_fused_adam",
        action="store_true",
        help="Use torch's fused AdamW: one kernel for all parameters and no per-step host sync under fp16 (the fast"
        " path where its fp32 optimizer state fits; --use_8bit_adam saves that memory but syncs per tensor).",
    )
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
        "--logging_steps",
        type=int,
        default=10,
        help="Log loss (averaged over the interval and the ranks), lr, grad norm, throughput, data wait and data"
        " skip counts every X steps. Also how often a stop signal (SIGTERM/SIGUSR1) is checked.",
    )
    parser.add_argument(
        "--num_holdout_samples",
        type=int,
        default=8,
        help="Samples taken from the start of the first shard(s), held out from training, and evaluated at every"
        " validation: condition | output | ground truth grids, the condition-use gap and condition PSNR. 0 disables.",
    )
    parser.add_argument(
        "--min_image_size",
        type=int,
        default=None,
        help="Skip images whose original short side (json original_width/height, else the decoded size) is below"
        " this. Off by default; set it to --resolution to train only on real high-resolution targets.",
    )
    parser.add_argument(
        "--max_aspect_ratio",
        type=float,
        default=None,
        help="Skip images whose original long/short side ratio is above this (off by default).",
    )
    parser.add_argument(
        "--max_pwatermark",
        type=float,
        default=None,
        help="Skip samples whose LAION json pwatermark is above this (off by default; a missing field keeps the sample).",
    )
    parser.add_argument(
        "--max_punsafe",
        type=float,
        default=None,
        help="Skip samples whose LAION json punsafe is above this (off by default; a missing field keeps the sample).",
    )
    parser.add_argument(
        "--save_sample_keys",
        action="store_true",
        help="Append 'step consumer key' for every training sample to output_dir/sample_keys/rank-R.txt: an audit of"
        " which data each rank and dataloader worker trained on.",
    )
    parser.add_argument(
        "--channels_last",
        action="store_true",
        help="Use the channels_last memory format for the UNet, ControlNet and VAE (often faster on recent GPUs).",
    )
    parser.add_argument(
        "--torch_compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="Compile the UNet and ControlNet forward passes with torch.compile (default backend: inductor; slow"
        " first steps, then faster).",
    )
    parser.add_argument(
        "--resampled_shards",
        action="store_true",
        help="Draw each consumer's shards at random with replacement, every pass, instead of dealing the shards out"
        " disjointly (webdataset's resampling: samples can repeat and some are never seen within an epoch).",
    )
    parser.add_argument(
        "--shard_timeout",
        type=float,
        default=300,
        help="Seconds a consumer (a rank's dataloader worker) waits for the next sample of a shard before it abandons"
        " the shard (a `pipe:` command is killed), counts it as stalled_shard, names it in the log and goes on with"
        " its next shard. Only waiting counts, never time spent downstream. 0: wait forever.",
    )
    parser.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=50,
        help="Stop with an error after this many optimisation steps in a row with a non-finite loss or gradient."
        " Such steps are always skipped (no weight changes) and counted as train/nonfinite_steps (fp16's grad scaler"
        " skips count as train/skipped_steps).",
    )
    parser.add_argument(
        "--ddp_timeout",
        type=int,
        default=7200,
        help="Seconds a rank may wait in a collective (e.g. while rank 0 validates or saves) before aborting.",
    )

    parser.set_defaults(family="sd")  # not a flag: check_args reads it from the base's UNet config (base_family)
    return parser


def parse_args(input_args=None):
    parser = make_parser()
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
    for factor in args.condition_scales or []:
        if not factor >= 1:
            error(f"--condition_scales: {factor:g} is below 1 (a factor reduces the image; 1 keeps it)")
        if condition_size(args.resolution, factor) < 1:
            error(f"--condition_scales: {factor:g} reduces --resolution={args.resolution} to less than 1 pixel")
    if args.condition_degradation != "none" and args.interpolation not in TORCH_FILTERS:
        error(f"--condition_degradation={args.condition_degradation} makes conditions on the training device, where"
              f" only {' and '.join(TORCH_FILTERS)} exist: use --interpolation=bicubic")
    if not 0 <= args.proportion_empty_prompts <= 1:
        error("--proportion_empty_prompts must be in the range [0, 1]")
    if not 0 <= args.no_degradation_prob <= 1:
        error("--no_degradation_prob must be in the range [0, 1]")
    if args.max_train_steps is None and args.max_train_samples is None:
        error("set --max_train_steps or --max_train_samples: a stream of shards has no length of its own")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                 "logging_steps", "max_nonfinite_steps"):
        if getattr(args, name) < 1:
            error(f"--{name} must be >= 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        error("--max_train_steps must be >= 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        error("--checkpoints_total_limit must be >= 1")
    if args.dataloader_num_workers < 0:
        error("--dataloader_num_workers must be >= 0")
    if not args.shard_timeout >= 0:  # also refuses nan
        error("--shard_timeout must be >= 0 (0: wait forever)")
    if args.num_holdout_samples < 0:
        error("--num_holdout_samples must be >= 0")
    if args.max_aspect_ratio is not None and args.max_aspect_ratio < 1:
        error("--max_aspect_ratio must be >= 1")
    if (args.validation_prompt is None) != (args.validation_image is None):
        error("--validation_prompt and --validation_image must be given together")
    if args.validation_image is not None:
        n_img, n_prompt = len(args.validation_image), len(args.validation_prompt)
        if n_img != 1 and n_prompt != 1 and n_img != n_prompt:
            error("give 1 --validation_image, 1 --validation_prompt, or as many of each")
        for path in args.validation_image:
            if not os.path.isfile(path):
                error(f"--validation_image not found: {path}")
    if args.use_8bit_adam and args.use_fused_adam:
        error("--use_8bit_adam and --use_fused_adam exclude each other")
    if args.hub_token is not None and "wandb" in args.report_to:
        error("--hub_token cannot be used with --report_to=wandb (it would expose the token); use `hf auth login`")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        error("--mixed_precision=fp16 needs a CUDA GPU; use --mixed_precision=no or bf16 on this machine")
    if args.num_holdout_samples == 1:
        error("--num_holdout_samples must be 0 or >= 2 (the condition-use gap compares samples' conditions)")
    if args.resume_from_checkpoint not in (None, "latest"):
        try:  # sizes only: every rank parses the flags, and the checksums are read once, by the main process
            resolve_checkpoint(args.resume_from_checkpoint, args.output_dir, checksums=False)
        except ValueError as exn:
            error(f"--resume_from_checkpoint: {exn}")
    urls = wds.shardlists.expand_urls(args.train_shards_path_or_url)
    local = [u.removeprefix("file:") for u in urls if not u.startswith("pipe:") and "://" not in u]
    if urls and len(local) == len(urls) and not any(os.path.isfile(u) for u in local):
        error(f"no shard of --train_shards_path_or_url exists: {args.train_shards_path_or_url}")
    problem = output_dir_problem(args.output_dir)
    if problem:
        error(f"--output_dir {args.output_dir}: {problem}")
    try:
        unet_config = read_model_config(args.pretrained_model_name_or_path, "unet", args.revision, args.cache_dir)
        args.family = base_family(unet_config)
        for sub in TEXT_ENCODERS[args.family]:
            read_model_config(args.pretrained_model_name_or_path, sub, args.revision, args.cache_dir)
        if args.pretrained_vae_model_name_or_path:
            read_model_config(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
        else:
            read_model_config(args.pretrained_model_name_or_path, "vae", args.revision, args.cache_dir)
        if args.controlnet_model_name_or_path:
            mismatch = controlnet_mismatch(
                read_model_config(args.controlnet_model_name_or_path, cache_dir=args.cache_dir), unet_config)
            if mismatch:
                error(f"--controlnet_model_name_or_path {args.controlnet_model_name_or_path} does not fit the base"
                      f" {args.pretrained_model_name_or_path}: {mismatch}")
    except ValueError as exn:
        error(str(exn))


def output_dir_problem(path):
    """Why nothing can be written to --output_dir (None if it can): found now, not at the first checkpoint. Tried, not
    inferred from permissions, which say nothing for root or on network filesystems."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exn:
        return exn.strerror or str(exn)
    return None


def read_model_config(name, subfolder=None, revision=None, cache_dir=None):
    """A model's config.json, from a local folder, the hub cache or the hub, read without loading the model.

    ValueError with one line saying why it cannot be had: no such folder, a malformed hub id, offline and not
    cached, the hub unreachable, or no such repository. The hub is probed once instead of waiting out
    huggingface_hub's retries (~25 s with no network).
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    what = f"{name}/{subfolder}" if subfolder else name
    local = os.path.join(name, subfolder or "", "config.json")
    if os.path.isdir(name) or name.startswith((".", "/", "~")):
        if not os.path.isfile(local):
            missing = f"no {os.path.join(subfolder or '', 'config.json')} in it" if os.path.isdir(name) else "no such folder"
            raise ValueError(f"model not found: {name} ({missing})")
    else:
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise ValueError(f"model not found: {name} is neither a local folder nor a valid hub id")
        filename = f"{subfolder}/config.json" if subfolder else "config.json"
        local = try_to_load_from_cache(name, filename, cache_dir=cache_dir, revision=revision)
        if not isinstance(local, str):
            host = constants.ENDPOINT.split("://")[-1].split("/")[0]
            if constants.HF_HUB_OFFLINE:
                raise ValueError(f"model not found: {what} is not in the local hub cache and HF_HUB_OFFLINE is set")
            try:
                socket.create_connection((host, 443), timeout=5).close()
            except OSError:
                raise ValueError(f"model not found: {what} is not in the local hub cache and {host} is unreachable")
            try:
                local = hf_hub_download(name, filename, revision=revision, cache_dir=cache_dir)
            except Exception as exn:
                raise ValueError(f"model not found: {what} on {host} ({type(exn).__name__})")
    try:
        with open(local) as f:
            return json.load(f)
    except (OSError, ValueError) as exn:
        raise ValueError(f"cannot read {local}: {exn}")


# The text encoders (and their tokenizers' folders, "tokenizer" + the same suffix) of each family's base.
TEXT_ENCODERS = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
FAMILY_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL"}


def base_family(unet_config):
    """'sdxl' for a UNet that takes SDXL's added conditioning (time ids and the pooled text embedding), 'sd' for the
    SD-1.x/2.x shape (which differ only in widths, projections and objective, all read from the configs).
    ValueError for any other added conditioning."""
    kind = unet_config.get("addition_embed_type")
    if kind == "text_time":
        return "sdxl"
    if kind is not None:
        raise ValueError(f"the base's UNet has addition_embed_type={kind!r}; only SD-1.x/2.x (none) and SDXL"
                         " ('text_time') bases are supported")
    return "sd"


# A ControlNet's residuals are added to the UNet's down and mid blocks: these must agree, or the first forward pass
# fails deep inside the UNet. SDXL's added conditioning (time ids and pooled embedding) must fit too.
FITTING_CONFIG_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                       "transformer_layers_per_block", "down_block_types", "addition_time_embed_dim",
                       "projection_class_embeddings_input_dim")


def controlnet_mismatch(controlnet_config, unet_config):
    """Why a ControlNet (config dict) cannot drive a UNet (config dict), or None. A tile model takes RGB images."""
    blocks = len(unet_config.get("down_block_types", ()))

    def per_block(value):  # configs write a per-block setting as one value or as a list
        return list(value) if isinstance(value, (list, tuple)) else [value] * blocks

    if controlnet_config.get("_class_name") not in (None, "ControlNetModel"):
        return f"it is a {controlnet_config['_class_name']}, not a ControlNetModel"
    # A missing key is the SD-1.x/2.x default (configs written before SDXL lack it).
    families = [FAMILY_NAMES[base_family(c)] for c in (controlnet_config, unet_config)]
    if families[0] != families[1]:
        return f"it is a {families[0]} ControlNet and the base is {families[1]}"
    for key in FITTING_CONFIG_KEYS:
        if key in unet_config and key in controlnet_config and per_block(unet_config[key]) != per_block(controlnet_config[key]):
            return f"{key} is {controlnet_config[key]} in the ControlNet and {unet_config[key]} in the base's UNet"
    if controlnet_config.get("conditioning_channels", 3) != 3:
        return f"it takes {controlnet_config['conditioning_channels']}-channel conditions; a tile model takes RGB (3)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Tile pairs: one place that turns an image into (target, condition), used by training and validation alike


class SkipSample(Exception):
    """A sample that cannot or should not be trained on; `reason` names its counter."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# Counters of one process (the main process or one dataloader worker). Each batch carries a copy, so the training
# process sums the latest copy of every worker and the ranks sum theirs at logging time.
SKIP_REASONS = (
    "missing_shard", "tar_error", "pipe_error", "stalled_shard", "no_image", "empty_image", "decode_error",
    "too_large", "too_small", "filtered_min_size", "filtered_aspect", "filtered_watermark", "filtered_unsafe",
)
DATA_STATS = collections.Counter()
BAD_SHARDS = set()  # shards this process has counted and named: once per run, however many passes read them


def reset_data_stats():
    DATA_STATS.clear()
    BAD_SHARDS.clear()


def resize(image, size, interpolation):
    """uint8 CHW tensor -> uint8 CHW tensor of `size` (an int for a square, or (height, width)), antialiased like PIL.

    Bilinear and bicubic use torch's antialiased uint8 kernels: within rounding of PIL's result and ~4x faster;
    the other filters go through PIL.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if interpolation in TORCH_FILTERS:
        return F.interpolate(image[None], size=(h, w), mode=interpolation, antialias=True)[0]
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((w, h), INTERPOLATIONS[interpolation])
    return image_to_tensor(pil)


def image_to_tensor(image):
    """PIL RGB -> uint8 CHW tensor (a view in channels-last layout, which torch's resize kernels read fastest)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def quantise(images):
    """Float images in [0, 1] -> uint8, each value rounded to the nearest of the 256 levels."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def tensor_to_image(tensor):
    """CHW tensor, uint8 or float in [0, 1] -> PIL RGB."""
    if tensor.is_floating_point():
        tensor = quantise(tensor)
    return Image.fromarray(tensor.cpu().permute(1, 2, 0).contiguous().numpy())


def square_box(width, height, rng=None):
    """(left, top, side) of the largest square of a width x height image: at a random offset with `rng`, else
    centred."""
    side = min(width, height)
    left = rng.randint(0, width - side) if rng else (width - side) // 2
    top = rng.randint(0, height - side) if rng else (height - side) // 2
    return left, top, side


def square_crop(image, size, interpolation, rng=None, box=None):
    """The image's largest square (`box`, else square_box's) resized to size x size: the same as resizing the short
    side to `size` and cropping, in one resize. -> uint8 CHW tensor."""
    left, top, side = box or square_box(*image.size, rng)
    return resize(image_to_tensor(image.crop((left, top, left + side, top + side))), size, interpolation)


def sdxl_time_ids(original_size, box, resolution):
    """SDXL's micro-conditioning of one training crop, in its pipeline's order: the image's original (height, width),
    the crop's (top, left) in the image resized so that its short side is `resolution` (where SDXL's training cut
    its crops), and the target (height, width). -> float32 tensor of 6."""
    left, top, side = box
    scale = resolution / side
    crop = (round(top * scale), round(left * scale))
    return torch.tensor([*original_size, *crop, resolution, resolution], dtype=torch.float32)


def enlarge_condition(condition, size, interpolation, device=None):
    """uint8 NCHW tile conditions at the condition resolution, on the host -> float in [0, 1] at `size` (int or
    (height, width)), on `device` (default: where they are).

    The second half of the tile condition (the first is the reduction in make_tile_pair), also what makes an
    upscaler's condition from a low-resolution image. Bilinear and bicubic run as torch's antialiased kernels on
    `device` (the training device: it spares the dataloader workers their largest resize, and the small uint8
    tensors are what crosses to it); the other filters have no torch kernel and run through PIL on the host before
    the copy, so that nothing comes back from the device (a host sync). A list of CHW conditions of several sizes
    (several --condition_scales) is enlarged size by size.
    """
    if isinstance(condition, (list, tuple)):
        enlarged = [None] * len(condition)
        for shape in dict.fromkeys(c.shape for c in condition):
            index = [i for i, c in enumerate(condition) if c.shape == shape]
            # Each condition is copied as the loader pinned it and stacked on the device: a stack on the host would
            # be pageable memory again. (The PIL filters stack on the host, and pin what they make.)
            group = [condition[i] if interpolation not in TORCH_FILTERS or device is None
                     else condition[i].to(device, non_blocking=True) for i in index]
            for i, e in zip(index, enlarge_condition(torch.stack(group), size, interpolation, device)):
                enlarged[i] = e
        return torch.stack(enlarged)
    device = condition.device if device is None else device
    if interpolation in TORCH_FILTERS:
        enlarged = F.interpolate(condition.to(device, non_blocking=True).float(),
                                 size=size if isinstance(size, int) else tuple(size), mode=interpolation, antialias=True)
        return (enlarged / 255).clamp(0, 1)
    if condition.device.type != "cpu":
        raise ValueError(f"--interpolation={interpolation} enlarges on the CPU; got a {condition.device} tensor")
    enlarged = pinned(torch.stack([resize(c, size, interpolation) for c in condition]), device)
    return enlarged.to(device, non_blocking=True).float() / 255


def pinned(tensor, device):
    """A host tensor made on the way to a GPU, in pinned memory: a non_blocking copy from pageable memory is a
    synchronous one (cudaMemcpyAsync stages it and waits)."""
    return tensor.pin_memory() if torch.device(device).type == "cuda" else tensor


# ----------------------------------------------------------------------------------------------------------------
# Condition recipes: the reduction factors and the degradations of a low-resolution image
#
# Real-ESRGAN's two-stage ("high-order") degradation model, written anew in torch (BasicSR itself imports a
# torchvision module removed in 0.17, and the project has no torchvision). Kernel formulas and draws follow BasicSR's
# basicsr/data/degradations.py and realesrgan/data/realesrgan_dataset.py; the order of the steps and the draws made
# once per batch follow realesrgan/models/realesrgan_model.py's feed_data; the ranges are those of
# options/train_realesrnet_x4plus.yml and, for "mild", StableSR's configs/stableSRNew/v2-finetune_text_T_512.yaml.
# As there, the draws are made with the data (in the dataloader workers, from their seeded rng: reproducible from
# --seed and resumed like the crops) and the steps run batched on the training device: on one CPU core they would
# cost several times the rest of the data path (benchmarks/bench_data.py).

KERNEL_SIZE = 21  # every blur kernel is zero-padded to this (Real-ESRGAN's blur_kernel_size)
KERNEL_SIZES = range(7, KERNEL_SIZE + 1, 2)  # realesrgan_dataset.py's kernel_range
KERNEL_SHAPES = {  # BasicSR kernel_list: kernel_prob
    "iso": 0.45, "aniso": 0.25, "generalized_iso": 0.12, "generalized_aniso": 0.03, "plateau_iso": 0.12,
    "plateau_aniso": 0.03,
}
RESIZE_MODES = ("area", "bilinear", "bicubic")  # not antialiased, as in Real-ESRGAN: real resizers alias too


def degradation_stage(blur_sigma, betag, betap, resize_prob, resize_range, noise_sigma, poisson_scale, jpeg_quality,
                      blur_prob=1.0, sinc_prob=0.1, gaussian_noise_prob=0.5, gray_noise_prob=0.4):
    """The ranges of one stage: blur, resize (up/down/keep probabilities, factor range), noise, JPEG."""
    return dict(locals())


DEGRADATIONS = {
    "none": None,
    "realesrgan": {  # options/train_realesrnet_x4plus.yml
        "stage1": degradation_stage(blur_sigma=(0.2, 3.0), betag=(0.5, 4.0), betap=(1.0, 2.0),
                                    resize_prob=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5), noise_sigma=(1, 30),
                                    poisson_scale=(0.05, 3.0), jpeg_quality=(30, 95)),
        "stage2": degradation_stage(blur_prob=0.8, blur_sigma=(0.2, 1.5), betag=(0.5, 4.0), betap=(1.0, 2.0),
                                    resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2), noise_sigma=(1, 25),
                                    poisson_scale=(0.05, 2.5), jpeg_quality=(30, 95)),
        "final_sinc_prob": 0.8,
    },
    "mild": {  # StableSR's v2-finetune_text_T_512.yaml (PASD's params_realesrgan.yml: the same but for the blur)
        "stage1": degradation_stage(blur_sigma=(0.2, 1.5), betag=(0.5, 2.0), betap=(1.0, 1.5),
                                    resize_prob=(0.2, 0.7, 0.1), resize_range=(0.3, 1.5), noise_sigma=(1, 15),
                                    poisson_scale=(0.05, 2.0), jpeg_quality=(60, 95)),
        "stage2": degradation_stage(blur_prob=0.5, blur_sigma=(0.2, 1.0), betag=(0.5, 2.0), betap=(1.0, 1.5),
                                    resize_prob=(0.3, 0.4, 0.3), resize_range=(0.6, 1.2), noise_sigma=(1, 12),
                                    poisson_scale=(0.05, 1.0), jpeg_quality=(60, 100)),
        "final_sinc_prob": 0.8,
    },
}


def condition_size(resolution, factor):
    """Side of the low-resolution image that a reduction by `factor` leaves of a `resolution` square."""
    return round(resolution / factor)


def clean_scale(args):
    """The clean recipe's reduction factor (validation, the held-out metrics, upscale.py's default scale)."""
    return args.resolution / args.condition_resolution


def draw_condition_scale(args, rng=None):
    """The reduction factor of one sample: one of --condition_scales (drawn only when there are several, so that a
    single factor leaves the data stream exactly as it was), or the clean recipe's without `rng` (held-out data)."""
    if rng is None or not args.condition_scales:
        return clean_scale(args)
    if len(args.condition_scales) == 1:
        return args.condition_scales[0]
    return rng.choice(args.condition_scales)


def kernel_distances(size, sigma_x, sigma_y, angle):
    """x^T Sigma^-1 x on a size x size grid centred on 0, Sigma = R diag(sigma_x^2, sigma_y^2) R^T (rotation by
    `angle`): the squared Mahalanobis distance every Gaussian-like kernel is a function of. (numpy: the workers
    build ~3 kernels an image, and numpy's small-array calls cost a tenth of torch's.)"""
    x, y = np.meshgrid(np.arange(size) - size // 2, np.arange(size) - size // 2)
    cos, sin = math.cos(angle), math.sin(angle)
    a = cos**2 / sigma_x**2 + sin**2 / sigma_y**2  # Sigma^-1 = R diag(1/sigma_x^2, 1/sigma_y^2) R^T
    b = cos * sin * (1 / sigma_x**2 - 1 / sigma_y**2)
    d = sin**2 / sigma_x**2 + cos**2 / sigma_y**2
    return a * x**2 + 2 * b * x * y + d * y**2


def blur_kernel(shape, size, sigma_x, sigma_y, angle, beta=1.0):
    """Gaussian (beta 1), generalised Gaussian (its exponent raised to beta: flatter or peakier) or plateau kernel."""
    distance = kernel_distances(size, sigma_x, sigma_y, angle)
    kernel = 1 / (distance**beta + 1) if shape.startswith("plateau") else np.exp(-0.5 * distance**beta)
    return torch.from_numpy(kernel / kernel.sum()).float()


def sinc_kernel(size, cutoff):
    """Circular low-pass filter (2-D sinc) passing frequencies below `cutoff` radians per pixel: the ringing and
    overshoot of sharp resizers and of over-sharpened images."""
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    radius = torch.hypot(*torch.meshgrid(axis, axis, indexing="xy"))
    kernel = cutoff * torch.special.bessel_j1(cutoff * radius) / (2 * math.pi * radius)
    kernel[radius == 0] = cutoff**2 / (4 * math.pi)
    return (kernel / kernel.sum()).float()


def pad_kernel(kernel):
    pad = (KERNEL_SIZE - kernel.shape[-1]) // 2
    return F.pad(kernel, (pad, pad, pad, pad))


PULSE = pad_kernel(torch.ones(1, 1))  # the identity kernel: a blur that was not drawn


def draw_blur_kernel(stage, rng):
    """One kernel of a stage, padded to KERNEL_SIZE: a sinc with p sinc_prob, else one of KERNEL_SHAPES, sigmas in
    blur_sigma (drawn apart for anisotropic shapes, at any angle), the generalised/plateau beta below or above 1 with
    p 0.5 (random_bivariate_* in BasicSR)."""
    size = rng.choice(KERNEL_SIZES)
    if rng.random() < stage["sinc_prob"]:
        return pad_kernel(sinc_kernel(size, rng.uniform(math.pi / 3 if size < 13 else math.pi / 5, math.pi)))
    shape = rng.choices(list(KERNEL_SHAPES), weights=list(KERNEL_SHAPES.values()))[0]
    sigma_x = rng.uniform(*stage["blur_sigma"])
    sigma_y, angle = (rng.uniform(*stage["blur_sigma"]), rng.uniform(-math.pi, math.pi)) if "aniso" in shape else (sigma_x, 0.0)
    beta = 1.0
    if shape.startswith(("generalized", "plateau")):
        low, high = stage["betag"] if shape.startswith("generalized") else stage["betap"]
        beta = rng.uniform(low, 1) if rng.random() < 0.5 else rng.uniform(1, high)
    return pad_kernel(blur_kernel(shape, size, sigma_x, sigma_y, angle, beta))


def draw_resize(stage, rng):
    """(factor, mode): up to resize_range[1], down to resize_range[0] or kept, with resize_prob's probabilities."""
    direction = rng.choices(("up", "down", "keep"), weights=stage["resize_prob"])[0]
    low, high = stage["resize_range"]
    factor = rng.uniform(1, high) if direction == "up" else rng.uniform(low, 1) if direction == "down" else 1.0
    return factor, rng.choice(RESIZE_MODES)


def draw_stage(stage, n, rng):
    """A stage's draws for n images: per image its kernel, noise strength, grey flag and JPEG quality (as the
    dataset draws them); for the batch the resize and whether the noise is Gaussian or Poisson (as feed_data)."""
    gaussian = rng.random() < stage["gaussian_noise_prob"]
    strength = stage["noise_sigma"] if gaussian else stage["poisson_scale"]
    return {
        "kernel": torch.stack([draw_blur_kernel(stage, rng) if rng.random() < stage["blur_prob"] else PULSE
                               for _ in range(n)]),
        "resize": draw_resize(stage, rng),
        "noise": "gaussian" if gaussian else "poisson",
        "noise_strength": torch.tensor([rng.uniform(*strength) for _ in range(n)]),
        "gray_noise": torch.tensor([rng.random() < stage["gray_noise_prob"] for _ in range(n)]),
        "jpeg_quality": torch.tensor([rng.uniform(*stage["jpeg_quality"]) for _ in range(n)]),
    }


def draw_degradation(preset, n, rng):
    """Every random choice of `preset` for a batch of n images, made on the host from `rng` (see degrade)."""
    recipe = DEGRADATIONS[preset]
    sinc = [pad_kernel(sinc_kernel(rng.choice(KERNEL_SIZES), rng.uniform(math.pi / 3, math.pi)))
            if rng.random() < recipe["final_sinc_prob"] else PULSE for _ in range(n)]
    return {
        "stage1": draw_stage(recipe["stage1"], n, rng),
        "stage2": draw_stage(recipe["stage2"], n, rng),
        "final_sinc": torch.stack(sinc),
        "final_mode": rng.choice(RESIZE_MODES),
        "sinc_before_jpeg": rng.random() < 0.5,
    }


def draw_degradation_groups(preset, factors, rng):
    """A batch's draws, one group per reduction factor (its images share a size): the indices of its images and
    their draws, host tensors that the loader pins, so that they reach the device without a host sync. `factors`
    holds each image's reduction factor, None for one that keeps its clean condition (--no_degradation_prob)."""
    groups = []
    for factor in sorted({f for f in factors if f is not None}):
        index = [i for i, f in enumerate(factors) if f == factor]
        groups.append({"factor": factor, "index": torch.tensor(index), "draws": draw_degradation(preset, len(index), rng)})
    return groups


def to_device(draws, device):
    """Nested dicts of host tensors and plain values -> the same with the tensors on `device`, copied without waiting
    (from the loader's pinned memory: a blocking copy, or one from pageable memory, waits for the device)."""
    if isinstance(draws, dict):
        return {k: to_device(v, device) for k, v in draws.items()}
    return draws.to(device, non_blocking=True) if torch.is_tensor(draws) else draws


@lru_cache(maxsize=None)
def constant(name, device, dtype=torch.float32):
    """A constant of the degradation steps on `device`, copied there once (a fresh copy from the host in every step
    would wait for the device)."""
    return CONSTANTS[name].to(device, dtype)


def blur(images, kernels):
    """Each image of (n, c, h, w) convolved with its own kernel of (n, k, k); edges reflected (replicated where the
    image is smaller than the kernel's reach)."""
    n, c, h, w = images.shape
    pad = kernels.shape[-1] // 2
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect" if min(h, w) > pad else "replicate")
    weight = kernels.to(images).repeat_interleave(c, dim=0)[:, None]
    return F.conv2d(padded.reshape(1, n * c, h + 2 * pad, w + 2 * pad), weight, groups=n * c).view(n, c, h, w)


def gaussian_noise(images, sigma, gray, generator):
    """Additive Gaussian noise of `sigma` (of 255) per image, the same in every channel where `gray`."""
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    noise = torch.where(gray.to(images.device)[:, None, None, None], noise[:, :1], noise)
    return images + noise * (sigma.to(images) / 255)[:, None, None, None]


def poisson_noise(images, scale, gray, generator):
    """Shot noise of an 8-bit sensor (its 256 levels as photon counts, as BasicSR's generate_poisson_noise_pt finds
    for any photograph), times `scale` per image; from the luma, in every channel alike, where `gray`."""
    levels = 256
    source = torch.where(gray.to(images.device)[:, None, None, None], rgb_to_luma(images), images)
    source = (source * 255).round().clamp(0, 255) / 255
    noise = torch.poisson(source * levels, generator=generator) / levels - source
    return images + noise * scale.to(images)[:, None, None, None]


def rgb_to_luma(images):
    """(n, 3, h, w) -> (n, 3, h, w) of the ITU-R 601 luma, the grey of JPEG and of torchvision's rgb_to_grayscale."""
    weights = constant("ycbcr", images.device, images.dtype)[0]
    return (images * weights[:, None, None]).sum(1, keepdim=True).expand_as(images)


# JPEG's standard quantisation tables (ITU-T T.81 Annex K), scaled by quality as libjpeg scales them
JPEG_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
JPEG_CHROMA = torch.full((8, 8), 99.0)
JPEG_CHROMA[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])
DCT = torch.tensor([[math.sqrt((1 if k == 0 else 2) / 8) * math.cos((2 * i + 1) * k * math.pi / 16) for i in range(8)]
                    for k in range(8)])
YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
CONSTANTS = {"jpeg_tables": torch.stack([JPEG_LUMA, JPEG_CHROMA]), "dct": DCT, "ycbcr": YCBCR,
             "ycbcr_to_rgb": torch.linalg.inv(YCBCR)}


def jpeg_tables(quality):
    """(n,) qualities in [1, 100] -> (n, 2, 8, 8) luma and chroma quantisation steps (libjpeg's quality scaling)."""
    quality = quality.round().clamp(1, 100)
    scale = torch.where(quality < 50, torch.floor(5000 / quality), 200 - 2 * quality)[:, None, None, None]
    base = constant("jpeg_tables", quality.device)
    return torch.floor((base * scale + 50) / 100).clamp(1, 255)


def quantise_blocks(planes, steps):
    """(n, c, h, w) planes (sides multiples of 8) -> the same after the 8x8 DCT, rounding to multiples of
    `steps` (n, 8, 8) and the inverse DCT: what JPEG keeps of them."""
    n, c, h, w = planes.shape
    dct = constant("dct", planes.device, planes.dtype)
    blocks = planes.view(n, c, h // 8, 8, w // 8, 8).transpose(3, 4)
    steps = steps[:, None, None, None]
    coefficients = torch.round(dct @ blocks @ dct.T / steps) * steps
    return (dct.T @ coefficients @ dct).transpose(3, 4).reshape(n, c, h, w)


def jpeg(images, quality):
    """JPEG compression and decompression of (n, 3, h, w) in [0, 1] at a quality per image, in torch so that it
    runs batched on the training device: baseline JPEG as libjpeg writes it (YCbCr, 4:2:0 chroma, 8x8 DCT, the
    standard tables scaled by quality) and, as Real-ESRGAN's DiffJPEG, chroma repeated back to full size."""
    n, _, h, w = images.shape
    padded = F.pad(images * 255, (0, -w % 16, 0, -h % 16), mode="replicate")  # libjpeg repeats the edge too
    ycbcr = torch.einsum("ij,njhw->nihw", constant("ycbcr", images.device, images.dtype), padded)  # chroma centred on 0
    tables = jpeg_tables(quality.to(images.device, torch.float32)).to(images)
    luma = quantise_blocks(ycbcr[:, :1] - 128, tables[:, 0]) + 128
    chroma = quantise_blocks(F.avg_pool2d(ycbcr[:, 1:], 2), tables[:, 1])
    ycbcr = torch.cat([luma, chroma.repeat_interleave(2, -2).repeat_interleave(2, -1)], dim=1)
    rgb = torch.einsum("ij,njhw->nihw", constant("ycbcr_to_rgb", images.device, images.dtype), ycbcr)
    return (rgb[..., :h, :w] / 255).clamp(0, 1)


def resize_by(images, size, mode):
    return F.interpolate(images, size=size, mode=mode)


def blur_resize_noise(images, stage, size, generator):
    """Blur, resize to `size`, noise: the first three steps of a stage (its JPEG comes after)."""
    images = resize_by(blur(images, stage["kernel"]), size, stage["resize"][1])
    add_noise = gaussian_noise if stage["noise"] == "gaussian" else poisson_noise
    return add_noise(images, stage["noise_strength"], stage["gray_noise"], generator).clamp(0, 1)


def degrade(images, size, draws, generator=None):
    """Real-ESRGAN's two-stage degradation of (n, 3, H, W) float images in [0, 1] down to `size` (int or (height,
    width)), with the choices in `draws` (draw_degradation): -> (n, 3, *size) uint8, on the images' device.

    Stage 1 at the images' size: blur, resize by the drawn factor, noise, JPEG. Stage 2 towards the final size:
    blur, resize to the drawn factor of the final size, noise. Then, in random order, the final resize followed by a
    sinc filter, and JPEG. An 8-bit image at the end, as every real low-resolution input is. The noise comes from
    `generator`, by default the device's global generator (in training: seeded by --seed and saved with every
    checkpoint, like the training noise).
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    first, second = draws["stage1"], draws["stage2"]
    x = blur_resize_noise(images, first, scaled(images.shape[-2:], first["resize"][0]), generator)
    x = jpeg(x, first["jpeg_quality"])
    x = blur_resize_noise(x, second, scaled(size, second["resize"][0]), generator)
    if draws["sinc_before_jpeg"]:
        x = jpeg(blur(resize_by(x, size, draws["final_mode"]), draws["final_sinc"]).clamp(0, 1), second["jpeg_quality"])
    else:
        x = blur(resize_by(jpeg(x, second["jpeg_quality"]), size, draws["final_mode"]), draws["final_sinc"])
    return quantise(x)


def scaled(size, factor):
    return tuple(max(1, round(side * factor)) for side in size)


def degraded_conditions(targets, groups, resolution, generator=None, clean=None):
    """uint8 targets on the training device -> their degraded low-resolution images, a list (the sizes differ with
    the factor): one batched degrade per group of draw_degradation_groups. `clean` holds the conditions the workers
    made for the images in no group (None for the others); they join the list on the same device."""
    clean = clean if clean is not None else [None] * targets.shape[0]
    conditions = [c if c is None else c.to(targets.device, non_blocking=True) for c in clean]
    for group in groups:
        images = targets.index_select(0, group["index"].to(targets.device, non_blocking=True)).float() / 255
        small = degrade(images, condition_size(resolution, group["factor"]), to_device(group["draws"], targets.device),
                        generator)
        for i, condition in zip(group["index"].tolist(), small):  # the host copy of the indices: no device read
            conditions[i] = condition
    return conditions


def to_rgb(image):
    """RGB with transparency composited onto white, so transparent pixels read as paper, not their hidden colour."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode == "RGB":  # most photos: convert() would copy every pixel (~1/4 of the decode's own time)
        image.load()
        return image
    return image.convert("RGB")


def original_dimensions(meta, width, height):
    """(width, height) of the image before img2dataset resized it: the json's original_width/height where it has
    both, else the size it was stored at (`width`, `height`)."""
    if meta.get("original_width") and meta.get("original_height"):
        return int(meta["original_width"]), int(meta["original_height"])
    return width, height


def check_metadata(meta, width, height, args):
    """LAION/img2dataset filters, off unless set. Sizes are the original ones where the json has them."""
    ow, oh = original_dimensions(meta, width, height)
    if args.min_image_size is not None and min(ow, oh) < args.min_image_size:
        raise SkipSample("filtered_min_size", f"{ow}x{oh}")
    if args.max_aspect_ratio is not None and max(ow, oh) / max(1, min(ow, oh)) > args.max_aspect_ratio:
        raise SkipSample("filtered_aspect", f"{ow}x{oh}")
    # A missing or null score means "unknown": keep the sample (diffusers' filter drops it, stalling training).
    if args.max_pwatermark is not None and (meta.get("pwatermark") or 0) > args.max_pwatermark:
        raise SkipSample("filtered_watermark", str(meta.get("pwatermark")))
    if args.max_punsafe is not None and (meta.get("punsafe") or 0) > args.max_punsafe:
        raise SkipSample("filtered_unsafe", str(meta.get("punsafe")))


def decode_image(data, meta, args):
    """Image bytes -> RGB PIL image, with every check that can be made from the header done before decoding."""
    if not data:
        raise SkipSample("empty_image")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exn:
        raise SkipSample("decode_error", repr(exn))
    if image.width * image.height > Image.MAX_IMAGE_PIXELS:  # PIL only warns up to 2x this: never decode a bomb
        raise SkipSample("too_large", f"{image.width}x{image.height}")
    if min(image.size) < args.condition_resolution:
        raise SkipSample("too_small", f"{image.width}x{image.height}")
    check_metadata(meta, image.width, image.height, args)
    stored_size = image.size
    image.draft("RGB", (args.resolution, args.resolution))  # JPEG: decode at 1/2..1/8 scale when still big enough
    try:
        rgb = to_rgb(image)
    except Exception as exn:  # truncated or corrupt data surfaces only when the pixels are decoded
        raise SkipSample("decode_error", repr(exn))
    rgb.info["stored_size"] = stored_size  # what the file holds, which a draft decodes smaller (SDXL's time ids)
    return rgb


def make_tile_pair(sample, tokenizer, args, rng=None):
    """One raw webdataset sample -> uint8 target and condition (see model_inputs), caption token ids (`tokenizer`:
    one, or SDXL's two as a list: input_ids and input_ids_2) and the crop's SDXL time ids.

    `rng` draws the crop, the caption drop and the reduction factor; without it the crop is centred, the caption
    kept and the condition made by the clean recipe (held-out data). With a --condition_degradation the condition is
    made later, on the training device (model_inputs), and is None here, except for the --no_degradation_prob share.
    """
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise SkipSample("no_image", sample.get("__key__", "?"))
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        meta = {}  # the metadata is optional; a broken json only loses the filters' extra knowledge
    caption_key = next((k for k in CAPTION_KEYS if k in sample), None)
    caption = sample[caption_key].decode("utf-8", errors="replace").strip() if caption_key else ""
    if rng is not None and rng.random() < args.proportion_empty_prompts:
        caption = ""
    image = decode_image(sample[image_key], meta, args)
    box = square_box(*image.size, rng)
    target = square_crop(image, args.resolution, args.interpolation, box=box)
    original_width, original_height = original_dimensions(meta, *image.info.get("stored_size", image.size))
    time_ids = sdxl_time_ids((original_height, original_width), box, args.resolution)
    factor = draw_condition_scale(args, rng)
    condition = None  # enlarged in model_inputs, where a degraded one is made
    degraded = rng is not None and args.condition_degradation != "none"
    if degraded and args.no_degradation_prob > 0:  # drawn only when asked for: the default stream stays as it was
        degraded = rng.random() >= args.no_degradation_prob
    if not degraded:
        condition = resize(target, condition_size(args.resolution, factor), args.interpolation)
    tokenizers = tokenizer if isinstance(tokenizer, (list, tuple)) else [tokenizer]
    input_ids = {name: token_ids(t, caption)[0] for name, t in zip(INPUT_IDS, tokenizers)}
    return {
        "pixel_values": target,
        "conditioning_pixel_values": condition,
        "condition_scale": factor,
        **input_ids,
        "time_ids": time_ids,
        "key": sample["__key__"],
        "url": sample.get("__url__"),
        "caption": caption,
    }


INPUT_IDS = ("input_ids", "input_ids_2")  # the batch's token ids for each text encoder (TEXT_ENCODERS)


def token_ids(tokenizer, captions):
    """Token ids of a caption (-> 1 x model_max_length) or of a list of them (-> N x model_max_length), padded and
    truncated as tokenizer(captions, padding="max_length", truncation=True) makes them."""
    encoder = caption_encoder(tokenizer)
    if encoder is None:  # No attention mask: the text encoders are called without one, as upstream.
        return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_attention_mask=False, return_tensors="pt").input_ids
    encodings = encoder.encode_batch([captions] if isinstance(captions, str) else list(captions))
    return torch.tensor([e.ids for e in encodings])


@lru_cache(maxsize=None)
def caption_encoder(tokenizer):
    """The `tokenizers` tokenizer behind a fast `tokenizer`, set once to pad and truncate to model_max_length as the
    transformers wrapper sets its own before each call (TokenizersBackend.set_truncation_and_padding); None where
    there is none (a Python tokenizer) or no pad token. The wrapper's per-call work is most of a caption's
    tokenising in a worker (~0.1 ms of ~2 ms a sample)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None:
        return None
    encoder = copy.deepcopy(backend)
    encoder.enable_truncation(max_length=tokenizer.model_max_length, stride=0, strategy="longest_first",
                              direction=tokenizer.truncation_side)
    encoder.enable_padding(length=tokenizer.model_max_length, direction=tokenizer.padding_side,
                           pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token,
                           pad_type_id=tokenizer.pad_token_type_id)
    encoder.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return encoder


def model_inputs(batch, args, device):
    """uint8 batch -> (target in [-1, 1], tile condition in [0, 1], enlarged to --resolution) on the device.
    Batches travel from the workers and to the device as uint8, the condition still small: ~1/5 of the bytes of
    float targets and conditions. Degraded conditions are made here, from the targets on the device."""
    target = batch["pixel_values"].to(device, non_blocking=True)
    conditions = batch["conditioning_pixel_values"]
    if batch.get("degradation") is not None:
        conditions = degraded_conditions(target, batch["degradation"], args.resolution, clean=conditions)
    return target.float() / 127.5 - 1, enlarge_condition(conditions, args.resolution, args.interpolation, device)


def collate_fn(examples):
    rank, _, worker, num_workers = wds.utils.pytorch_worker_info()
    conditions = [e["conditioning_pixel_values"] for e in examples]
    if all(c is not None and c.shape == conditions[0].shape for c in conditions):
        conditions = torch.stack(conditions)  # else a list of several sizes, or of None (made on the device)
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "conditioning_pixel_values": conditions,
        "condition_scales": [e["condition_scale"] for e in examples],
        **{name: torch.stack([e[name] for e in examples]) for name in INPUT_IDS if name in examples[0]},
        "time_ids": torch.stack([e["time_ids"] for e in examples]),
        "keys": [e["key"] for e in examples],
        "urls": [e["url"] for e in examples],
        "captions": [e["caption"] for e in examples],
        "consumer": rank * num_workers + worker,
        "data_stats": dict(DATA_STATS),
    }


# ----------------------------------------------------------------------------------------------------------------
# Data pipeline


def count_skip(exn):
    """wds handler for tile-pair failures: count by reason, tell the log about the first of each kind."""
    reason = exn.reason if isinstance(exn, SkipSample) else "decode_error"
    if DATA_STATS[reason] == 0:
        logger.warning(f"skipping sample ({exn}); further '{reason}' skips are only counted")
    DATA_STATS[reason] += 1
    return True


def kill_tree(pid):
    """SIGKILL a process and its descendants (a `pipe:` shell and the commands it started)."""
    try:
        process = psutil.Process(pid)
        process.suspend()  # a stopped shell starts nothing more while its commands are listed
        family = [*process.children(recursive=True), process]  # listed first: once the shell dies they move away
    except psutil.Error:
        return
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.kill()


def end_command(source):
    if isinstance(source.get("stream"), Pipe):
        kill_tree(source["stream"].proc.pid)


def end_commands():
    """At a process's exit: a `pipe:` command that stalled, or that no one reads any more, must not outlive it."""
    for source in list(LIVE_READS.values()):
        end_command(source)


atexit.register(end_commands)  # the main process; dataloader workers register in survive_stop_signals


def close_shard_stream(stream):
    """Close a shard's stream. A `pipe:` command still running COMMAND_GRACE seconds after its tar ended is killed;
    its exit status stays readable for shard_problem."""
    if stream is None:
        return
    if isinstance(stream, Pipe):
        stream.timeout = COMMAND_GRACE  # webdataset's own 2 hours would keep this thread, and the command, alive
        try:
            stream.close()
        except subprocess.TimeoutExpired:
            kill_tree(stream.proc.pid)
        except Exception:
            pass  # a failed command's status: shard_problem reads it
        return
    stream.close()


def shard_reader(url, samples, errors, source, abandoned):
    """The thread behind read_shard: webdataset's own stages (url_opener -> tar_file_expander -> group_by_keys, as in
    wds.tarfile_samples) over one url, handing each raw sample over through `samples`, then END."""

    def put(item):  # gives up once the consumer has abandoned the shard
        while not abandoned.is_set():
            with contextlib.suppress(queue.Full):
                samples.put(item, timeout=1)
                return True
        return False

    def handler(exn):
        errors.append(exn)
        return True

    try:
        streams = wds.tariterators.url_opener([source], handler=handler)  # puts the opened stream into `source`
        for sample in wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(streams, handler=handler),
                                                     handler=handler):
            if not put(sample):
                return
    finally:
        close_shard_stream(source.get("stream"))
        put(END_OF_SHARD)


def read_shard(url, report=True, timeout=None):
    """Raw samples of one shard (-> True once read to its end). A missing, broken or stalled one is skipped; with
    `report` (the consumer that owns the shard) it is counted and named in the log, once per run.

    A thread reads the shard, so that the consumer can give up on it: when no sample has come for `timeout` seconds
    (a `pipe:` command or a network file system that stopped answering), the shard is abandoned, its command killed,
    and the consumer goes on with its next shard. Only the time the consumer waits counts: a consumer held up
    downstream (a full DataLoader queue, a long validation) never abandons a healthy shard.
    """
    samples, errors, source, abandoned = queue.Queue(maxsize=READ_AHEAD), [], {"url": url}, threading.Event()
    threading.Thread(target=shard_reader, args=(url, samples, errors, source, abandoned), daemon=True,
                     name=f"shard reader {url}").start()
    finished = stalled = False
    LIVE_READS[id(source)] = source
    try:
        while not (finished or stalled):
            try:
                sample = samples.get(timeout=timeout)
            except queue.Empty:
                stalled = True
                continue
            finished = sample is END_OF_SHARD
            if not finished:
                yield sample
    finally:
        abandoned.set()
        LIVE_READS.pop(id(source), None)
        if not finished:  # stalled, or its consumer stopped early
            end_command(source)
    if (errors or stalled) and report and url not in BAD_SHARDS:
        BAD_SHARDS.add(url)
        if stalled:
            killed = "its command killed" if isinstance(source.get("stream"), Pipe) else "its read left behind"
            reason, detail = "stalled_shard", f"no sample for {timeout:g} s (--shard_timeout); abandoned, {killed}"
        else:
            reason, detail = shard_problem(url, errors[0])
        DATA_STATS[reason] += 1
        logger.warning(f"{reason}: {url}: {detail}; the consumer goes on with its next shard (further failures of"
                       " this shard are not counted again)")
    return finished and not errors


def shard_problem(url, exn):
    """(reason, detail) for a shard that could not be read to its end."""
    if url.startswith("pipe:"):  # the command's exit status says more than the empty or cut tar it left behind
        pipe = next((a for a in exn.args if isinstance(a, Pipe)), None)
        try:
            status = pipe.proc.wait(timeout=10) if pipe else "unknown"
        except subprocess.TimeoutExpired:
            status = "none yet (still running)"
        return "pipe_error", f"command {url[len('pipe:'):]!r} exit status {status} ({exn.args[0]!r})"
    return ("missing_shard" if isinstance(exn, FileNotFoundError) else "tar_error"), repr(exn)


def sample_id(sample):
    """What identifies a sample across '::'-joined specs, whose img2dataset keys all restart at 0: shard and key."""
    return sample["__url__"], sample["__key__"]


FRESH = (0, 0, False, ())  # a shard's data state before anything of it was read: pass 0, nothing read or pending


class PassLedger:
    """Where this consumer's stream stands in each shard's current pass: the data state that a resume on other ranks
    x workers continues from (see DataProgress.state and resume_data).

    Per shard [pass, read, ended, pending]: the pass it is in, how many of its raw samples were read in that pass
    (`ended` once read to its end), and which of those were read but not trained: they sit in the shuffle buffer (or
    were pending in the plan this stream was resumed from). Every other sample below `read` was trained or filtered
    out. A shard whose pass ended with nothing pending goes on to the next pass. Each batch carries the entries that
    changed since the previous one (see batches_of), so the training process always knows the state as of the last
    batch it trained on.
    """

    current = None  # this process's ledger (one consumer per dataloader worker or main process)

    def __init__(self, plan, tracked):
        self.plan, self.tracked = plan or {}, tracked
        self.entries, self.changed = {}, set()

    def first_pass(self, urls):
        """The pass this consumer starts in: the least advanced of its shards'."""
        return min((self.plan.get(u, FRESH)[0] for u in urls), default=0)

    def shard(self, url, cycle, read):
        """What pass `cycle` still needs of `url`: raw samples from read(url), each tagged with its index there."""
        done, start, ended, pending = self.plan.get(url, FRESH)
        if cycle < done:
            return  # this pass of the shard was complete before the resume
        if cycle > done:
            done, start, ended, pending = cycle, 0, False, ()
        entry = self.entries[url] = [done, start, ended, set(pending)]
        self.changed.add(url)
        wanted, last = set(pending), max(pending, default=-1) if ended else math.inf
        if ended and last < 0:
            return self.settle(url)
        samples, index = read(url), 0
        while index <= last:
            try:
                sample = next(samples)
            except StopIteration as end:
                entry[2] = entry[2] or end.value
                break
            if index >= start or index in wanted:  # the others were trained before the resume
                entry[1] = max(entry[1], index + 1)
                sample["__index__"] = index
                yield sample
            index += 1
        samples.close()
        self.settle(url)

    def entered(self, samples):
        """Samples on their way into the shuffle buffer: pending until they leave it."""
        for sample in samples:
            self.entries[sample["__url__"]][3].add(sample["__index__"])
            self.changed.add(sample["__url__"])
            yield sample

    def left(self, sample):
        url = sample["__url__"]
        self.entries[url][3].discard(sample["__index__"])
        self.changed.add(url)
        self.settle(url)

    def settle(self, url):
        done, _, ended, pending = self.entries[url]
        if ended and not pending:
            self.entries[url] = [done + 1, 0, False, set()]

    def take_changes(self):
        """The entries changed since the last call, as plain lists (None when this stream keeps no per-shard state)."""
        if not self.tracked:
            return None
        changes = {u: [*self.entries[u][:3], sorted(self.entries[u][3])] for u in self.changed}
        self.changed.clear()
        return changes


def shuffled_pass(urls, rng, holdout=frozenset(), stride=1, offset=0, owned=None, ledger=None, cycle=0,
                  shard_timeout=None):
    """One pass over the raw samples of `urls` in an rng-drawn shard order, through an rng-seeded shuffle buffer.

    `stride`/`offset` keep every stride-th sample (consumers sharing shards); held-out samples never reach training;
    of the shards that fail, only the `owned` ones (all by default) are counted here. With a `ledger`, only what pass
    `cycle` of each shard still needs is read, and what enters the buffer is recorded.
    """
    shards = rng.sample(urls, len(urls))
    read = lambda u: read_shard(u, owned is None or u in owned, shard_timeout)  # noqa: E731
    ledger = ledger or PassLedger(None, tracked=False)
    samples = itertools.chain.from_iterable(ledger.shard(u, cycle, read) for u in shards)
    samples = itertools.islice(samples, offset, None, stride)
    samples = ledger.entered(s for s in samples if sample_id(s) not in holdout)
    return wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER // 10, rng=rng)(samples)


def consumer_samples(urls, seed, holdout, resume=None, resampled=False, shard_timeout=None):
    """Endless stream of raw samples for this (rank, dataloader worker).

    Shards are dealt round-robin to the ranks x workers consumers; with fewer shards than consumers (or when a
    consumer's own shards are all unreadable) it reads all shards and keeps every N-th sample instead, or all of them
    when there are fewer samples than consumers. Each consumer cycles through its part forever, one shuffled pass per
    cycle, so every rank can run the same number of steps and none waits on another that ran dry.

    A resumed run passes `resume` (see resume_data): its `plan`, the per-shard state this stream starts from (the
    rest of each shard's current pass, whoever read it before), and, when the checkpoint's ranks x workers are this
    run's, the number of raw samples each consumer had used since that plan (`positions`): the stream skips that many
    undecoded, so it continues exactly where it stopped. With `resampled`, each pass draws as many shards as the
    consumer's part holds, with replacement (and keeps no per-shard state).
    """
    rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
    consumers, me = world_size * num_workers, rank * num_workers + worker
    resume = resume or {}
    positions = resume.get("positions")
    skip = positions[me] if positions is not None and len(positions) == consumers else 0
    # This consumer's part, and what it falls back to when that part holds no readable sample: a stride over all
    # shards, then (fewer samples than consumers) every sample.
    parts = [(urls, consumers, me), (urls, 1, 0)]
    if len(urls) >= consumers:
        parts.insert(0, (urls[me::consumers], 1, 0))
    # Every shard has one owner, who counts its failure: consumers that share shards would count it N times.
    owned = None if resampled else frozenset(urls[me::consumers])
    plan = None if resampled else resume.get("plan")
    # Shared shards (a stride) leave the per-shard state to no one: a resume on other consumers starts that pass over.
    ledger = PassLedger.current = PassLedger(plan, tracked=len(parts) == 3 and not resampled)
    last_planned = max((plan.get(u, FRESH)[0] for u in parts[0][0]), default=-1) if plan else -1
    for cycle in itertools.count(ledger.first_pass(parts[0][0])):
        shard_list, stride, offset = parts[0]
        if resampled:
            shard_list = random.Random(f"{seed}-{cycle}-{me}-resample").choices(urls, k=len(shard_list))
        # When consumers share shards they must all read them in the same order, so `me` stays out of that seed.
        rng = random.Random(f"{seed}-{cycle}-{me if stride == 1 and len(shard_list) < len(urls) else 'all'}")
        used = 0
        for sample in shuffled_pass(shard_list, rng, holdout, stride, offset, owned, ledger, cycle, shard_timeout):
            used += 1
            ledger.left(sample)
            DATA_STATS["samples_read"] += 1
            if DATA_STATS["samples_read"] > skip:
                yield sample
        if used or cycle <= last_planned:  # a resumed pass may rightly need nothing more of this part
            continue
        if len(parts) == 1:
            raise RuntimeError(f"no readable sample in any shard for consumer {me}")
        parts.pop(0)
        ledger.tracked = False
        logger.warning(f"consumer {me} (rank {rank}, worker {worker}) found no readable sample in its part of"
                       f" the shards; it now reads {'every %d-th' % parts[0][1] if parts[0][1] > 1 else 'every'}"
                       " sample of all shards")


def batches_of(samples, size):
    """Full batches, yielded as soon as complete, each with the per-shard data state as of its last sample.
    (wds.batched reads one sample ahead; that sample would be missing from the data position saved with a
    checkpoint, and a resumed run would skip it.)"""
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            batch = collate_fn(batch)
            batch["shard_changes"] = PassLedger.current.take_changes() if PassLedger.current else None
            yield batch
            batch = []
def with_degradation_draws(batches, preset, rng):
    """Each batch with its --condition_degradation draws for the images that make_tile_pair left without a condition
    (None where there is none: the preset 'none', or every image kept clean): the worker draws, the device degrades."""
    for batch in batches:
        conditions = batch["conditioning_pixel_values"]
        pending = [None if torch.is_tensor(conditions) or conditions[i] is not None else factor
                   for i, factor in enumerate(batch["condition_scales"])]
        batch["degradation"] = (draw_degradation_groups(preset, pending, rng)
                                if any(f is not None for f in pending) else None)
        yield batch


def make_train_dataloader(args, tokenizer, holdout=frozenset(), resume=None):
    """open_clip-style pipeline: this consumer's shuffled raw samples -> tile pairs -> batches. `resume`: where a
    resumed run's data stream starts (see resume_data)."""
    urls = wds.shardlists.expand_urls(args.train_shards_path_or_url)
    seed = 0 if args.seed is None else args.seed
    rank = wds.utils.pytorch_worker_info()[0]
    pipeline = wds.DataPipeline(
        partial(consumer_samples, urls, seed, frozenset(holdout), resume, args.resampled_shards,
                shard_timeout(args)),
        wds.map(partial(make_tile_pair, tokenizer=tokenizer, args=args, rng=random), handler=count_skip),
        partial(batches_of, size=args.train_batch_size),
        partial(with_degradation_draws, preset=args.condition_degradation, rng=random),
    )
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,  # batched in the pipeline
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.dataloader_num_workers > 0,
        prefetch_factor=4 if args.dataloader_num_workers > 0 else None,
        worker_init_fn=survive_stop_signals,
        # Worker seeds come from this generator, not the global RNG, so building the loader never shifts the
        # training noise and a resumed run draws exactly what an uninterrupted one would.
        generator=torch.Generator().manual_seed(seed * 1000 + rank),
    )


def shard_timeout(args):
    return args.shard_timeout or None  # 0: no watchdog


def load_holdout(args, tokenizer):
    """The first usable samples of the shard list, centre-cropped: the held-out batch (None if 0 are asked for).

    Read by every rank, at start-up: their keys are excluded from training everywhere, and a spec with no usable
    sample at all stops the run here with one clear error instead of hanging or failing inside a worker.
    """
    wanted = max(1, args.num_holdout_samples)
    examples = []
    urls = wds.shardlists.expand_urls(args.train_shards_path_or_url)
    reads = (read_shard(u, report=False, timeout=shard_timeout(args)) for u in urls)  # training reports them
    for sample in itertools.chain.from_iterable(reads):
        try:
            examples.append(make_tile_pair(sample, tokenizer, args))
        except SkipSample:
            continue
        if len(examples) == wanted:
            break
    skipped = {k: v for k, v in DATA_STATS.items() if v}
    reset_data_stats()  # reading the held-out samples is not training
    if not examples:
        raise SystemExit(f"error: no usable sample in --train_shards_path_or_url={args.train_shards_path_or_url}"
                         f" (skipped: {skipped})")
    if args.num_holdout_samples == 0:
        return None
    if len(examples) < 2:
        raise SystemExit(f"error: --num_holdout_samples={args.num_holdout_samples} but the shards hold only"
                         f" {len(examples)} usable sample(s); use --num_holdout_samples=0")
    if len(examples) < wanted:
        logger.warning(f"only {len(examples)} of --num_holdout_samples={wanted} usable samples could be held out")
    return collate_fn(examples)


# ----------------------------------------------------------------------------------------------------------------
# Validation


def validation_pairs(args):
    if args.validation_image is None:
        return []
    images, prompts = args.validation_image, args.validation_prompt
    if len(images) == 1:
        images = images * len(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(images)
    return list(zip(images, prompts))


def validation_condition(path, args):
    """A validation image becomes a condition the way a training image does (centre crop instead of random)."""
    image = square_crop(to_rgb(Image.open(path)), args.resolution, args.interpolation)
    small = resize(image, args.condition_resolution, args.interpolation)
    return tensor_to_image(enlarge_condition(small[None], args.resolution, args.interpolation)[0])


def image_grid(rows):
    """rows: lists of equally sized PIL images -> one image, one row per list."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * w, y * h))
    return grid


def psnr(a, b, cap=100.0):
    """PSNR in dB between two same-sized PIL images (capped: identical images would be infinite)."""
    mse = np.mean((np.asarray(a, np.float64) / 255 - np.asarray(b, np.float64) / 255) ** 2)
    return cap if mse == 0 else min(cap, 10 * math.log10(1.0 / mse))


def controlnet_loss(vae, unet, controlnet, noise_scheduler, pixel_values, conditions, encoder_hidden_states,
                    weight_dtype, timesteps=None, generator=None, added_cond_kwargs=None):
    """The training objective, per sample: MSE of the UNet+ControlNet prediction against the noise (or v) target.

    With a `generator` and `timesteps` the latents' posterior sample and the noise are fixed, so two calls that
    differ only in their conditions are comparable (the condition-use gap). `added_cond_kwargs`: SDXL's
    (prompt_conditioning), given to the ControlNet and the UNet alike.
    """
    vae_dtype = getattr(vae, "dtype", weight_dtype)  # float32 for an SDXL VAE kept out of fp16 (vae_dtype_for)
    latents = vae.encode(pixel_values.to(dtype=vae_dtype)).latent_dist.sample(generator)
    latents = (latents * vae.config.scaling_factor).to(weight_dtype)
    added = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy_latents = noise_scheduler.add_noise(latents.float(), noise.float(), timesteps).to(dtype=weight_dtype)
    down_block_res_samples, mid_block_res_sample = controlnet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=conditions.to(dtype=weight_dtype),
        return_dict=False,
        **added,
    )
    model_pred = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        down_block_additional_residuals=[s.to(dtype=weight_dtype) for s in down_block_res_samples],
        mid_block_additional_residual=mid_block_res_sample.to(dtype=weight_dtype),
        return_dict=False,
        **added,
    )[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
    return F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


HOLDOUT_REPEATS = 4  # noise draws per held-out sample, at timesteps spread over the whole schedule


def holdout_losses(models, noise_scheduler, pixel_values, prompt, conditions, weight_dtype, device, seed):
    """{name: held-out denoising loss of the targets `pixel_values` (from model_inputs) with conditions[name]}, every
    one with the same latents, noise and timesteps. `prompt`: the samples' (encoder hidden states,
    added_cond_kwargs) from prompt_conditioning.

    So the gap between the losses with the true conditions and with conditions rolled across the batch measures
    how much the prediction uses the condition: ~0 while the ControlNet ignores it, growing once it follows it.
    """
    vae, unet, controlnet = models
    n = pixel_values.shape[0]
    pixel_values = pixel_values.repeat(HOLDOUT_REPEATS, 1, 1, 1)
    repeat = lambda x: x.repeat(HOLDOUT_REPEATS, *[1] * (x.dim() - 1))
    prompt_states, added = repeat(prompt[0]), prompt[1] and {k: repeat(v) for k, v in prompt[1].items()}
    timesteps = torch.linspace(0, noise_scheduler.config.num_train_timesteps - 1, n * HOLDOUT_REPEATS, device=device)
    timesteps = timesteps.long()[torch.randperm(n * HOLDOUT_REPEATS, generator=torch.Generator().manual_seed(seed)).to(device)]
    losses = {}
    for name, conds in conditions.items():
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            losses[name] = controlnet_loss(
                vae, unet, controlnet, noise_scheduler, pixel_values,
                conds.repeat(HOLDOUT_REPEATS, 1, 1, 1), prompt_states, weight_dtype, timesteps, generator, added,
            ).mean().item()
    return losses


def holdout_variants(targets, args):
    """Degraded held-out conditions that no recipe trains on exactly, scored beside the clean ones so that a run's
    robustness to real inputs can be watched: {name: (reduction factor, uint8 low-resolution images)}."""
    factor = clean_scale(args)
    area = lambda f: torch.stack([resize(t, condition_size(args.resolution, f), "box") for t in targets])
    return {
        "jpeg30": (factor, quantise(jpeg(area(factor).float() / 255, torch.full((len(targets),), 30.0)))),
        "x8": (8.0, area(8.0)),
    }


def log_images(accelerator, tag, images, step):
    """Send [(PIL image, caption)] of equal sizes to every tracker."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im, _ in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im, caption=caption) for im, caption in images]}, step=step)
        else:
            logger.warning(f"image logging not implemented for {tracker.name}")


def log_metrics(accelerator, metrics, step, output_dir):
    """Metrics to every tracker and to output_dir/metrics.jsonl, which needs no tracker to plot (see tools/)."""
    accelerator.log(metrics, step=step)
    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def inference_copy(controlnet, device, dtype):
    """A ControlNet for sampling on `device` in `dtype`, holding `controlnet`'s weights (shared where they are already
    there in that dtype, cast otherwise). Built on the meta device: no random init of its ~361M parameters (miniSD)
    and no round trip of the weights through the host while the other ranks wait."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        copy = ControlNetModel.from_config(controlnet.config)
    state = {k: v.detach().to(device, dtype if v.is_floating_point() else v.dtype) for k, v in controlnet.state_dict().items()}
    copy.load_state_dict(state, assign=True)
    copy.set_attn_processor(controlnet.attn_processors)
    return copy.requires_grad_(False).eval()


def validation_pipeline(vae, text_encoder, tokenizer, unet, controlnet, noise_scheduler):
    """diffusers' ControlNet pipeline of the base's family (text_encoder and tokenizer as PromptEncoder takes them)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline, UniPCMultistepScheduler

    shared = dict(vae=vae, unet=unet, controlnet=controlnet,
                  scheduler=UniPCMultistepScheduler.from_config(noise_scheduler.config))
    if isinstance(text_encoder, torch.nn.ModuleList):
        pipeline = StableDiffusionXLControlNetPipeline(
            text_encoder=text_encoder[0], text_encoder_2=text_encoder[1], tokenizer=tokenizer[0],
            tokenizer_2=tokenizer[1], add_watermarker=False, **shared)
    else:
        pipeline = StableDiffusionControlNetPipeline(
            text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **shared)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextlib.contextmanager
def decoding_in_vae_dtype(vae):
    """diffusers' pipelines hand the VAE latents in the UNet's dtype (SDXL's upcasts only a float16 VAE itself): a VAE
    kept float32 under fp16 (vae_dtype_for) gets them cast to its own dtype on the way in."""
    first = vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder
    handle = first.register_forward_pre_hook(lambda module, inputs: (inputs[0].to(vae.dtype), *inputs[1:]))
    try:
        yield
    finally:
        handle.remove()


def log_validation(vae, text_encoder, tokenizer, unet, controlnet, noise_scheduler, args, accelerator, weight_dtype,
                   step, holdout=None, is_final_validation=False):
    logger.info(f"Running validation at step {step}...")
    # Sample from a plain copy in the frozen modules' dtype, as upstream's final validation does: no CUDA-only
    # autocast, no accelerate fp32-output wrapper, and the fp32 weights being trained stay untouched.
    controlnet = inference_copy(controlnet, accelerator.device, weight_dtype)
    pipeline = validation_pipeline(vae, text_encoder, tokenizer, unet, controlnet, noise_scheduler)
    seed = 0 if args.seed is None else args.seed
    generate = partial(pipeline, num_inference_steps=20, height=args.resolution, width=args.resolution)
    prefix = "test" if is_final_validation else "validation"
    grid_dir = Path(args.output_dir, "validation")
    grid_dir.mkdir(parents=True, exist_ok=True)
    name = f"{'final' if is_final_validation else 'step'}-{step:06d}.png"

    image_logs = []
    for i, (path, prompt) in enumerate(validation_pairs(args)):
        condition = validation_condition(path, args)
        generator = torch.Generator(device=accelerator.device).manual_seed(seed)
        with torch.no_grad():
            images = generate(prompt=[prompt] * args.num_validation_images, image=condition, generator=generator).images
        image_logs.append({"validation_image": condition, "images": images, "validation_prompt": prompt})
        log_images(accelerator, f"{prefix}/{i}: {prompt}", [(condition, "condition")] + [(im, prompt) for im in images], step)
    if image_logs:
        image_grid([[log["validation_image"]] + log["images"] for log in image_logs]).save(grid_dir / name)

    if holdout is not None:
        device = accelerator.device
        pixel_values, clean = model_inputs(holdout, args, device)
        variants = holdout_variants(holdout["pixel_values"], args)
        conditions = {"clean": clean, **{name: enlarge_condition(small, args.resolution, args.interpolation, device)
                                         for name, (_, small) in variants.items()}}
        with torch.no_grad():
            prompt = prompt_conditioning(holdout, PromptEncoder(text_encoder, tokenizer, device).encode, device)
        losses = holdout_losses((vae, unet, controlnet), noise_scheduler, pixel_values, prompt,
                                {"rolled": clean.roll(1, dims=0), **conditions}, weight_dtype, device, seed)
        targets = [tensor_to_image(t) for t in holdout["pixel_values"]]

        def condition_psnr(outputs, factor, references=None):
            """Fidelity to the condition: the outputs reduced as the clean conditions were made, against the clean
            reductions of their targets (or `references`)."""
            size = condition_size(args.resolution, factor)
            small = [resize(image_to_tensor(im), size, args.interpolation) for im in outputs]
            references = references or [resize(t, size, args.interpolation) for t in holdout["pixel_values"]]
            return float(np.mean([psnr(tensor_to_image(o), tensor_to_image(r)) for o, r in zip(small, references)]))

        metrics = {
            "holdout/loss": losses["clean"],
            "holdout/loss_rolled_condition": losses["rolled"],
            "holdout/condition_gap": losses["rolled"] - losses["clean"],
        }
        factors = {"clean": clean_scale(args), **{k: f for k, (f, _) in variants.items()}}
        for variant, enlarged in conditions.items():
            images = [tensor_to_image(c) for c in enlarged]
            generator = torch.Generator(device=device).manual_seed(seed)
            with torch.no_grad():
                outputs = generate(prompt=holdout["captions"], image=images, generator=generator).images
            if variant == "clean":  # against another sample's condition: the control
                small_target = list(holdout["conditioning_pixel_values"])
                metrics["holdout/condition_psnr"] = condition_psnr(outputs, factors[variant], small_target)
                metrics["holdout/condition_psnr_rolled"] = condition_psnr(outputs, factors[variant], small_target[-1:] + small_target[:-1])
            else:  # inputs degraded as no recipe trains on them exactly: does the model keep (or restore) the content?
                metrics[f"holdout/{variant}/loss"] = losses[variant]
                metrics[f"holdout/{variant}/condition_psnr"] = condition_psnr(outputs, factors[variant])
            tag = "" if variant == "clean" else f"{variant}-"
            grid = image_grid([list(row) for row in zip(images, outputs, targets)])
            grid.save(grid_dir / f"holdout-{tag}{name}")
            log_images(accelerator, f"{prefix}/holdout{' ' + variant if tag else ''}: condition | output | ground truth",
                       [(grid, "held-out samples")], step)
        log_metrics(accelerator, metrics, step, args.output_dir)
        logger.info(
            f"held-out at step {step}: loss {metrics['holdout/loss']:.4f}, with rolled conditions"
            f" {metrics['holdout/loss_rolled_condition']:.4f}, condition-use gap {metrics['holdout/condition_gap']:+.4f};"
            f" condition PSNR {metrics['holdout/condition_psnr']:.2f} dB (rolled control"
            f" {metrics['holdout/condition_psnr_rolled']:.2f} dB); degraded inputs: "
            + ", ".join(f"{v} {metrics[f'holdout/{v}/condition_psnr']:.2f} dB" for v in variants)
        )

    del pipeline, controlnet
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return image_logs


def tile_config(args):
    """How this run makes its conditions: saved beside every ControlNet it writes, read back by upscale.py."""
    return {
        "resolution": args.resolution,
        "condition_resolution": args.condition_resolution,
        "scale": clean_scale(args),
        "interpolation": args.interpolation,
        "condition_scales": args.condition_scales or [clean_scale(args)],
        "condition_degradation": args.condition_degradation,
        "no_degradation_prob": args.no_degradation_prob,
        "family": args.family,  # of the base it was trained on: sdxl (SDXL's added conditioning) or sd (1.x/2.x)
    }


def save_tile_config(args, directory):
    with open(os.path.join(directory, TILE_CONFIG), "w") as f:
        json.dump(tile_config(args), f, indent=2)


def load_tile_config(directory):
    """The tile settings saved with a ControlNet; a folder from before they were saved gets this script's defaults."""
    path = os.path.join(directory, TILE_CONFIG)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    defaults = make_parser().parse_args([])
    logger.warning(f"no {TILE_CONFIG} in {directory} (saved before tile settings were recorded): assuming the"
                   f" trainer's defaults, {defaults.resolution} px targets from {defaults.condition_resolution} px"
                   f" conditions, {defaults.interpolation}")
    return tile_config(defaults)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

DATA_STATE = "data_state.json"
MANIFEST = "checkpoint_manifest.json"  # written last: a checkpoint with one is complete if every file matches it


def list_checkpoints(output_dir):
    """Checkpoint directories in output_dir as [(step, path)], oldest first. Other names are ignored."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, d)) for d in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(d))]
    return sorted(found)


def checkpoint_files(path):
    """Every file under `path`, as paths relative to it, sorted."""
    return sorted(os.path.relpath(os.path.join(root, name), path) for root, _, names in os.walk(path) for name in names)


def file_checksum(path):
    """CRC32 of a file's bytes: ~1.6 GB/s on one core, enough to tell a cut or torn file from a whole one."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def fsync_path(path):
    """Push a file's data, or a directory's entries, to the disk: an atomic rename alone survives a power loss with
    short or empty files under the new name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(path):
    """Main process, once every rank's files are written and synced: each file's size and checksum, written last
    and synced with the folders, so that the manifest's presence says the checkpoint is whole on the disk."""
    files = {name: {"size": os.path.getsize(os.path.join(path, name)), "crc32": file_checksum(os.path.join(path, name))}
             for name in checkpoint_files(path)}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for folder in {os.path.dirname(os.path.join(path, name)) for name in files} | {path}:
        fsync_path(folder)


def manifest_problem(path, checksums=True):
    """Why the files of a checkpoint with a manifest do not match it (None if they do)."""
    with open(os.path.join(path, MANIFEST)) as f:
        files = json.load(f)["files"]
    for name, expected in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != expected["size"]:
            return f"{name} has {os.path.getsize(file)} bytes, {expected['size']} were written"
        if checksums and file_checksum(file) != expected["crc32"]:
            return f"{name} is damaged (checksum mismatch)"
    return None


def checkpoint_problem(path, checksums=True):
    """Why `path` is not a complete, readable checkpoint of this script (None if it is).

    A checkpoint with a manifest is checked against it (every file's size, and its checksum unless `checksums` is
    False). One without (written by upstream's script) gets structural checks: the model's header, and each torch
    file's zip directory, which sits at the file's end, so that a cut file fails.
    """
    from safetensors import safe_open

    try:
        if os.path.exists(os.path.join(path, MANIFEST)):
            return manifest_problem(path, checksums)
        with open(os.path.join(path, "controlnet", "config.json")) as f:
            json.load(f)
        with safe_open(os.path.join(path, "controlnet", "diffusion_pytorch_model.safetensors"), "pt") as f:
            f.keys()
        rng_states = [n for n in os.listdir(path) if n.startswith("random_states_") and n.endswith(".pkl")]
        for name in ["optimizer.bin", "scheduler.bin"] + sorted(rng_states or ["random_states_0.pkl"]):
            with zipfile.ZipFile(os.path.join(path, name)):  # torch.save's container: its directory is read
                pass
        if os.path.exists(os.path.join(path, DATA_STATE)):  # absent in checkpoints of upstream's script
            with open(os.path.join(path, DATA_STATE)) as f:
                json.load(f)
    except Exception as exn:
        return f"{type(exn).__name__}: {exn}"
    return None


def usable_checkpoints(output_dir, checksums=True):
    """(step, path) of each complete checkpoint in output_dir, newest first; each damaged or foreign one on the way
    is named in one warning, once it is reached."""
    for step, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path, checksums)
        if problem is None:
            yield step, path
        else:
            logger.warning(f"ignoring {path}: not a usable checkpoint ({problem})")


def resolve_checkpoint(spec, output_dir, checksums=True):
    """--resume_from_checkpoint -> the (step, path) to try in turn, newest first, lazily verified (none for 'latest'
    with no usable checkpoint).

    'latest' gives every complete checkpoint, so that a load that fails anyway falls back to the next older one;
    incomplete, damaged or foreign ones are skipped with a warning. An explicit path (or checkpoint name in
    output_dir) must be a valid checkpoint: ValueError otherwise.
    """
    if spec == "latest":
        return usable_checkpoints(output_dir, checksums)
    path = spec if os.path.isdir(spec) else os.path.join(output_dir, spec)
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not (m and os.path.isdir(path)):
        raise ValueError(f"no checkpoint-N directory at {spec}")
    problem = checkpoint_problem(path, checksums)
    if problem is not None:
        raise ValueError(f"{path} is not a usable checkpoint ({problem})")
    return iter([(int(m.group(1)), path)])


def agreed_checkpoints(accelerator, spec, output_dir):
    """resolve_checkpoint's candidates as the main process verifies them, handed to every rank one at a time.

    One process reads each checkpoint's checksums (not every rank of every node: an SDXL checkpoint with AdamW's
    states is ~15 GB), a damaged one is named in one warning, and all ranks try the same checkpoint in the same
    order even where their views of a shared filesystem differ. Collective: every rank takes as many items from it as
    the others (load_checkpoint stops every rank at the same one)."""
    from accelerate.utils import broadcast_object_list

    candidates, problem = None, None
    if accelerator.is_main_process:
        try:
            candidates = resolve_checkpoint(spec, output_dir)
        except ValueError as exn:  # an explicit checkpoint whose checksums do not match
            problem = str(exn)
    while True:
        found = [problem or (next(candidates, None) if accelerator.is_main_process else None)]
        broadcast_object_list(found)
        if isinstance(found[0], str):
            raise SystemExit(f"error: --resume_from_checkpoint: {found[0]}")
        if found[0] is None:
            return
        yield tuple(found[0])


def newest_checkpoint(output_dir):
    """For error messages: where the user's training can be resumed from (sizes checked, not checksums)."""
    found = next(usable_checkpoints(output_dir, checksums=False), None)
    return f"the newest complete checkpoint is {found[1]}" if found else "there is no complete checkpoint yet"


def check_finite_weights(model, what):
    """Never write non-finite weights: they would replace good ones (and push them out of --checkpoints_total_limit).
    One host read per save."""
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise SystemExit(f"error: not writing {what}: the ControlNet's weights are not finite")


def failed_on_any_rank(accelerator, failure):
    """Whether `failure` (an exception or None) happened on any rank (collective: every rank must call it)."""
    failed = accelerator.reduce(torch.tensor([failure is not None], dtype=torch.float64, device=accelerator.device), "sum")
    return bool(failed.item())


def write_checkpoint_files(accelerator, path, step, data_positions):
    """Every rank: accelerate's state and the data state into `path`, each file synced to the disk by the rank that
    wrote it. -> the exception that stopped it (a full disk), or None."""
    try:
        accelerator.save_state(path)  # rank 0 writes model/optimizer/scheduler, each rank its RNG state
        if accelerator.is_main_process:
            with open(os.path.join(path, DATA_STATE), "w") as f:
                json.dump({"step": step, **data_positions}, f)  # see DataProgress.state
        written = checkpoint_files(path) if accelerator.is_main_process else [f"random_states_{accelerator.process_index}.pkl"]
        for name in written:
            fsync_path(os.path.join(path, name))
    except Exception as exn:  # ENOSPC, EDQUOT, EIO... surface from torch.save as RuntimeError, from open as OSError
        return exn
    return None


def save_checkpoint(accelerator, args, step, data_positions, controlnet):
    """Every rank: write checkpoint-N under a temporary name; rank 0 adds the manifest once every rank's files are on
    the disk, renames it, then prunes.

    A crash, kill or power loss at any moment leaves either the previous checkpoints alone or the new one complete.
    A write that fails on any rank (a full disk) removes the partial checkpoint and stops every rank with one error.
    """
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    partial_path = os.path.join(args.output_dir, f".checkpoint-{step}.partial")
    check_finite_weights(controlnet, f"checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial_path, ignore_errors=True)
    accelerator.wait_for_everyone()
    failure = write_checkpoint_files(accelerator, partial_path, step, data_positions)
    if not failed_on_any_rank(accelerator, failure) and accelerator.is_main_process:
        try:
            write_manifest(partial_path)
        except OSError as exn:
            failure = exn
    if failed_on_any_rank(accelerator, failure):
        if accelerator.is_main_process:
            shutil.rmtree(partial_path, ignore_errors=True)
        raise SystemExit(f"error: could not write checkpoint-{step} ({failure or 'failed on another rank'}); the partial"
                         f" checkpoint was removed and {newest_checkpoint(args.output_dir)}. Free space in --output_dir"
                         " and rerun with --resume_from_checkpoint=latest")
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial_path, final)
        fsync_path(args.output_dir)  # the rename itself
        logger.info(f"Saved state to {final}")
        if args.checkpoints_total_limit is not None:
            prune_checkpoints(args.output_dir, args.checkpoints_total_limit, keep=final)
    accelerator.wait_for_everyone()


def prune_checkpoints(output_dir, limit, keep):
    """Remove all but the newest `limit` checkpoints, never `keep` (the one just written and verified): a damaged or
    stale checkpoint of a later step, left by an earlier run, must not push it out."""
    for _, old in list_checkpoints(output_dir)[:-limit]:
        if old != keep:
            logger.info(f"removing checkpoint {old} (--checkpoints_total_limit={limit})")
            shutil.rmtree(old)


def load_checkpoint(accelerator, candidates):
    """accelerator.load_state of the first of `candidates` ((step, path), newest first) that loads on every rank ->
    its (step, path), or None if there was none. A load that fails anyway (damage no check saw) falls back to the
    next older checkpoint; if none loads, the run stops, since a failed load may have changed some of the state."""
    tried = []
    for step, path in candidates:
        accelerator.print(f"Resuming from checkpoint {path}")
        failure = None
        try:
            accelerator.load_state(path)
        except Exception as exn:
            failure = exn
        if not failed_on_any_rank(accelerator, failure):
            if not os.path.exists(os.path.join(path, f"random_states_{accelerator.process_index}.pkl")):
                logger.warning(f"{path} holds no random state for rank {accelerator.process_index} (written by fewer"
                               " ranks): this rank's random streams start afresh, so the resume is not exact")
            return step, path
        logger.warning(f"could not load {path} ({failure or 'failed on another rank'}); trying the next older checkpoint")
        tried.append(path)
    if tried:
        raise SystemExit(f"error: no checkpoint could be loaded (tried {', '.join(tried)}); rerun without"
                         " --resume_from_checkpoint to start over, or point it at a good checkpoint")
    return None


def save_final_model(controlnet, args):
    """save_pretrained into a temporary folder, then move each file into place: never a half-written model file."""
    output_dir = args.output_dir
    check_finite_weights(controlnet, "the final model")
    partial_path = os.path.join(output_dir, ".final.partial")
    shutil.rmtree(partial_path, ignore_errors=True)
    try:
        controlnet.save_pretrained(partial_path)
        save_tile_config(args, partial_path)
    except Exception as exn:  # a full disk: keep what is there, say where training can be resumed from
        shutil.rmtree(partial_path, ignore_errors=True)
        raise SystemExit(f"error: could not write the final model to {output_dir} ({exn}); {newest_checkpoint(output_dir)}")
    for name in os.listdir(partial_path):
        os.replace(os.path.join(partial_path, name), os.path.join(output_dir, name))
    os.rmdir(partial_path)
    logger.info(f"Saved the ControlNet to {output_dir}")


def save_model_card(output_dir, base_model, image_logs=None, repo_id=None, family="sd"):
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    img_str = ""
    for i, log in enumerate(image_logs or []):
        image_grid([[log["validation_image"]] + log["images"]]).save(os.path.join(output_dir, f"images_{i}.png"))
        img_str += f"prompt: {log['validation_prompt']}\n\n![images_{i}](./images_{i}.png)\n\n"
    description = f"""
# controlnet-tile {repo_id or ''}

ControlNet **tile** weights trained on {base_model} ({FAMILY_NAMES[family]}): the condition is the image reduced to a low resolution and
enlarged back, so the model learns to add detail that follows the low-resolution layout (upscaling / re-detailing).
Each row below shows the condition, then generated images.

{img_str}
"""
    # Built from diffusers' template directly: its loader would look the card up on the hub first.
    license = "openrail++" if family == "sdxl" else "creativeml-openrail-m"  # the base models' licences
    card = ModelCard.from_template(
        ModelCardData(license=license, library_name="diffusers", inference=True, base_model=base_model),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=description,
    )
    family_tags = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"] if family == "sdxl" else [
        "stable-diffusion", "stable-diffusion-diffusers"]
    tags = family_tags + ["text-to-image", "diffusers", "controlnet", "controlnet-tile", "diffusers-training"]
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


class PromptEncoder:
    """The frozen text encoder(s), with the empty caption's states computed once: with --proportion_empty_prompts
    those rows need no encoder pass. Which rows are empty is read from the token ids on the host, and the rows are
    taken and put back in runs, by slicing: no index tensor crosses to the device (a blocking copy, a host sync).

    `text_encoder`: one encoder (SD-1.x/2.x: its last hidden states), or SDXL's two in a ModuleList with their two
    tokenizers in a list: as diffusers' SDXL pipelines encode prompts, both encoders' penultimate hidden states side
    by side, and the second's projected pooled output. Called with one tensor of token ids per encoder -> the
    states (SD), or (states, pooled embeddings) (SDXL).
    """

    def __init__(self, text_encoder, tokenizer, device):
        self.text_encoder, self.device = text_encoder, device
        self.sdxl = isinstance(text_encoder, torch.nn.ModuleList)
        tokenizers = tokenizer if self.sdxl else [tokenizer]
        self.empty_ids = token_ids(tokenizers[0], "")  # an empty caption is empty for every tokenizer
        with torch.no_grad():
            self.empty_states = self.encode(*(token_ids(t, "").to(device) for t in tokenizers))

    def encode(self, *input_ids):
        """The encoder pass, without the cache."""
        input_ids = [i.to(self.device, non_blocking=True) for i in input_ids]  # (a no-op for __call__'s)
        if not self.sdxl:
            return self.text_encoder(*input_ids, return_dict=False)[0]
        outputs = [encoder(ids, output_hidden_states=True) for encoder, ids in zip(self.text_encoder, input_ids)]
        return torch.cat([out.hidden_states[-2] for out in outputs], dim=-1), outputs[-1].text_embeds

    def __call__(self, *input_ids):
        ids = [i.to(self.device, non_blocking=True) for i in input_ids]  # the loader's pinned batch
        empty = (input_ids[0] == self.empty_ids).all(dim=1).tolist()
        if not any(empty):
            return self.encode(*ids)
        runs, start = [], 0  # (is empty, first row, rows) of each run of alike rows
        for is_empty, rows in itertools.groupby(empty):
            n = len(list(rows))
            runs.append((is_empty, start, n))
            start += n
        kept = [[i[first:first + n] for is_empty, first, n in runs if not is_empty] for i in ids]
        encoded = self.encode(*(torch.cat(k) for k in kept)) if kept[0] else None
        if not self.sdxl:
            return self.merge(runs, self.empty_states, encoded)
        return tuple(self.merge(runs, e, None if encoded is None else x) for e, x in zip(self.empty_states, encoded))

    @staticmethod
    def merge(runs, empty, encoded):
        """The batch's rows in order: the cached empty ones and the encoded others."""
        parts, done = [], 0
        for is_empty, first, n in runs:
            parts.append(empty.expand(n, *empty.shape[1:]) if is_empty else encoded[done:done + n])
            done += 0 if is_empty else n
        return torch.cat(parts)


def prompt_conditioning(batch, encode, device):
    """A batch's text conditioning -> (encoder hidden states, added_cond_kwargs): None for SD-1.x/2.x; for SDXL its
    pooled embeddings and each sample's own time ids (make_tile_pair), as both the ControlNet and the UNet take them."""
    if "input_ids_2" not in batch:
        return encode(batch["input_ids"]), None
    states, pooled = encode(batch["input_ids"], batch["input_ids_2"])
    time_ids = batch["time_ids"].to(device, dtype=states.dtype, non_blocking=True)
    return states, {"text_embeds": pooled, "time_ids": time_ids}


def load_tokenizer(args, subfolder="tokenizer"):
    """The base's tokenizer (--tokenizer_name replaces the first one); load_tokenizers gives all of the family's."""
    from transformers import AutoTokenizer

    replaced = args.tokenizer_name and subfolder == "tokenizer"
    return AutoTokenizer.from_pretrained(
        args.tokenizer_name if replaced else args.pretrained_model_name_or_path,
        subfolder=None if replaced else subfolder,
        revision=args.revision,
        cache_dir=args.cache_dir,
        use_fast=False,  # as upstream; transformers 5 always gives the fast one (see TOKENIZERS_PARALLELISM above)
    )


def load_tokenizers(args):
    """The tokenizer (SD-1.x/2.x), or SDXL's two in a list (make_tile_pair, PromptEncoder)."""
    tokenizers = [load_tokenizer(args, name.replace("text_encoder", "tokenizer")) for name in TEXT_ENCODERS[args.family]]
    return tokenizers if args.family == "sdxl" else tokenizers[0]


def load_models(args):
    """-> (noise scheduler, text encoder, VAE, UNet, ControlNet). The text encoder of an SDXL base is its two, in a
    ModuleList (freezing and casting treat them as one; PromptEncoder tells the families apart by it)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler", **common)
    text_encoder = CLIPTextModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="text_encoder", variant=args.variant, **common
    )
    if args.family == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="text_encoder_2", variant=args.variant, **common
        )
        text_encoder = torch.nn.ModuleList([text_encoder, text_encoder_2])
    if args.pretrained_vae_model_name_or_path:  # its own repository: the base's revision and variant are not its
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
    else:
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
    return noise_scheduler, text_encoder, vae, unet, controlnet


# ----------------------------------------------------------------------------------------------------------------
# Training


STAT_KEYS = ("samples_read",) + SKIP_REASONS


class DataProgress:
    """This rank's data counters and per-shard data state: the latest copy carried by a batch of each of its consumers
    (see collate_fn and PassLedger), on top of the state the run started from."""

    def __init__(self, accelerator, num_workers, resume=None, urls=()):
        resume = resume or {}
        self.per_rank = max(1, num_workers)
        self.mine = range(accelerator.process_index * self.per_rank, (accelerator.process_index + 1) * self.per_rank)
        self.consumers = accelerator.num_processes * self.per_rank
        self.start = resume.get("positions")
        self.plan = resume.get("plan")  # where this run's stream began: a same-layout resume replays from it
        # The state at the checkpoint resumed from, unknown for checkpoints that kept none (shared shards, resampled)
        self.shards = {u: FRESH for u in urls} if not resume else resume.get("shards")
        self.changed, self.tracked = {}, self.shards is not None
        self.latest, self.pending = {}, []
        self.last_totals = {}
        self.reported = None

    def update(self, batch):
        self.latest[batch["consumer"]] = batch["data_stats"]
        changes = batch.get("shard_changes")
        if changes is None:
            self.tracked = False
        else:
            self.changed.update(changes)

    def fetched(self, batch):
        """A micro-batch's data, counted in once its optimisation step is taken (`step_taken`): a stop amid a gradient
        accumulation saves the data state of the step before, and a resume reads those micro-batches again."""
        self.pending.append({k: batch.get(k) for k in ("consumer", "data_stats", "shard_changes", "keys")})

    def step_taken(self):
        """-> the micro-batches of the optimisation step just taken, now counted in."""
        taken, self.pending = self.pending, []
        for batch in taken:
            self.update(batch)
        return taken

    def local_totals(self):
        return {k: sum(stats.get(k, 0) for stats in self.latest.values()) for k in STAT_KEYS}

    def positions(self, accelerator):
        """Raw samples each consumer of the job has used: where a resumed run continues (collective)."""
        local = torch.zeros(self.consumers, dtype=torch.float64, device=accelerator.device)
        for c in self.mine:
            default = self.start[c] if self.start else 0  # a worker that has not delivered since the resume
            local[c] = self.latest.get(c, {}).get("samples_read", default)
        return [int(x) for x in accelerator.reduce(local, "sum").tolist()]

    def state(self, accelerator):
        """The data state saved with a checkpoint (collective; resume_data reads it back): each consumer's position
        in its stream and the plan that stream began from, for a resume on the same ranks x workers, and where every
        shard stands in its current pass, for a resume on any other."""
        from accelerate.utils import gather_object

        positions = self.positions(accelerator)
        changes = gather_object([self.changed if self.tracked else None])
        shards = None
        if all(c is not None for c in changes):
            shards = dict(self.shards)
            for rank_changes in changes:  # every shard has one owner: the ranks' changes never overlap
                shards.update(rank_changes)
        return {"samples_read": positions, "consumers": self.consumers, "plan": compact_shards(self.plan),
                "shards": compact_shards(shards)}

    def report(self, totals, final=False):
        """One log line whenever the skip counts change, and a summary at the end."""
        skips = {k: int(v) for k, v in totals.items() if k != "samples_read" and v}
        if not final and skips == self.reported:
            return
        self.reported = skips
        summary = ", ".join(f"{k}={v}" for k, v in skips.items()) or "none"
        read = int(totals.get("samples_read", 0))
        logger.info(f"{'Data summary' if final else 'data'}: {read} samples read by all ranks and workers; skipped: {summary}")


def compact_shards(shards):
    """Per-shard states as saved: those of shards not yet started in the least advanced pass are left out."""
    if shards is None:
        return None
    first = min((entry[0] for entry in shards.values()), default=0)
    started = {u: list(e) for u, e in shards.items() if tuple(e[:3]) != (first, 0, False) or e[3]}
    return {"pass": first, "shards": started}


def expand_shards(saved, urls):
    if saved is None:
        return None
    unstarted = (saved["pass"], 0, False, ())
    return {u: tuple(saved["shards"].get(u, unstarted)) for u in urls}


def resume_data(path, consumers, resampled, urls):
    """Where a run resumed from checkpoint `path` starts its data stream (see consumer_samples), or None: from the
    beginning. The same ranks x workers continue each consumer's stream exactly; other ranks x workers are dealt the
    rest of every shard's current pass (PassLedger's state), samples that sat in shuffle buffers included."""
    state = None
    if os.path.exists(os.path.join(path, DATA_STATE)):  # absent in checkpoints of upstream's script
        with open(os.path.join(path, DATA_STATE)) as f:
            state = json.load(f)
    if state is not None and len(state["samples_read"]) == consumers:
        return {"positions": state["samples_read"], "plan": expand_shards(state.get("plan"), urls),
                "shards": expand_shards(state.get("shards"), urls)}
    if state is None or state.get("shards") is None or resampled:
        logger.warning("the checkpoint's data position does not fit this run's ranks x workers: the data stream starts"
                       " over (samples seen before may repeat)")
        return None
    plan = expand_shards(state["shards"], urls)
    first = min(entry[0] for entry in plan.values())
    unfinished = sum(1 for entry in plan.values() if entry[0] == first or entry[1] or entry[3])
    pending = sum(len(entry[3]) for entry in plan.values())
    logger.info(f"the checkpoint's data state is from {state.get('consumers', len(state['samples_read']))} consumers"
                f" (ranks x workers), this run has {consumers}: the rest of pass {first} is dealt out to them"
                f" ({unfinished} of {len(plan)} shards unfinished; {pending} samples that sat in shuffle buffers are"
                " read again), and nothing trained in it is trained again")
    return {"positions": None, "plan": plan, "shards": plan}


class IntervalMeter:
    """Sums over one logging interval. The device's numbers stay on the device and the host keeps its own, so that
    logging is the only host read of them; one tensor carries both to the ranks' reduction."""

    def __init__(self, device):
        self.device = device
        self.skipped_total = self.nonfinite_total = 0  # over the run, for the trackers
        self.reset()

    def reset(self):
        self.loss = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        self.step_loss = torch.zeros((), device=self.device)  # the micro-batches of the optimisation step under way
        self.steps = self.applied = 0
        self.data_wait = 0.0
        self.excluded = 0.0
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def waiting_for_data(self):
        t = time.perf_counter()
        yield
        self.data_wait += time.perf_counter() - t

    @contextlib.contextmanager
    def paused(self):
        """Time spent checkpointing or validating is not training time."""
        t = time.perf_counter()
        yield
        self.excluded += time.perf_counter() - t

    def add(self, micro_loss):
        self.step_loss += micro_loss.detach().float()

    def end_step(self, grad_norm, finite, scaled):
        """One optimisation step. A non-finite one was skipped, by fp16's grad scaler (`scaled`) or by the trainer's
        guard: it is counted, and its loss and gradient norm stay out of the interval's means."""
        self.steps += 1
        if finite:
            self.loss += self.step_loss
            self.grad_norm += grad_norm.detach().float()
            self.applied += 1
        elif scaled:
            self.skipped_total += 1
        else:
            self.nonfinite_total += 1
        self.step_loss.zero_()

    def pack(self, local_stats, stop_signal):
        """Everything one rank contributes to the interval's reduction, in one float64 tensor on the device."""
        elapsed = max(1e-9, time.perf_counter() - self.start - self.excluded)
        host = [self.steps, self.applied, self.data_wait / elapsed, elapsed, stop_signal is not None]
        host += [local_stats[k] for k in STAT_KEYS]
        return torch.cat([torch.stack([self.loss, self.grad_norm]).double(),
                          torch.tensor(host, dtype=torch.float64, device=self.device)])

    def collect(self, accelerator, local_stats, stop_signal, samples_per_step):
        """Reduce the interval over ranks (one collective) -> (metrics, data counters, stop reason or None)."""
        values = accelerator.reduce(self.pack(local_stats, stop_signal), "sum")
        loss, grad_norm, steps, applied, wait_share, elapsed, stops, *stats = values.tolist()
        ranks = accelerator.num_processes
        steps, elapsed = steps / ranks, elapsed / ranks
        metrics = {
            "loss": loss / applied if applied else float("nan"),
            "grad_norm": grad_norm / applied if applied else float("nan"),
            "step_time_s": elapsed / steps,
            "images_per_s": samples_per_step * steps / elapsed,
            "data_wait_share": wait_share / ranks,
            # Every rank reads the same all-reduced gradients, so these counts agree on all ranks.
            "train/skipped_steps": self.skipped_total,
            "train/nonfinite_steps": self.nonfinite_total,
        }
        self.reset()
        stop = stop_signal or ("a stop signal on another rank" if stops else None)
        return metrics, dict(zip(STAT_KEYS, stats)), stop


def train_step(batch, models, noise_scheduler, optimizer, lr_scheduler, encode_prompts, meter, accelerator, args,
               weight_dtype):
    """One micro-batch: loss, backward and, at the end of an accumulation, the optimisation step.

    -> False for an optimisation step whose loss or gradient norm is not finite: it changed no weight (fp16's grad
    scaler skipped it, or the guard here did), True otherwise.
    """
    vae, unet, controlnet = models
    scaled = accelerator.scaler is not None  # fp16
    with accelerator.accumulate(controlnet):
        pixel_values, conditions = model_inputs(batch, args, accelerator.device)
        prompt_states, added_cond_kwargs = prompt_conditioning(batch, encode_prompts, accelerator.device)
        loss = controlnet_loss(
            vae, unet, controlnet, noise_scheduler, pixel_values, conditions, prompt_states, weight_dtype,
            added_cond_kwargs=added_cond_kwargs,
        ).mean()
        accelerator.backward(loss)
        meter.add(loss / args.gradient_accumulation_steps)
        finite = True
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(controlnet.parameters(), args.max_grad_norm)
            # The guard's host read, one per optimisation step: a non-finite step must change no weight. The
            # gradients are all-reduced before the norm, so every rank reads the same value and all ranks skip the
            # same steps without a collective; a non-finite loss on any rank makes the reduced gradients so too.
            finite = bool(torch.isfinite(grad_norm))
            meter.end_step(grad_norm, finite, scaled)
        if finite or scaled:  # fp16's scaler skips a non-finite step itself, and must see it to lower its scale
            optimizer.step()
        if finite:  # a fused AdamW takes the scaler's skip inside its kernel, unseen by accelerate's scheduler
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=args.set_grads_to_none)
    return finite


def make_optimizer(args, parameters):
    """AdamW as the flags choose it, whose implementation (fused, foreach or for-loop) stays this run's choice on a
    resume. load_state_dict restores the checkpoint's `fused`/`foreach` flags into the param groups while the
    optimizer keeps the GradScaler protocol its constructor chose: a fused AdamW resumed from a non-fused checkpoint
    would fail at fp16's first step ("Expected grad_scale and found_inf to be None"), the reverse stay fused."""
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("To use 8-bit Adam, install bitsandbytes: `pip install bitsandbytes`.")
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = partial(torch.optim.AdamW, fused=args.use_fused_adam or None)
    optimizer = optimizer_class(
        parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    chosen = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]

    def keep_chosen_implementation(optimizer):
        for group, flags in zip(optimizer.param_groups, chosen):
            group.update(flags)

    optimizer.register_load_state_dict_post_hook(keep_chosen_implementation)
    return optimizer


def vae_dtype_for(vae, weight_dtype, family):
    """The frozen VAE's dtype: the run's, except that under fp16 an SDXL VAE whose config says force_upcast (the
    stock SDXL VAE overflows to NaN in fp16) stays float32, as in diffusers' SDXL pipelines; the fp16-fix VAE says
    it does not need to. (SD-1.x/2.x VAEs run in fp16 as upstream's SD script runs them.)"""
    if family == "sdxl" and weight_dtype == torch.float16 and vae.config.get("force_upcast", True):
        return torch.float32
    return weight_dtype


def use_channels_last(unet, vae, controlnet, args):
    """--channels_last. bitsandbytes' 8-bit optimizers make every parameter contiguous at their first step (their
    kernels need it): with --use_8bit_adam the ControlNet's conv weights would change layout after step 1, and DDP
    warn of mismatched gradient strides at every step, so they stay contiguous from the start."""
    trained = () if args.use_8bit_adam else (controlnet,)
    for model in (unet, vae) + trained:
        model.to(memory_format=torch.channels_last)
    if not trained:
        logger.info("--channels_last with --use_8bit_adam: the frozen UNet and VAE use channels_last; the ControlNet's"
                    " weights stay contiguous, as bitsandbytes' optimizer needs them")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM and spot instances send before they kill a job
STOP_GRACE = 15  # seconds a run waits for data, once a stop has arrived, before it stops at once (see StopRequests)
STALL_POLL = 0.5  # seconds between a stalled rank's reads of the ranks' decision (see StallAgreement)


class StopDuringStall(BaseException):
    """A stop honoured at once, in the wait for data: every rank has waited STOP_GRACE seconds for the same batch.
    Not an Exception: with --dataloader_num_workers=0 it can be raised inside the data pipeline, whose skip handlers
    would count it as a bad sample and go on."""


class StallAgreement:
    """Whether every rank is stalled in the same wait for data, agreed through a key-value store (the process group's;
    an in-memory one for a single process). Used only once a stop has arrived and the grace has run out: a healthy
    run never touches the store.

    Waits are numbered by the batches fetched before them, the same on every rank (each fetches one per micro-batch,
    also under gradient accumulation). A rank whose grace ran out in wait W posts it; the post that makes it every
    rank's decides "stop", and every stalled rank stops there: all are then outside any collective, at the same
    wait, and save together. A rank that posted and then gets its batch decides "go" unless "stop" came first: the
    stall was not total, and the ranks go on to stop at the next logging step. The decision is set once
    (compare_set), so no two ranks read different ones; a rank that never stalled never posts, so a partial stall
    never decides "stop".
    """

    def __init__(self, store, world_size):
        self.store, self.world_size = store, world_size

    @classmethod
    def for_run(cls, accelerator):
        if not torch.distributed.is_available():  # a torch built without it: the stop waits for the logging step
            return None
        from torch.distributed import HashStore, PrefixStore

        if accelerator.num_processes == 1:
            store = HashStore()
        elif torch.distributed.is_initialized():  # torch exposes the default group's store only privately
            store = torch.distributed.distributed_c10d._get_default_store()
        else:
            return None  # ranks that share no store (XLA): a stop during a stall waits for the next logging step
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # never an earlier elastic attempt's keys
        return cls(PrefixStore(f"controlnet-stall-stop/{attempt}", store), accelerator.num_processes)

    def post(self, wait):
        """This rank has waited out the grace in `wait` (once per wait) -> the decision."""
        if self.store.add(f"{wait}/stalled", 1) == self.world_size:
            self.store.compare_set(f"{wait}/decision", "", "stop")
        return self.decision(wait)

    def decision(self, wait):
        """-> "stop", "go" or None (not decided yet)."""
        key = f"{wait}/decision"
        return self.store.get(key).decode() if self.store.check([key]) else None

    def resume(self, wait):
        """This rank, which posted `wait`, got its batch -> the decision: "go" unless "stop" came first."""
        return self.store.compare_set(f"{wait}/decision", "", "go").decode()


class StopRequests:
    """Call it: why training should stop now (None: it should not), checked at logging steps by all ranks at once.
    A stop signal only sets a flag. A launcher's exit is a stop too: an `accelerate launch` or torchrun that dies of
    a signal it does not handle (SIGUSR1 kills it) leaves its ranks running in their own sessions, and they save and
    end instead of training on unsupervised.

    Once the run trains (`agreement` set), a stop signal that finds every rank waiting (`waiting`) for the same batch
    for STOP_GRACE seconds raises StopDuringStall in that wait on every rank (see StallAgreement), so that stalled
    shards cannot hold a stop up for as long as the watchdog's --shard_timeout. While some rank still gets data, the
    stop waits for the next logging step.
    """

    def __init__(self):
        self.received, self.wait_started, self.agreement = [], None, None
        self.waits = 0  # batches fetched so far: the number of the wait under way, the same on every rank
        self.posted, self.decided, self.armed, self.told = False, None, False, False  # see check_wait
        self.busy = False  # check_wait is running: a signal that arrives meanwhile must not post a second time
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handler)
        signal.signal(signal.SIGALRM, lambda signum, frame: self.check_wait())  # the grace's end, see check_wait
        launched = "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ
        self.launcher = os.getppid() if launched else None

    def __call__(self):
        if self.received:
            return self.received[0]
        if self.launcher is not None and os.getppid() != self.launcher:
            return "launcher exit"
        return None

    def handler(self, signum, frame):
        self.received.append(signal.Signals(signum).name)
        self.check_wait()

    def check_wait(self):
        """In a wait, once a stop has arrived: after the grace, post this rank's stall and poll the decision.
        Signal handlers nest: one that comes while this runs (the job-wide signal, then the wrapper's) only records
        its signal, and this call re-arms the poll."""
        if self.busy or not (self.agreement and self.received and self.wait_started is not None) or self.decided:
            return
        waited = time.monotonic() - self.wait_started
        if waited < STOP_GRACE:
            self.alarm(STOP_GRACE - waited + 0.01)  # then SIGALRM checks again
            return
        ask = self.agreement.decision if self.posted else self.agreement.post
        self.busy, self.posted = True, True  # posted before the store hears of it: a post is never repeated
        try:
            self.decided = self.agree(ask)
        finally:
            self.busy = False
        if self.decided == "stop":
            raise StopDuringStall(self.received[0])
        if self.decided is None:
            self.alarm(STALL_POLL)
        if self.decided == "go" or waited >= 2 * STOP_GRACE:  # the ranks' grace ends within seconds of each other
            self.tell_partial_stall()

    def agree(self, ask):
        """One question to the agreement about the wait under way. A store that fails after this rank posted (or
        tried to) leaves its count standing, so the others may still decide "stop" while this rank would train on:
        the rank ends with an error instead, and the launcher ends the group (or restarts it from a checkpoint)."""
        try:
            return ask(self.waits)
        except Exception as exn:
            raise SystemExit(f"error: the ranks could not agree on a stop while waiting for data ({exn!r}); rerun"
                             " with --resume_from_checkpoint=latest") from exn

    def tell_partial_stall(self):
        if not self.told:
            self.told = True
            logger.warning(f"{self.received[0]} received while waiting for data, but not every rank is stalled: the"
                           " stop waits for the next logging step (a stalled shard is abandoned after"
                           " --shard_timeout)")

    def alarm(self, seconds):
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, seconds)

    @contextlib.contextmanager
    def waiting(self):
        """The wait for the next batch. A rank that posted its stall and then gets its batch stops with the others,
        dropping that batch unused, if they decided to stop meanwhile."""
        self.wait_started, self.posted, self.decided = time.monotonic(), False, None
        try:
            self.check_wait()
            yield
        finally:
            self.wait_started = None
            if self.armed:  # no alarm is left to interrupt a collective
                self.armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        if self.posted and self.decided is None:
            self.decided = self.agree(self.agreement.resume)
            if self.decided == "stop":
                raise StopDuringStall(self.received[0])
            self.tell_partial_stall()
        self.waits += 1


def stop_notice(reason, step, saved, while_stalled=False):
    where = " while waiting for data from stalled shards" if while_stalled else ""
    done = f"after saving checkpoint-{step}" if saved else "(no step trained since the run started: nothing to save)"
    logger.warning(f"{reason} received{where}: stopped at step {step} {done}; run the same command with"
                   " --resume_from_checkpoint=latest to continue")


@contextlib.contextmanager
def endless_batches(loader):
    """The loader's batch stream; on the way out (done, stopped or crashed) its workers are shut down. They survive
    stop signals, so multiprocessing's exit-time cleanup could not end them and would wait for them forever; one
    stuck in a stalled read survives torch's own shutdown too, and is killed with the commands it started."""
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # absent with --dataloader_num_workers=0
        if shutdown:
            shutdown()
            for worker in getattr(iterator, "_workers", ()):
                if worker.is_alive():
                    kill_tree(worker.pid)


def end_workers(iterator):
    """End a stalled loader's dataloader workers and the commands they started at once (none with
    --dataloader_num_workers=0): torch's shutdown waits 2 x 5 s, one worker after the other, for each that is stuck in
    a read. Its SIGCHLD handler, which would take their deaths for a crash, is set aside until it has let them go."""
    workers = getattr(iterator, "_workers", ())
    if not workers:
        return
    handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for worker in workers:
            kill_tree(worker.pid)
        iterator._shutdown_workers()
    finally:
        signal.signal(signal.SIGCHLD, handler)


def survive_stop_signals(worker_id):
    """Dataloader workers survive stop signals (torch makes them die of SIGTERM): SLURM signals every process of the
    job, and the main process still needs its data to reach the next logging step and save. The workers end with it.
    A handler that does nothing, not SIG_IGN: an ignored signal stays ignored in every command a worker starts (its
    `pipe:` shards), a handled one is back to its default there."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: None)
    multiprocessing.util.Finalize(None, end_commands, exitpriority=100)  # workers exit without atexit


class DropNotices(logging.Filter):
    """Drops library log lines a user of this script cannot act on, which would bury the ones that matter."""

    NOTICES = {
        "diffusers.models.modeling_utils": (
            "should be kept in float32: []",  # said of every model on every .to(dtype), even when there are none
            "All model checkpoint weights were used", "All the weights of", "If your task is similar",
        ),
        "diffusers.configuration_utils": ("was not found in config. Values will be initialized to default values",
                                          "were passed to", "but are not expected and will be ignored"),
        # Validation imports diffusers' pipelines, whose image processors are never used here.
        "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    }

    def __init__(self, notices):
        super().__init__()
        self.notices = notices

    def filter(self, record):
        message = record.getMessage()
        return not any(notice in message for notice in self.notices)

    @classmethod
    def install(cls, xformers_requested):
        for name, notices in cls.NOTICES.items():
            logging.getLogger(name).addFilter(cls(notices))
        if not xformers_requested:  # its import, by diffusers, warns when its kernels do not fit this torch
            logging.getLogger("xformers").setLevel(logging.ERROR)


def main(args):
    DropNotices.install(args.enable_xformers_memory_efficient_attention)
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
    from diffusers import ControlNetModel
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    stop_requested = StopRequests()  # first: a stop asked for while the models load is honoured too
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

    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        for stale in Path(args.output_dir).glob(".checkpoint-*.partial"):  # left by a run killed mid-save
            logger.warning(f"removing incomplete checkpoint {stale}")
            shutil.rmtree(stale)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(
                repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id

    tokenizer = load_tokenizers(args)
    holdout = load_holdout(args, tokenizer)  # also proves, before the models load, that the shards hold data
    noise_scheduler, text_encoder, vae, unet, controlnet = load_models(args)

    def unwrap_model(model):
        model = accelerator.unwrap_model(model)
        return getattr(model, "_orig_mod", model)

    # Checkpoints hold the ControlNet in diffusers format (controlnet/) next to accelerate's optimizer/RNG state.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                unwrap_model(model).save_pretrained(os.path.join(output_dir, "controlnet"))
                save_tile_config(args, os.path.join(output_dir, "controlnet"))
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
        if args.family == "sdxl":  # as upstream's SDXL script: the frozen UNet's activations dominate its memory
            unet.enable_gradient_checkpointing()
    if args.channels_last:
        use_channels_last(unet, vae, controlnet, args)
    if args.torch_compile:
        for model in (unet, controlnet):
            model.compile(backend=args.torch_compile)  # in place: the modules keep their class, state_dict keys and save_pretrained
    if unwrap_model(controlnet).dtype != torch.float32:
        raise ValueError(f"ControlNet loaded as {unwrap_model(controlnet).dtype}; trainable weights must be float32")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes

    optimizer = make_optimizer(args, controlnet.parameters())

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
    vae.to(accelerator.device, dtype=vae_dtype_for(vae, weight_dtype, args.family))
    unet.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    encode_prompts = PromptEncoder(text_encoder, tokenizer, accelerator.device)

    if accelerator.is_main_process:
        # Trackers get every setting but secrets; tensorboard cannot store lists.
        tracker_config = {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in vars(args).items()
                          if k not in ("hub_token", "validation_prompt", "validation_image")}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    urls = wds.shardlists.expand_urls(args.train_shards_path_or_url)
    consumers = accelerator.num_processes * max(1, args.dataloader_num_workers)
    global_step, data_resume = 0, None
    if args.resume_from_checkpoint:
        found = load_checkpoint(accelerator, agreed_checkpoints(accelerator, args.resume_from_checkpoint, args.output_dir))
        if found is None:
            accelerator.print(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
        else:
            global_step, path = found
            data_resume = resume_data(path, consumers, args.resampled_shards, urls)

    # The loader is kept out of accelerator.prepare: each rank reads its own shards (see consumer_samples) instead
    # of rank 0 reading for everyone and broadcasting.
    held_out = set(zip(holdout["urls"], holdout["keys"])) if holdout else ()
    train_dataloader = make_train_dataloader(args, tokenizer, held_out, data_resume)
    progress = DataProgress(accelerator, args.dataloader_num_workers, data_resume, urls)
    stop_requested.agreement = StallAgreement.for_run(accelerator)
    first_step = global_step

    def save_state(step):
        save_checkpoint(accelerator, args, step, progress.state(accelerator), unwrap_model(controlnet))

    logger.info("***** Running training *****")
    logger.info(f"  Shards = {len(urls)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs} of {num_update_steps_per_epoch} steps")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {samples_per_step}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}, starting at {global_step}")
    if global_step >= args.max_train_steps:
        logger.info(f"Checkpoint is already at step {global_step} >= --max_train_steps; no more training steps")

    def validate(step, controlnet_to_use, is_final_validation=False):
        # Validation draws no random numbers from training's streams: a run with other --validation_steps trains alike.
        cuda = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), decoding_in_vae_dtype(vae):
            return log_validation(
                vae, text_encoder, tokenizer, unet, controlnet_to_use, noise_scheduler, args, accelerator, weight_dtype,
                step, holdout, is_final_validation,
            )

    progress_bar = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,  # once per machine
    )
    meter = IntervalMeter(accelerator.device)
    keys_file = None
    if args.save_sample_keys:
        os.makedirs(os.path.join(args.output_dir, "sample_keys"), exist_ok=True)
        keys_file = open(os.path.join(args.output_dir, "sample_keys", f"rank-{accelerator.process_index}.txt"), "a")
    stopped_by = None
    image_logs = None
    nonfinite_streak, diverged = 0, False
    models = (vae, unet, controlnet)
    if global_step == 0 and holdout is not None:
        with meter.paused():
            if accelerator.is_main_process:
                validate(0, unwrap_model(controlnet))  # the baseline: a fresh ControlNet's gap is exactly 0
            accelerator.wait_for_everyone()
    with endless_batches(train_dataloader) as batches:
        while global_step < args.max_train_steps:
            try:
                with meter.waiting_for_data(), stop_requested.waiting():
                    batch = next(batches)
            except StopDuringStall as stop:
                stopped_by = str(stop)
                end_workers(batches)
                # Amid a gradient accumulation, its micro-batches were never applied: the checkpoint keeps neither
                # their data (see DataProgress.fetched) nor accelerate's count of them, and a resume reads them again.
                accelerator.step -= accelerator.step % args.gradient_accumulation_steps
                if global_step > first_step:
                    with meter.paused():
                        save_state(global_step)
                stop_notice(stopped_by, global_step, saved=global_step > first_step, while_stalled=True)
                break
            progress.fetched(batch)
            finite = train_step(batch, models, noise_scheduler, optimizer, lr_scheduler, encode_prompts, meter,
                                accelerator, args, weight_dtype)
            if not accelerator.sync_gradients:
                continue
            taken = progress.step_taken()
            if keys_file:
                keys_file.writelines(f"{global_step + 1} {b['consumer']} {key}\n" for b in taken for key in b["keys"])
            progress_bar.update(1)
            global_step += 1
            nonfinite_streak = 0 if finite else nonfinite_streak + 1
            if not finite and accelerator.scaler is None:  # fp16's scaler skips some steps as a matter of course
                logger.warning(f"step {global_step}: non-finite loss or gradient norm; step skipped, no weight changed")
            diverged = nonfinite_streak >= args.max_nonfinite_steps

            if global_step % args.logging_steps == 0 or global_step == args.max_train_steps or diverged:
                # The interval's host read: losses, grad norms, data counters and stop requests of all ranks.
                logs, stats, stopped_by = meter.collect(accelerator, progress.local_totals(), stop_requested(), samples_per_step)
                progress.last_totals = stats
                logs["lr"] = lr_scheduler.get_last_lr()[0]
                logs["epoch"] = global_step // num_update_steps_per_epoch
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                if accelerator.is_main_process:
                    log_metrics(accelerator, {**logs, **{f"data/{k}": v for k, v in stats.items()}}, global_step, args.output_dir)
                    progress.report(stats)
            if diverged:
                break  # the weights are those of the last finite step, which led here: no checkpoint of them
            # Mid-streak the weights are those that led to it: a regular checkpoint waits, and prunes nothing good.
            checkpoint_due = (global_step % args.checkpointing_steps == 0 and not nonfinite_streak) or stopped_by
            # The last step's validation is the final one, below, on the model as saved.
            validation_due = global_step % args.validation_steps == 0 and global_step < args.max_train_steps
            validation_due = validation_due and bool(args.validation_prompt or holdout)
            if checkpoint_due or validation_due:
                with meter.paused():
                    if checkpoint_due:
                        save_state(global_step)
                    if accelerator.is_main_process and validation_due:
                        image_logs = validate(global_step, unwrap_model(controlnet))
                    accelerator.wait_for_everyone()  # so that no rank counts rank 0's validation as training time
            if stopped_by:
                stop_notice(stopped_by, global_step, saved=True)
                break
    progress_bar.close()
    if keys_file:
        keys_file.close()
    if accelerator.is_main_process:
        progress.report(progress.last_totals, final=True)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not (stopped_by or diverged):
        save_final_model(unwrap_model(controlnet), args)
        image_logs = None
        if args.validation_prompt is not None or holdout is not None:
            # Validate what was written to disk, so a broken save shows up here rather than in the user's hands.
            image_logs = validate(global_step, ControlNetModel.from_pretrained(args.output_dir), is_final_validation=True)
        save_model_card(args.output_dir, args.pretrained_model_name_or_path, image_logs, repo_id, args.family)
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=["step_*", "epoch_*", "checkpoint-*", ".*", "logs/*"],
                token=args.hub_token,
            )

    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean teardown avoids gloo's rare abort at exit
    if diverged:
        raise SystemExit(f"error: training diverged: {nonfinite_streak} optimisation steps in a row up to step"
                         f" {global_step} had a non-finite loss or gradient (skipped: no weight changed);"
                         f" {newest_checkpoint(args.output_dir)}: resume from it with a lower --learning_rate")


if __name__ == "__main__":
    main(parse_args())
