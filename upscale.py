#!/usr/bin/env python
# coding=utf-8
"""Upscale images with a ControlNet tile model trained by `train_controlnet.py`.

    python upscale.py --pretrained_model_name_or_path=lambdalabs/miniSD-diffusers \
        --controlnet_model_name_or_path=controlnet-model --input=photo.png --output=photo_x4.png

The low-resolution input is enlarged to the output size by the trainer's own `enlarge_condition`, with the filter the
model was trained with (read from the ControlNet's tile_config.json): that is the condition, exactly as training made
it. The output canvas is denoised in overlapping latent tiles (MultiDiffusion / Mixture of Diffusers): at every step
each tile is predicted by the UNet and the ControlNet with its own crop of the condition, the predictions are blended
with smooth windows, and one scheduler step moves the whole canvas. The canvas is decoded in the same tiles, blended
the same way, and a colour fix pulls the result back to the input (by default a back-projection: reduced again, the
result is the input).

The canvas starts, as every tile workflow starts (Ultimate SD Upscale's denoise, diffusers'
StableDiffusionControlNetImg2ImgPipeline's strength, gradio_tile.py's denoise), from the enlarged image itself: its
tiled VAE encoding noised to the timestep of --strength, and only the last int(strength x steps) steps run. The
start image is the condition unless --init_image gives another (an SR model's output, say); --strength 1 starts from
pure noise.

SD-1.x, SD-2.x and SDXL bases take the same code; the family, read from the base's UNet config as the trainer reads
it, picks the pipeline (its prompt encoding), and an SDXL tile also gets the pooled prompt and the time ids of its
place in the canvas (tile_time_ids).
"""

import argparse
import collections
import logging
import math
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
import numpy as np
from PIL import Image, ImageOps

import train_controlnet as tc

logger = logging.getLogger(__name__)

COLOR_FIXES = ("none", "adain", "wavelet", "backprojection")
LATENT_FACTOR = 8  # SD VAEs downsample by 8; the trainer's --resolution is a multiple of it for the same reason
WAVELET_LEVELS = 5  # StableSR's wavelet colour fix: blurs with dilation 1, 2, 4, 8, 16
BACKPROJECTION_STEPS = 5  # each step multiplies the error of the result's reduction by ~0.4 (measured: 33 -> 48 dB)
# Latent cells of context each side of a tile when it is encoded or decoded: real neighbours inside the canvas, a
# reflection of the canvas outside it. Without it the decoder's zero padding at the canvas edge draws a frame (border
# rows stepping 13-19 grey levels on a smooth gradient whose interior steps 0.8); one cell leaves 2x, two leave none.
TILE_MARGIN = 2
# diffusers' classes and settings per --scheduler, all built from the base's own scheduler config (its betas,
# prediction type, timestep spacing). DPMSolverSDEScheduler needs torchsde, which is not a requirement.
SCHEDULERS = {
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}
DEFAULT_STRENGTH = 0.35  # why: --strength's help, measured by benchmarks/bench_upscale.py
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class UnreadableImage(Exception):
    pass


class NonFiniteDecode(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Upscale images with a ControlNet tile model (tiled, any size).")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=tc.make_parser().get_default("pretrained_model_name_or_path"),
        help="The base the ControlNet was trained on (SD-1.x, SD-2.x or SDXL, read from its UNet config): a model"
        " folder or hub identifier.",
    )
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use instead of the base's (the trainer's flag of the same name), e.g."
        " madebyollin/sdxl-vae-fp16-fix. Under fp16 an SDXL VAE whose config says force_upcast stays float32.",
    )
    parser.add_argument(
        "--controlnet_model_name_or_path",
        type=str,
        required=True,
        help="The trained ControlNet: a train_controlnet.py --output_dir, one of its checkpoint-N folders (the model"
        " is in its controlnet/), or a hub identifier.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the base model on the hub.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the base model's files, e.g. fp16.")
    parser.add_argument("--input", type=str, required=True, help="An image, or a folder of images.")
    parser.add_argument(
        "--output",
        type=str,
        required=True,
        help="An image path (its extension picks the format) for one input, or a folder (created if missing) where"
        " each input NAME.ext is written as NAME.png (NAME.ext.png where two inputs share NAME). Never an input.",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="Output size / input size, per side (each side rounded to the nearest pixel). Default: the factor the"
        " ControlNet was trained for (its resolution / condition_resolution).",
    )
    parser.add_argument("--prompt", type=str, default="", help="Text prompt for every tile (default: none).")
    parser.add_argument(
        "--negative_prompt", type=str, default=None, help="Negative prompt; used when --guidance_scale > 1."
    )
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=20,
        help="Denoising steps of a full run; --strength below 1 runs the last int(strength x steps) of them.",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=DEFAULT_STRENGTH,
        help="How much of the diffusion the start image goes through, in (0, 1]: it is encoded, noised to that point"
        " and denoised from there (diffusers' img2img strength, Ultimate SD Upscale's denoise). Low keeps the start"
        " image's content and colours, 1 starts from pure noise and ignores it. Default %(default)s: on the"
        " benchmark (benchmarks/bench_upscale.py) the result keeps the input as well as the VAE's own round trip does"
        " (flat from 0.2 to 0.5, lower from 0.75 up) in about half the time of 1, and the model still redraws 7 of"
        " 20 steps; Ultimate SD Upscale's users advise no more than ~0.35.",
    )
    parser.add_argument(
        "--init_image",
        type=str,
        default=None,
        help="The start image (resized to the output size): an image, or a folder holding one per --input image with"
        " the same name (any extension), e.g. an SR model's output. Default: the condition, the input enlarged by"
        " the ControlNet's trained filter. The condition is always that enlargement.",
    )
    parser.add_argument(
        "--scheduler",
        type=str,
        default="unipc",
        choices=sorted(SCHEDULERS),
        help="Sampler, built from the base's scheduler config. Stochastic ones (euler_ancestral, dpmpp_2m_sde, ddim"
        " with --eta > 0) draw their noise from --seed.",
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's eta: 0 deterministic, 1 as DDPM.")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="Classifier-free guidance scale. Above 1 each tile is also predicted without the prompt (2x the"
        " compute); at 1 (the default) it is not, which suits the default empty prompt.",
    )
    parser.add_argument(
        "--controlnet_conditioning_scale",
        type=float,
        default=1.0,
        help="Multiplier of the ControlNet's residuals: lower lets the base invent more, higher follows the input.",
    )
    parser.add_argument(
        "--tile_size",
        type=int,
        default=None,
        help="Tile side in output pixels, a multiple of 8. Default: the resolution the ControlNet was trained at.",
    )
    parser.add_argument(
        "--tile_overlap",
        type=int,
        default=None,
        help="Minimum overlap of neighbouring tiles in output pixels, a multiple of 8 below --tile_size."
        " Default: half the tile.",
    )
    parser.add_argument(
        "--color_fix",
        type=str,
        default=None,
        choices=COLOR_FIXES,
        help="How the result is pulled back to the input. 'backprojection': the result, reduced as the trainer"
        " reduces, is made equal to the input, so everything the input resolves (colours, shapes) comes from it and"
        " only finer detail is the model's; it also keeps the input's noise and JPEG artefacts. 'wavelet' (StableSR):"
        " the enlarged input's low frequencies (colours, shading) under the result's detail, which lets a model that"
        " removes degradations do so. 'adain': each channel's mean and std. 'none': the model's own. Default:"
        " 'wavelet' for a model trained on degraded conditions (its tile_config.json has a condition_degradation other"
        " than 'none'), else 'backprojection'.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initial noise (same seed, same image).")
    parser.add_argument(
        "--device", type=str, default=None, help="torch device, e.g. cuda, cuda:1, cpu. Default: cuda if available."
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "fp16", "bf16"],
        help="Weights and activations in fp16 or bf16 (fp16 needs a CUDA GPU). Latents and blending stay float32.",
    )
    parser.add_argument("--batch_size", type=int, default=4, help="Tiles per forward pass of the models.")
    parser.add_argument(
        "--skip_existing",
        action="store_true",
        help="Leave outputs that already exist as they are (to finish an interrupted folder run).",
    )

    args = parser.parse_args(input_args)
    check_args(args)
    return args


def fail(message):
    """One line on stderr and a non-zero exit: bad input needs no traceback and no usage text."""
    raise SystemExit(f"upscale.py: error: {message}")


def check_args(args):
    """Reject bad input with one clear line before any model loads, and fill the defaults that depend on the model."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device: not a torch device: {args.device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device={args.device} but no CUDA GPU is available")
    if args.mixed_precision == "fp16" and device.type != "cuda":
        fail("--mixed_precision=fp16 needs a CUDA GPU; use --mixed_precision=no or bf16 on this machine")
    for name in ("num_inference_steps", "batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be >= 1")
    if args.scale is not None and not args.scale > 0:
        fail("--scale must be > 0")
    if not 0 < args.strength <= 1:
        fail(f"--strength must be in (0, 1], got {args.strength:g}")
    if int(args.strength * args.num_inference_steps) < 1:
        fail(f"--strength={args.strength:g} runs int({args.strength:g} x --num_inference_steps="
             f"{args.num_inference_steps}) = 0 steps; raise either")
    if args.eta < 0:
        fail("--eta must be >= 0")
    if args.eta and args.scheduler != "ddim":
        logger.warning(f"--eta is DDIM's; --scheduler={args.scheduler} ignores it")

    try:
        args.controlnet_dir = resolve_controlnet(args.controlnet_model_name_or_path)
        unet_config = tc.read_model_config(args.pretrained_model_name_or_path, "unet", args.revision)
        mismatch = tc.controlnet_mismatch(tc.read_model_config(args.controlnet_dir), unet_config)
        args.family = tc.base_family(unet_config)
    except ValueError as exn:
        fail(str(exn))
    if args.pretrained_vae_model_name_or_path:
        try:
            tc.read_model_config(args.pretrained_vae_model_name_or_path)
        except ValueError as exn:
            fail(f"--pretrained_vae_model_name_or_path: {exn}")
    if mismatch:
        fail(f"the ControlNet in {args.controlnet_dir} does not fit the base {args.pretrained_model_name_or_path}:"
             f" {mismatch}")
    args.tile_config = tc.load_tile_config(args.controlnet_dir)
    trained_scales = args.tile_config.get("condition_scales") or [args.tile_config["scale"]]
    if args.scale is None:
        args.scale = float(args.tile_config["scale"])
    elif args.scale not in trained_scales:
        trained = ", x".join(f"{s:g}" for s in trained_scales)
        logger.warning(f"--scale={args.scale:g}: the ControlNet was trained for x{trained}; its conditions will look"
                       " sharper or blurrier than any it saw")
    if args.color_fix is None:
        # Back-projection would put back the noise and artefacts that a model trained on degraded inputs removes.
        args.color_fix = "wavelet" if args.tile_config.get("condition_degradation", "none") != "none" else "backprojection"
    if args.tile_size is None:
        args.tile_size = int(args.tile_config["resolution"])
    if args.tile_overlap is None:
        args.tile_overlap = args.tile_size // 2 // LATENT_FACTOR * LATENT_FACTOR
    if args.tile_size < LATENT_FACTOR or args.tile_size % LATENT_FACTOR:
        fail(f"--tile_size must be a positive multiple of {LATENT_FACTOR}, got {args.tile_size}")
    if not 0 <= args.tile_overlap < args.tile_size or args.tile_overlap % LATENT_FACTOR:
        fail(f"--tile_overlap must be a multiple of {LATENT_FACTOR} in [0, --tile_size={args.tile_size}),"
             f" got {args.tile_overlap}")

    if not os.path.exists(args.input):
        fail(f"--input not found: {args.input}")
    args.jobs = list_jobs(args.input, args.output)
    if os.path.isdir(args.input):
        if not args.jobs:
            fail(f"--input folder {args.input} holds no image files")
    else:
        try:
            size = read_image(args.input).size
        except UnreadableImage as exn:
            fail(f"--input: {exn}")
        if min(output_size(size, args.scale)) < 1:
            fail(f"--scale={args.scale} turns the {size[0]}x{size[1]} input into an empty image")
    folder = os.path.isdir(args.input)
    problem = output_problem(args.output if folder else args.jobs[0][1], folder)
    if problem:
        fail(f"--output: {problem}")
    inputs = {os.path.realpath(i): i for i, _ in args.jobs}
    overwritten = next((o for _, o in args.jobs if os.path.realpath(o) in inputs), None)
    if overwritten:
        fail(f"--output: {overwritten} would overwrite the input {inputs[os.path.realpath(overwritten)]}")
    try:
        args.init_images = match_init_images(args.init_image, args.jobs)
    except ValueError as exn:
        fail(f"--init_image: {exn}")
    if args.init_image is not None and args.strength == 1:
        logger.warning("--init_image is unused at --strength 1 (the canvas starts from pure noise)")


def resolve_controlnet(name):
    """--controlnet_model_name_or_path -> the local folder that holds the ControlNet's config.json and weights.

    A training output_dir holds the final model; a checkpoint-N holds it in controlnet/; any other name is a hub id
    (fetched with its tile_config.json). ValueError with the reason otherwise.
    """
    if os.path.isdir(name):
        for folder in (name, os.path.join(name, "controlnet")):
            if os.path.isfile(os.path.join(folder, "config.json")):
                return check_weights(folder)
        raise ValueError(f"--controlnet_model_name_or_path: no ControlNet (config.json) in {name} or {name}/controlnet"
                         " (give a train_controlnet.py --output_dir or one of its checkpoint-N folders)")
    try:  # one clear line for a missing folder, a malformed hub id, no network or no such repository
        tc.read_model_config(name)
    except ValueError as exn:
        raise ValueError(f"--controlnet_model_name_or_path: {exn}")
    from huggingface_hub import snapshot_download

    return check_weights(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))


def check_weights(folder):
    if not any(f.startswith("diffusion_pytorch_model.") for f in os.listdir(folder)):
        raise ValueError(f"--controlnet_model_name_or_path: {folder} has a config.json but no weights")
    return folder


def list_jobs(input_path, output_path):
    """(input file, output file) pairs: one for an image, one per image file (by extension) of a folder."""
    if not os.path.isdir(input_path):
        if os.path.isdir(output_path):
            output_path = os.path.join(output_path, stem(input_path) + ".png")
        return [(input_path, output_path)]
    extensions = Image.registered_extensions()
    names = sorted(n for n in os.listdir(input_path)
                   if not n.startswith(".") and os.path.splitext(n)[1].lower() in extensions
                   and os.path.isfile(os.path.join(input_path, n)))
    stems = collections.Counter(stem(n) for n in names)  # a.jpg and a.png must not both become a.png
    return [(os.path.join(input_path, n), os.path.join(output_path, (stem(n) if stems[stem(n)] == 1 else n) + ".png"))
            for n in names]


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def match_init_images(init_image, jobs):
    """{input file: its start image file} for --init_image (a file for one input, a folder of files named as the
    inputs, any extension, an exact name first); {} without it. ValueError naming what is missing."""
    if init_image is None:
        return {}
    if not os.path.exists(init_image):
        raise ValueError(f"not found: {init_image}")
    if not os.path.isdir(init_image):
        if len(jobs) > 1:
            raise ValueError(f"{init_image} is one image for {len(jobs)} inputs; give a folder of start images")
        return {jobs[0][0]: init_image}
    names = sorted(n for n in os.listdir(init_image) if not n.startswith("."))
    by_stem = {}
    for name in names:
        by_stem.setdefault(stem(name), name)
    matched, missing = {}, []
    for input_path, _ in jobs:
        name = os.path.basename(input_path)
        found = name if name in names else by_stem.get(stem(name))
        if found is None:
            missing.append(name)
        else:
            matched[input_path] = os.path.join(init_image, found)
    if missing:
        raise ValueError(f"{init_image} has no start image for {len(missing)} input(s): {', '.join(missing[:5])}"
                         + (", ..." if len(missing) > 5 else ""))
    return matched


def output_problem(path, folder):
    """Why `path` (an image, or a folder with `folder`) can't take the output, or None."""
    directory = path if folder else os.path.dirname(os.path.abspath(path))
    if not folder:
        extension = os.path.splitext(path)[1].lower()
        if Image.registered_extensions().get(extension) not in Image.SAVE:
            return f"{path} needs an image extension PIL can write (.png, .jpg, .webp, ...)"
    problem = tc.output_dir_problem(directory)
    return problem and f"cannot write to {directory} ({problem})"


def read_image(path, keep_alpha=False):
    """An image file -> PIL image, upright (EXIF orientation applied), decoded in full now (a truncated file fails
    here, not halfway through): RGBA when `keep_alpha` and it has transparency, else RGB with transparency on white.
    16-bit images are brought to 8 bits by their range (PIL's convert would clip them), CMYK, palette and grey to
    RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
                image = to_8bit(image)
            if image.mode == "P" and "transparency" in image.info or image.mode == "PA":
                image = image.convert("RGBA")
            if keep_alpha and image.mode in ("RGBA", "LA", "La", "RGBa"):
                return image.convert("RGBA")
            return tc.to_rgb(image)
    except Exception as exn:
        raise UnreadableImage(f"cannot read image {path} ({type(exn).__name__}: {exn})")


def to_8bit(image):
    """A one-channel 16-bit or 32-bit PIL image -> mode L: 16-bit ranges (and 'I' images that exceed 255) scaled by
    255/65535, the rest clipped."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I" and values.max() > 255:
        values = values / 257
    return Image.fromarray(values.round().clip(0, 255).astype(np.uint8), "L")


def keeps_alpha(path):
    """Whether the output format can hold the input's alpha (JPEG cannot)."""
    return Image.registered_extensions().get(os.path.splitext(path)[1].lower()) not in ("JPEG", "MPO")


def save_image(image, path):
    """Write to a temporary name beside `path` and rename it: a kill leaves either no file or a whole one under the
    final name (the rename is atomic), and at most a hidden .part file beside it."""
    directory, name = os.path.split(os.path.abspath(path))
    fmt = Image.registered_extensions()[os.path.splitext(name)[1].lower()]
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.part")  # hidden: a folder listing skips it
    try:
        image.save(temporary, format=fmt)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def output_size(size, scale):
    """(width, height) of the input -> (height, width) of the output: each side times scale, rounded half up."""
    width, height = size
    return math.floor(height * scale + 0.5), math.floor(width * scale + 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Models


def load_pipeline(args):
    """diffusers' ControlNet pipeline of the base's family (StableDiffusionControlNetPipeline, or
    StableDiffusionXLControlNetPipeline for SDXL) with --scheduler (UniPC by default, as the trainer validates): its
    components, prompt encoding and latent preparation are reused here, and a one-tile image comes out as the
    pipeline's (at --strength 1) or as its img2img twin's (below)."""
    import diffusers
    import transformers
    from diffusers import (AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline,
                           StableDiffusionXLControlNetPipeline)

    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if args.family == "sdxl":
        pipeline_class, settings = StableDiffusionXLControlNetPipeline, dict(add_watermarker=False)
    else:
        pipeline_class = StableDiffusionControlNetPipeline
        settings = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if args.pretrained_vae_model_name_or_path:
        settings["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    pipe = pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path,
        controlnet=ControlNetModel.from_pretrained(args.controlnet_dir),
        revision=args.revision,
        variant=args.variant,
        **settings,
    )
    pipe.scheduler = make_scheduler(pipe.scheduler.config, args.scheduler)
    pipe.set_progress_bar_config(desc="tiles x steps")
    # Cast after loading: diffusers renamed from_pretrained's torch_dtype, and requirements.txt allows both versions.
    pipe.to(args.device, dtype)
    pipe.vae.to(dtype=tc.vae_dtype_for(pipe.vae, dtype, args.family))  # the stock SDXL VAE overflows in fp16
    return pipe


def make_scheduler(base_config, name):
    """--scheduler `name` built from the base model's scheduler config."""
    import diffusers

    class_name, settings = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **settings)


# ----------------------------------------------------------------------------------------------------------------
# Tiles


def tile_starts(length, tile, overlap):
    """Starts of tiles of size `tile` covering [0, length): a regular stride of tile - overlap, and a last tile flush
    with the end. (A regular stride makes 50%-overlapping windows sum to a constant, and keeps the tile borders on
    few lines.)"""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def tile_grid(height, width, tile, overlap):
    """Tiles (top, left, height, width) covering a height x width grid; a side shorter than `tile` gets one tile
    of its own length instead of padding (fewer wasted pixels, and a one-tile image is the plain pipeline's)."""
    th, tw = min(tile, height), min(tile, width)
    return [(top, left, th, tw) for top in tile_starts(height, th, overlap) for left in tile_starts(width, tw, overlap)]


def canvas_tiles(height, width, args):
    """The latent tiles of an output of height x width pixels (padded up to whole latent cells)."""
    latent_h, latent_w = math.ceil(height / LATENT_FACTOR), math.ceil(width / LATENT_FACTOR)
    return tile_grid(latent_h, latent_w, args.tile_size // LATENT_FACTOR, args.tile_overlap // LATENT_FACTOR)


def tile_window(height, width, device):
    """Blending weights of one tile: a separable squared sine (Hann) window, near 0 at the tile's edges, where a
    tile has least context, and 1 at its centre. Neighbours fade into each other, so no tile border leaves a step;
    at 50% overlap the windows of a row of tiles sum to a constant."""
    def hann(n):
        return torch.sin(math.pi * (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n) ** 2

    return hann(height)[:, None] * hann(width)[None, :]


def blend_tiles(tiles, outputs, canvas, weight_sum, scale=1):
    """Add each tile's output, weighted by its window, into `canvas` (in place), and its window into `weight_sum`.
    Tiles are in latent units; `scale` maps them onto the outputs' grid (8 for decoded pixels)."""
    window = tile_window(outputs.shape[-2], outputs.shape[-1], outputs.device)
    for (top, left, h, w), output in zip(tiles, outputs):
        region = (..., slice(top * scale, (top + h) * scale), slice(left * scale, (left + w) * scale))
        canvas[region] += window * output.float()
        weight_sum[region] += window


def crops(tensor, tiles, scale=1):
    """The tiles' crops of a (1, C, H, W) tensor, stacked into a batch."""
    return torch.cat([tensor[..., t * scale:(t + h) * scale, l * scale:(l + w) * scale] for t, l, h, w in tiles])


def batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def seam_score(image, tiles, scale=LATENT_FACTOR):
    """Mean absolute gradient across tile borders over the mean across the other lines at the same offset in the
    8-px latent grid (1.0: the borders are invisible).

    `image` is a (C, H, W) tensor; `tiles` come from tile_grid in latent units, `scale` maps them onto the image.
    A border is the step from the last pixel before a tile's start or end to the next one; the image's own edges
    are not borders. Borders always fall between latent cells, and at 2x, 4x and 8x also between the same two
    low-resolution pixels, where a decoder's or an interpolator's gradient differs from its average: comparing
    with interior lines of the same offset leaves only what the tiles add. Rows and columns are pooled.
    """
    image = image.float()
    border_sum, interior_sum = 0.0, 0.0
    for axis, spans in ((-2, [(top, h) for top, _, h, _ in tiles]), (-1, [(left, w) for _, left, _, w in tiles])):
        length = image.shape[axis]
        # Mean |difference| between line i and line i + 1 along `axis`, one value per i.
        gradient = image.diff(dim=axis).abs().mean(dim=[d for d in (-3, -2, -1) if d != axis])
        edges = {e * scale for start, size in spans for e in (start, start + size) if 0 < e * scale < length}
        lines = torch.arange(scale - 1, length - 1, scale)  # steps between latent cells: where the borders are
        border = torch.tensor([line + 1 in edges for line in lines.tolist()], dtype=torch.bool)
        if border.any() and not border.all():
            border_sum += gradient[lines[border]].mean().item()
            interior_sum += gradient[lines[~border]].mean().item()
    return border_sum / interior_sum if interior_sum else 1.0


# ----------------------------------------------------------------------------------------------------------------
# Upscaling


def make_condition(image, size, interpolation, device):
    """Low-resolution PIL image -> the tile condition at `size` (height, width): (1, 3, H, W) float in [0, 1].

    The trainer's enlarge_condition with the model's filter, so inference sees what training saw; the torch filters
    run on the device, PIL's on the host before the copy."""
    return tc.enlarge_condition(tc.image_to_tensor(image)[None], size, interpolation, device)


def pad_to_multiple(tensor, multiple):
    """Pad the bottom and right of a (N, C, H, W) tensor up to multiples of `multiple`: mirrored where the image is
    large enough, so the model sees plausible content; repeated edge pixels where it is not. Cropped off later."""
    height, width = tensor.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not pad_h and not pad_w:
        return tensor
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(tensor, (0, pad_w, 0, pad_h), mode=mode)


def predict_noise(pipe, latents, t, conditions, prompt, time_ids, args):
    """UNet + ControlNet prediction for a batch of latent tiles with their condition crops, guided as the pipeline
    guides: the unconditional half first, then guidance_scale times the difference. `prompt` is encode_prompt's;
    `time_ids` the tiles' own (SDXL, tile_time_ids) or None."""
    dtype = pipe.unet.dtype
    count = latents.shape[0]
    guided = do_guidance(pipe, args)
    states, negative_states, pooled, negative_pooled = prompt
    embeds = states.expand(count, -1, -1)
    added = None if pooled is None else {"text_embeds": pooled.expand(count, -1), "time_ids": time_ids}
    if guided:
        latents, conditions = torch.cat([latents] * 2), torch.cat([conditions] * 2)
        embeds = torch.cat([negative_states.expand(count, -1, -1), embeds])
        if added:  # the pipeline's negative time ids are the positive ones
            added = {"text_embeds": torch.cat([negative_pooled.expand(count, -1), added["text_embeds"]]),
                     "time_ids": torch.cat([time_ids] * 2)}
    down_samples, mid_sample = pipe.controlnet(
        latents.to(dtype),
        t,
        encoder_hidden_states=embeds,
        controlnet_cond=conditions.to(pipe.controlnet.dtype),
        conditioning_scale=args.controlnet_conditioning_scale,
        added_cond_kwargs=added,
        return_dict=False,
    )
    noise_pred = pipe.unet(
        latents.to(dtype),
        t,
        encoder_hidden_states=embeds,
        down_block_additional_residuals=down_samples,
        mid_block_additional_residual=mid_sample,
        added_cond_kwargs=added,
        return_dict=False,
    )[0].float()
    if guided:
        uncond, text = noise_pred.chunk(2)
        noise_pred = uncond + args.guidance_scale * (text - uncond)
    return noise_pred


def encode_prompt(pipe, args, device):
    """--prompt and --negative_prompt as the pipeline encodes them -> (states, negative states, pooled, negative
    pooled); the pooled embeddings (SDXL's second encoder) are None for SD-1.x/2.x."""
    guided = do_guidance(pipe, args)
    if args.family == "sdxl":
        return pipe.encode_prompt(args.prompt, device=device, do_classifier_free_guidance=guided,
                                  negative_prompt=args.negative_prompt)
    return (*pipe.encode_prompt(args.prompt, device, 1, guided, args.negative_prompt), None, None)


def tile_time_ids(tiles, canvas_size, dtype, device):
    """SDXL's micro-conditioning of each tile, in what the three mean in SDXL's training: the canvas (height, width)
    (padded to whole latent cells) as the original size, the tile's (top, left) in it as the crop, and its size as
    the target. A whole-canvas tile is the plain pipeline's (size, (0, 0), size). Tiles in latent units, sizes in
    pixels."""
    rows = [[*canvas_size, top * LATENT_FACTOR, left * LATENT_FACTOR, h * LATENT_FACTOR, w * LATENT_FACTOR]
            for top, left, h, w in tiles]
    return torch.tensor(rows, dtype=dtype, device=device)


def do_guidance(pipe, args):
    return args.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None  # as the pipeline decides


def sampling_timesteps(pipe, args, device):
    """Set the scheduler's timesteps and return those to run: all of them at --strength 1, else the last
    int(strength x steps), counted and started as diffusers' img2img pipelines count and start them."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    pipe.scheduler.set_timesteps(args.num_inference_steps, device=device)
    if args.strength == 1:
        return pipe.scheduler.timesteps
    # get_timesteps reads only the scheduler: the same count and begin index as that pipeline, not a copy of them.
    return StableDiffusionControlNetImg2ImgPipeline.get_timesteps(pipe, args.num_inference_steps, args.strength,
                                                                  device)[0]


def denoise(pipe, latents, condition, tiles, timesteps, args, generator):
    """The sampling loop over a canvas of any size: every tile predicts with its own crop of the condition, the
    predictions are blended with the tile windows, and one scheduler step moves the whole canvas (the scheduler's
    multistep history belongs to the canvas, not to a tile)."""
    device = latents.device
    prompt = encode_prompt(pipe, args, device)
    canvas_size = tuple(condition.shape[-2:])
    batched = [(batch, None if prompt[2] is None else tile_time_ids(batch, canvas_size, prompt[0].dtype, device))
               for batch in batches(tiles, args.batch_size)]
    extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, args.eta)
    with pipe.progress_bar(total=len(timesteps) * len(tiles)) as progress:
        for t in timesteps:
            model_input = pipe.scheduler.scale_model_input(latents, t)
            noise_pred, weight_sum = torch.zeros_like(latents), torch.zeros_like(latents[:, :1])
            for batch, time_ids in batched:
                tile_pred = predict_noise(pipe, crops(model_input, batch), t, crops(condition, batch, LATENT_FACTOR),
                                          prompt, time_ids, args)
                blend_tiles(batch, tile_pred, noise_pred, weight_sum)
                progress.update(len(batch))
            noise_pred = noise_pred / weight_sum
            latents = pipe.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
    return latents


def pad_margin(tensor, margin):
    """`margin` pixels each side of a (1, C, H, W) tensor, mirrored (repeated where the tensor is too small)."""
    if not margin:
        return tensor
    mode = "reflect" if margin < min(tensor.shape[-2:]) else "replicate"
    return F.pad(tensor, (margin,) * 4, mode=mode)


def map_tiles(fn, source, tiles, source_scale, target_scale, channels, batch_size, margin=None):
    """Apply `fn` (a batch of source crops -> a batch of outputs `target_scale / source_scale` times their size) to
    every tile of `source` (tiles in latent units, `scale`s map them onto the source's and the output's grid), each
    crop with `margin` latent cells of context around it (TILE_MARGIN by default), cut off again before the outputs
    are blended with the tile windows. -> (1, channels, ., .) on the output grid, not yet divided by the window sum,
    and that sum: what the encoder and the decoder share."""
    margin = TILE_MARGIN if margin is None else margin
    height, width = source.shape[-2] // source_scale, source.shape[-1] // source_scale
    padded = pad_margin(source, margin * source_scale)
    canvas = torch.zeros(1, channels, height * target_scale, width * target_scale, device=source.device)
    weight_sum = torch.zeros_like(canvas[:, :1])
    cut = margin * target_scale
    for batch in batches(tiles, batch_size):
        grown = [(top, left, h + 2 * margin, w + 2 * margin) for top, left, h, w in batch]
        outputs = fn(crops(padded, grown, source_scale))
        blend_tiles(batch, outputs[..., cut:outputs.shape[-2] - cut, cut:outputs.shape[-1] - cut], canvas, weight_sum,
                    target_scale)
    return canvas, weight_sum


def encode(pipe, image, tiles, batch_size):
    """Tiled VAE encoding of a (1, 3, H, W) image in [0, 1] (sides multiples of 8): the posterior means, scaled as
    the pipelines scale them, blended in the denoising tiles as decode blends. The mean, not a draw: the noise added
    for --strength is the randomness, and a draw would add the VAE's own on top."""
    vae = pipe.vae

    def encode_batch(pixels):
        return vae.encode(pixels.to(vae.dtype) * 2 - 1).latent_dist.mode().float() * vae.config.scaling_factor

    latents, weight_sum = map_tiles(encode_batch, image, tiles, LATENT_FACTOR, 1, vae.config.latent_channels,
                                    batch_size)
    return latents / weight_sum


def decode(pipe, latents, tiles, batch_size):
    """VAE decode in the denoising tiles, blended with the same windows in pixel space: memory stays that of a
    batch of tiles whatever the canvas, and the decoder's tile edges fade out instead of leaving seams. A tile whose
    decode is not finite (fp16 overflow) is decoded again in float32 and counted in the log. -> (1, 3, H, W) float
    in [0, 1]."""
    vae = pipe.vae
    redone = []

    def decode_batch(batch):
        decoded = vae.decode(batch.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        bad = ~torch.isfinite(decoded).flatten(1).all(1)
        if bad.any():
            redone.append(int(bad.sum()))
            decoded = decoded.float()
            decoded[bad] = decode_float32(vae, batch[bad])
        return decoded

    image, weight_sum = map_tiles(decode_batch, latents, tiles, 1, LATENT_FACTOR, 3, batch_size)
    if redone:
        logger.warning(f"{sum(redone)} of {len(tiles)} tile(s) decoded to non-finite values in {vae.dtype}; decoded"
                       " again in float32")
    return (image / weight_sum / 2 + 0.5).clamp(0, 1)


def decode_float32(vae, latents):
    """Decode in float32 with the VAE cast for the call and back (a lossless round trip from fp16 or bf16)."""
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        decoded = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        vae.to(dtype)
    if not torch.isfinite(decoded).all():
        raise NonFiniteDecode("a tile decodes to non-finite values even in float32 (the latents are not finite)")
    return decoded


def start_image(init_image, size, device):
    """--init_image (PIL) resized to `size` (height, width) -> (1, 3, H, W) float in [0, 1] on `device`."""
    image = tc.image_to_tensor(init_image)
    if tuple(image.shape[-2:]) != tuple(size):
        image = tc.resize(image, size, "bicubic")
    return image[None].to(device).float() / 255


def generate(pipe, image, args, init_image=None):
    """Low-resolution PIL image (and an optional start image, PIL, any size) -> (result, condition), both
    (1, 3, H, W) float in [0, 1] at the output size, before any colour fix."""
    device = pipe.unet.device
    height, width = output_size(image.size, args.scale)
    condition = make_condition(image, (height, width), args.tile_config["interpolation"], device)
    canvas = pad_to_multiple(condition, LATENT_FACTOR)
    tiles = canvas_tiles(height, width, args)
    # The pipeline's own draw: randn_tensor from a CPU generator, so a seed gives the same noise on every device.
    generator = torch.Generator("cpu").manual_seed(args.seed)
    timesteps = sampling_timesteps(pipe, args, device)
    with torch.no_grad():
        if args.strength == 1:
            latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, canvas.shape[-2], canvas.shape[-1],
                                           torch.float32, device, generator)
        else:
            start = canvas if init_image is None else pad_to_multiple(start_image(init_image, (height, width), device),
                                                                      LATENT_FACTOR)
            latents = noised(pipe, encode(pipe, start, tiles, args.batch_size), timesteps[:1], generator)
        latents = denoise(pipe, latents, canvas, tiles, timesteps, args, generator)
        result = decode(pipe, latents, tiles, args.batch_size)
    return result[..., :height, :width], condition


def noised(pipe, latents, timestep, generator):
    """The start latents noised to `timestep` with the seed's noise, drawn as diffusers' img2img pipelines draw it."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return pipe.scheduler.add_noise(latents, noise, timestep)


def upscale_image(pipe, image, args, init_image=None):
    """Low-resolution PIL image (RGB, or RGBA: its alpha enlarged by the trained filter and put back) -> upscaled
    PIL image."""
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    image = image.convert("RGB")
    result, condition = generate(pipe, image, args, init_image)
    low_res = tc.image_to_tensor(image)[None].to(result.device).float() / 255
    upscaled = tc.tensor_to_image(color_fix(result, condition, low_res, args)[0])
    if alpha is not None:
        enlarged = make_condition(alpha.convert("RGB"), result.shape[-2:], args.tile_config["interpolation"], "cpu")
        upscaled.putalpha(tc.tensor_to_image(enlarged[0]).getchannel(0))
    return upscaled


# ----------------------------------------------------------------------------------------------------------------
# Colour fix (adain and wavelet: StableSR, scripts/wavelet_color_fix.py)


def color_fix(image, condition, low_res, args):
    """The result pulled towards the input by --color_fix. `condition` is the input enlarged to the result's size,
    `low_res` the input itself: (N, 3, ., .) in [0, 1]."""
    if args.color_fix == "adain":
        image = adain_color_fix(image, condition)
    elif args.color_fix == "wavelet":
        image = wavelet_color_fix(image, condition)
    elif args.color_fix == "backprojection":
        image = backprojection(image, low_res, args.tile_config["interpolation"])
    elif args.color_fix != "none":
        raise ValueError(f"unknown colour fix {args.color_fix}")
    return image.clamp(0, 1)


def adain_color_fix(image, reference, eps=1e-5):
    """Each channel's mean and standard deviation made those of the reference."""
    mean, std = image.mean((-2, -1), keepdim=True), (image.var((-2, -1), keepdim=True) + eps).sqrt()
    ref_mean, ref_std = reference.mean((-2, -1), keepdim=True), (reference.var((-2, -1), keepdim=True) + eps).sqrt()
    return (image - mean) / std * ref_std + ref_mean


def wavelet_blur(image, dilation):
    """3x3 [1, 2, 1]^2 / 16 blur, dilated, with edge pixels repeated outside the image."""
    kernel = torch.tensor([1.0, 2.0, 1.0], device=image.device, dtype=image.dtype)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(image.shape[1], 1, 3, 3)
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=image.shape[1], dilation=dilation)


def wavelet_decomposition(image, levels=WAVELET_LEVELS):
    """-> (high frequencies, low frequencies): the sum of the band-passes of `levels` blurs, and what is left."""
    high = torch.zeros_like(image)
    for level in range(levels):
        low = wavelet_blur(image, 2**level)
        high += image - low
        image = low
    return high, image


def wavelet_color_fix(image, reference):
    """The image's high frequencies on the reference's low ones: the input's colours and shading, the model's detail."""
    return wavelet_decomposition(image)[0] + wavelet_decomposition(reference)[1]


def backprojection(image, low_res, interpolation, steps=BACKPROJECTION_STEPS):
    """Iterative back-projection (Irani and Peleg, 1991): add the enlarged difference between the input and the
    result reduced to the input's size, until the reduced result is the input.

    Reduction and enlargement use the model's filter, as the trainer made the model's conditions (bicubic for
    PIL's filters, which have no float kernel)."""
    mode = interpolation if interpolation in tc.TORCH_FILTERS else "bicubic"

    def resize(x, size):
        return F.interpolate(x, size=tuple(size), mode=mode, antialias=True)

    for _ in range(steps):
        image = image + resize(low_res - resize(image, low_res.shape[-2:]), image.shape[-2:])
    return image


# ----------------------------------------------------------------------------------------------------------------


def main(args):
    tc.DropNotices.install(xformers_requested=False)
    pipe = load_pipeline(args)
    steps = len(sampling_timesteps(pipe, args, "cpu"))
    logger.info(f"{len(args.jobs)} image(s), x{args.scale:g}, tiles of {args.tile_size} px overlapping by"
                f" {args.tile_overlap} px, {args.scheduler} at strength {args.strength:g}: {steps} of"
                f" {args.num_inference_steps} steps on {args.device}, colour fix {args.color_fix}")
    done, skipped, failed = 0, 0, []
    for input_path, output_path in args.jobs:
        if args.skip_existing and os.path.exists(output_path):
            skipped += 1
            continue
        try:
            upscale_file(pipe, input_path, output_path, args)
            done += 1
        except (UnreadableImage, NonFiniteDecode, OSError) as exn:
            logger.warning(f"failed: {input_path}: {exn}")
            failed.append(os.path.basename(input_path))
    if len(args.jobs) > 1 or skipped or failed:
        print(f"{done} done, {skipped} skipped (output already there), {len(failed)} failed of {len(args.jobs)}"
              + (f": {', '.join(failed)}" if failed else ""))


def upscale_file(pipe, input_path, output_path, args):
    """One input file -> its output file (with its --init_image, if any)."""
    image = read_image(input_path, keep_alpha=keeps_alpha(output_path))
    height, width = output_size(image.size, args.scale)
    if min(height, width) < 1:
        raise UnreadableImage(f"x{args.scale:g} makes its {image.width}x{image.height} empty")
    init_path = args.init_images.get(input_path)
    init_image = read_image(init_path) if init_path and args.strength < 1 else None
    save_image(upscale_image(pipe, image, args, init_image), output_path)
    print(f"{input_path} ({image.width}x{image.height}) -> {output_path} ({width}x{height})")


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)  # before the checks warn
    main(parse_args())
