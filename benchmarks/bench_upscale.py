"""Super-resolution benchmark: trained ControlNet tile models (through upscale.py's code) against bicubic and
lanczos enlargement, on a held-out photo, for the trainer's own reduction and for degradations they never saw.

    python benchmarks/bench_upscale.py --controlnet quickstart/controlnet-tile [OTHER_CONTROLNET ...]
        [--label NAME ...] [--base tools/tiny-sd-trained] [--steps 20] [--color_fix backprojection]
        [--strength 0.35] [--strengths 0.2 0.35 0.5 0.75 1] [--schedulers unipc ddim ...] [--no_peer]
        [--guidance_scale 1] [--tile_overlap PX] [--device cpu] [--mixed_precision no] [--hr_width 256]
        [--figure docs/upscale-example.png] [--strength_figure docs/upscale-strength-example.png]
    python benchmarks/bench_upscale.py --controlnet quickstart/controlnet-tile --frame_check
    python benchmarks/bench_upscale.py --controlnet quickstart/controlnet-tile --speed_against COMMIT

Held-out photo: matplotlib's sample `grace_hopper.jpg` (512x600, installed with matplotlib, a dev requirement). The
training shards (tools/make_shards.py) and the shipped base's training crops (tools/make_tiny_pipeline.py --trained,
which draws them through make_shards.load_sources) both come from the 18 scikit-image photos of
make_shards.SKIMAGE_PHOTOS only; no other photo ships with the installed packages (scikit-image's other images are
synthetic, binary, 25 px faces, a 102 px retina crop or the right view of the same motorcycle scene). The HR image
is the photo reduced by the trainer's resize to --hr_width wide (the shipped tiny base learned whole-photo views at
64 px, not 512-px close-ups), cropped to sides divisible by 8, the largest factor.

Variants (each a low-resolution input, and the clean reduction it is scored against), every degradation made by the
trainer's own condition-recipe steps (train_controlnet.jpeg, blur, gaussian_noise, degrade):
  clean       the trainer's reduction (its resize with the model's filter) by the model's trained factor
  area        box (area-average) reduction instead
  jpeg30      the trainer's reduction, then JPEG quality 30
  blur1.5     Gaussian blur sigma 1.5 on the HR image, then the trainer's reduction
  noise10     the trainer's reduction, then Gaussian noise sigma 10/255
  realesrgan  one fixed draw (seed 0) of the trainer's --condition_degradation=realesrgan, down to the trained factor
  x2, x8      the trainer's reduction by 2 and by 8
The five after clean are "the degraded variants", averaged in the summary.
Columns: PSNR and SSIM against the HR image; consistency: PSNR of the output reduced back by the trainer's reduction
against the clean reduction of the HR image (does it keep the content, and does it remove the degradation?); seam:
upscale.seam_score at the tile borders the model used (the other methods scored at the same lines); grid: the
output's spectral energy on the frequency lattice of the reduction period over that just beside it (grid_peak; the
ground truth's is printed with each table: a grid artifact raises it above the ground truth's); seconds per output
megapixel. The model's rows at one strength share one denoising run and differ only in the colour fix; "bicubic +
backprojection" is upscale.py's back-projection applied to the bicubic enlargement, so that what back-projection
adds by itself (it sharpens) is not credited to the model. With several --controlnet, a side-by-side table follows.

Every variant's table has the strength curve (--strengths; 1 is the pure-noise start), a run at --strength that
starts from the lanczos enlargement (upscale.py --init_image), the ceiling of any latent method (the start image
encoded and decoded by upscale.py's tiled VAE code, nothing denoised: strength -> 0) and the peer: Ultimate SD
Upscale's way, diffusers' StableDiffusionControlNetImg2ImgPipeline on each pixel tile (--peer_tile, with
--peer_padding px of context, redrawn one after the other on the image the earlier tiles left) pasted with a
feathered mask (--peer_mask_blur), at the same strength, steps and seed, without and with the colour fix. The
clean variant is then run with every --schedulers at --strength.
"""

import argparse
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import train_controlnet as tc  # noqa: E402
import upscale as up  # noqa: E402

MAX_FACTOR = 8


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controlnet", required=True, nargs="+",
                        help="Trained ControlNets (output_dir or checkpoint-N), scored one after the other and then"
                        " side by side.")
    parser.add_argument("--label", nargs="+", default=None, help="A name for each --controlnet (default: folder names).")
    parser.add_argument("--base", default=str(ROOT / "tools" / "tiny-sd-trained"), help="Its base model.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--color_fix", default=None, choices=up.COLOR_FIXES,
                        help="The colour fix of the summary lines (every one is in the tables); upscale.py's default"
                        " if unset.")
    parser.add_argument("--strength", type=float, default=up.DEFAULT_STRENGTH,
                        help="The strength of the schedulers, the lanczos start, the peer and the summary.")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.2, 0.35, 0.5, 0.75, 1.0],
                        help="The strength curve, in every variant's table.")
    parser.add_argument("--schedulers", nargs="*", default=sorted(up.SCHEDULERS),
                        help="Scored at --strength on the clean variant (ddim also with eta 1, as gradio_tile.py).")
    parser.add_argument("--variants", nargs="+", default=None, help="Only these variants (default: all).")
    parser.add_argument("--no_peer", action="store_true", help="Leave out the Ultimate SD Upscale-style peer.")
    parser.add_argument("--peer_tile", type=int, default=None, help="Its tile in px (default: upscale.py's tile).")
    parser.add_argument("--peer_padding", type=int, default=32, help="Its context around each tile, px.")
    parser.add_argument("--peer_mask_blur", type=float, default=8, help="Its mask feathering (Gaussian radius, px).")
    parser.add_argument("--frame_check", action="store_true",
                        help="Only the border check: a smooth 40x28 gradient upscaled 4x, the mean step between the"
                        " two outermost rows and columns over the median step, with and without the tile margin.")
    parser.add_argument("--speed_against", default=None, metavar="COMMIT",
                        help="Only the speed check: upscale.py of this git commit (e.g. one from before --strength)"
                        " against the current one at --strength 1 and at --strength, alternated, best of 3.")
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--tile_overlap", type=int, default=None, help="Pixels; upscale.py's default if unset.")
    parser.add_argument("--batch_size", type=int, default=8, help="Tiles per forward pass.")
    parser.add_argument("--device", default=None)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--hr_width", type=int, default=256, help="Width of the HR image made from the photo.")
    parser.add_argument("--figure", default=None,
                        help="Write input | bicubic | ours | ground truth (clean, the first --controlnet) here.")
    parser.add_argument("--strength_figure", default=None,
                        help="Write input | bicubic | ours at --strength, default colour fix | ground truth (clean,"
                        " the first --controlnet) here.")
    return parser.parse_args()


def held_out_photo():
    from matplotlib import cbook

    return cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


def hr_image(width):
    """The held-out photo reduced to `width` wide, cropped to sides divisible by MAX_FACTOR: uint8 CHW."""
    photo = tc.image_to_tensor(up.read_image(held_out_photo()))
    height = round(photo.shape[1] * width / photo.shape[2])
    photo = tc.resize(photo, (height, width), "bicubic")
    return photo[:, : height - height % MAX_FACTOR, : width - width % MAX_FACTOR]


def reduce(image, factor, interpolation):
    return tc.resize(image, (image.shape[1] // factor, image.shape[2] // factor), interpolation)


# The degradations are the trainer's own steps (train_controlnet's condition recipes), on one image.

def as_batch(image):
    return image[None].float() / 255


def to_uint8(image):
    return tc.quantise(image[0]).cpu()


def jpeg(image, quality):
    return to_uint8(tc.jpeg(as_batch(image), torch.tensor([float(quality)])))


def gaussian_blur(image, sigma):
    kernel = tc.blur_kernel("iso", 2 * math.ceil(3 * sigma) + 1, sigma, sigma, 0.0)
    return to_uint8(tc.blur(as_batch(image), kernel[None]))


def gaussian_noise(image, sigma, seed=0):
    noisy = tc.gaussian_noise(as_batch(image), torch.tensor([float(sigma)]), torch.tensor([False]),
                              torch.Generator().manual_seed(seed))
    return to_uint8(noisy.clamp(0, 1))


def realesrgan(image, factor, seed=0):
    draws = tc.draw_degradation("realesrgan", 1, random.Random(seed))
    return tc.degrade(as_batch(image), (image.shape[1] // factor, image.shape[2] // factor), draws,
                      torch.Generator().manual_seed(seed))[0]


DEGRADED = ("area", "jpeg30", "blur1.5", "noise10", "realesrgan")  # at the trained factor, averaged in the summary


def variants(trained_factor, interpolation):
    """(name, description, factor, HR image -> low-resolution input)."""
    f = trained_factor
    return [
        ("clean", f"the trainer's reduction ({interpolation})", f, lambda hr: reduce(hr, f, interpolation)),
        ("area", "area (box) reduction", f, lambda hr: reduce(hr, f, "box")),
        ("jpeg30", "JPEG quality 30 after the reduction", f, lambda hr: jpeg(reduce(hr, f, interpolation), 30)),
        ("blur1.5", "Gaussian blur sigma 1.5 before the reduction", f,
         lambda hr: reduce(gaussian_blur(hr, 1.5), f, interpolation)),
        ("noise10", "Gaussian noise sigma 10/255 after the reduction", f,
         lambda hr: gaussian_noise(reduce(hr, f, interpolation), 10)),
        ("realesrgan", "one draw (seed 0) of the trainer's realesrgan preset", f, lambda hr: realesrgan(hr, f)),
        ("x2", "the trainer's reduction by 2", 2, lambda hr: reduce(hr, 2, interpolation)),
        ("x8", "the trainer's reduction by 8", 8, lambda hr: reduce(hr, 8, interpolation)),
    ]


def grid_peak(image, period):
    """Spectral energy of the grey image on the lattice of a pattern repeating every `period` pixels (frequencies
    (n/period, m/period) cycles per pixel, all but 0, 0) over the energy one and two frequency steps beside those
    points, across and down: a grid at that period raises it far above a photograph's (measured on the held-out
    portrait at 8: 0.63; with a +-3-level line grid every 8 px added, 5.0; every 7 px, 0.65)."""
    grey = image.float().mean(0)
    power = torch.fft.fft2(grey - grey.mean()).abs() ** 2
    h, w = power.shape
    points = [(n * h // period, m * w // period) for n in range(period) for m in range(period) if n or m]
    steps = [(0, 1), (0, -1), (0, 2), (0, -2), (1, 0), (-1, 0), (2, 0), (-2, 0)]
    peak = torch.stack([power[p] for p in points]).mean()
    beside = torch.stack([power[(y + dy) % h, (x + dx) % w] for y, x in points for dy, dx in steps]).mean()
    return (peak / beside).item()


def ssim(a, b):
    from skimage.metrics import structural_similarity

    return structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), channel_axis=2,
                                 data_range=255)


def scores(output, hr, clean_small, factor, interpolation, tiles, seconds):
    """output, hr: uint8 CHW at the HR size -> the row of one method."""
    return {
        "grid": grid_peak(output, factor),
        "psnr": tc.psnr(tc.tensor_to_image(output), tc.tensor_to_image(hr)),
        "ssim": ssim(output, hr),
        "consistency": tc.psnr(tc.tensor_to_image(reduce(output, factor, interpolation)),
                               tc.tensor_to_image(clean_small)),
        "seam": up.seam_score(output.float() / 255, tiles),
        "s_per_mp": seconds / (hr.shape[1] * hr.shape[2] / 1e6),
    }


def timed(fn, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def strength_label(strength):
    return f"S={strength:g}"


def run_variant(pipe, peer, args, bench, hr, variant):
    """-> {method: row}, and the images of the figures."""
    name, _, factor, make_input = variant
    interpolation = args.tile_config["interpolation"]
    small = make_input(hr)
    clean_small = reduce(hr, factor, interpolation)
    args.scale = factor
    size = tuple(hr.shape[1:])
    tiles = up.canvas_tiles(*size, args)
    rows, images = {}, {"input": small}
    low_res = small[None].float() / 255

    def score(image, seconds, at=tiles):
        return scores(image, hr, clean_small, factor, interpolation, at, seconds)

    for method in ("bicubic", "lanczos"):
        images[method], seconds = timed(tc.resize, small, size, method)
        rows[method] = score(images[method], seconds)
    # The same back-projection on the bicubic enlargement: what the model's own detail adds is the difference.
    projected, seconds = timed(up.backprojection, images["bicubic"][None].float() / 255, low_res, interpolation)
    rows["bicubic + backprojection"] = score(to_uint8(projected.clamp(0, 1)), seconds)
    condition, seconds = timed(up.make_condition, tc.tensor_to_image(small), size, interpolation, pipe.unet.device)
    round_trip, more = timed(vae_round_trip, pipe, condition, tiles, args.batch_size)
    rows["VAE round trip (ceiling)"] = score(to_uint8(round_trip), seconds + more)

    def add_model_rows(label, result, seconds):
        for fix in up.COLOR_FIXES:
            args.color_fix = fix
            fixed, fix_seconds = timed(up.color_fix, result, condition, low_res.to(result.device), args)
            images[f"{label} ({fix})"] = to_uint8(fixed)
            rows[f"{label} ({fix})"] = score(images[f"{label} ({fix})"], seconds + fix_seconds)

    for strength in bench.strengths:
        args.strength = strength
        (result, _), seconds = timed(up.generate, pipe, tc.tensor_to_image(small), args)
        add_model_rows(strength_label(strength), result, seconds)
    args.strength = bench.strength
    lanczos = tc.tensor_to_image(images["lanczos"])
    (result, _), seconds = timed(up.generate, pipe, tc.tensor_to_image(small), args, lanczos)
    add_model_rows(f"{strength_label(bench.strength)} from lanczos", result, seconds)
    if peer is not None:
        (result, peer_tiles), seconds = timed(ultimate_sd_upscale, peer, condition, bench, args)
        for fix in ("none", args.default_fix):
            args.color_fix = fix
            fixed, fix_seconds = timed(up.color_fix, result, condition, low_res.to(result.device), args)
            rows[f"peer USDU S={bench.strength:g} ({fix})"] = score(to_uint8(fixed), seconds + fix_seconds, peer_tiles)
    args.color_fix = args.default_fix
    return rows, images


def vae_round_trip(pipe, image, tiles, batch_size):
    """The image encoded and decoded in upscale.py's tiles, nothing denoised: what a latent method can keep."""
    with torch.no_grad():
        canvas = up.pad_to_multiple(image, up.LATENT_FACTOR)
        decoded = up.decode(pipe, up.encode(pipe, canvas, tiles, batch_size), tiles, batch_size)
    return decoded[..., : image.shape[-2], : image.shape[-1]]


def ultimate_sd_upscale(peer, condition, bench, args):
    """Ultimate SD Upscale's redraw (its linear mode), in diffusers: each pixel tile, with `peer_padding` px of the
    image around it, goes through StableDiffusionControlNetImg2ImgPipeline (start image: the current image, control:
    the condition's crop) and is pasted back through a mask of the tile feathered by a Gaussian, so later tiles
    start from what earlier ones drew. -> ((1, 3, H, W) in [0, 1], the tiles in latent units for the seam score)."""
    from PIL import ImageFilter

    height, width = condition.shape[-2:]
    tile, pad = bench.peer_tile or args.tile_size, bench.peer_padding
    canvas = condition.clone()
    tiles = []
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, y1, x0, x1 = max(0, top - pad), min(height, bottom + pad), max(0, left - pad), min(width, right + pad)
            mask = Image.new("L", (width, height), 0)
            mask.paste(255, (left, top, right, bottom))
            mask = mask.filter(ImageFilter.GaussianBlur(bench.peer_mask_blur))
            mask = torch.from_numpy(np.array(mask)).to(canvas.device).float()[y0:y1, x0:x1] / 255
            redrawn = peer(
                args.prompt, image=canvas[..., y0:y1, x0:x1], control_image=condition[..., y0:y1, x0:x1],
                height=y1 - y0, width=x1 - x0, strength=args.strength, num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, controlnet_conditioning_scale=args.controlnet_conditioning_scale,
                generator=torch.Generator("cpu").manual_seed(args.seed), output_type="pt",
            ).images.float()
            canvas[..., y0:y1, x0:x1] = canvas[..., y0:y1, x0:x1] * (1 - mask) + redrawn * mask
            lf = up.LATENT_FACTOR
            tiles.append((top // lf, left // lf, (bottom - top) // lf, (right - left) // lf))
    return canvas, tiles


def run_schedulers(pipe, args, bench, hr, base_config):
    """The clean variant at --strength with every --schedulers (and DDIM with eta 1): {method: row}."""
    _, _, factor, make_input = variants(int(args.scale), args.tile_config["interpolation"])[0]
    interpolation = args.tile_config["interpolation"]
    small, clean_small = make_input(hr), reduce(hr, factor, interpolation)
    args.scale, args.strength = factor, bench.strength
    tiles = up.canvas_tiles(*hr.shape[1:], args)
    low_res = small[None].float() / 255
    runs = [(name, 0.0) for name in bench.schedulers] + ([("ddim", 1.0)] if "ddim" in bench.schedulers else [])
    rows = {}
    for name, eta in runs:
        pipe.scheduler, args.scheduler, args.eta = up.make_scheduler(base_config, name), name, eta
        (result, condition), seconds = timed(up.generate, pipe, tc.tensor_to_image(small), args)
        label = name + (f" eta {eta:g}" if eta else "")
        for fix in ("none", args.default_fix):
            args.color_fix = fix
            fixed = up.color_fix(result, condition, low_res.to(result.device), args)
            rows[f"{label} ({fix})"] = scores(to_uint8(fixed), hr, clean_small, factor, interpolation, tiles, seconds)
    pipe.scheduler, args.scheduler, args.eta = up.make_scheduler(base_config, "unipc"), "unipc", 0.0
    args.color_fix = args.default_fix
    return rows


def print_table(title, hr, rows, default):
    print(f"\n{title}")
    print(f"  {'method':<36} {'PSNR dB':>8} {'SSIM':>7} {'consist. dB':>12} {'seam':>7} {'grid':>7} {'s/MP':>9}")
    for method, row in rows.items():
        mark = " *" if method == default else ""
        print(f"  {method + mark:<36} {row['psnr']:8.2f} {row['ssim']:7.4f} {row['consistency']:12.2f}"
              f" {row['seam']:7.3f} {row['grid']:7.3f} {row['s_per_mp']:9.2f}")


def variant_title(variant, small, hr):
    name, description, factor, _ = variant
    return (f"{name}: {description}, x{factor}: {small.shape[2]}x{small.shape[1]} -> {hr.shape[2]}x{hr.shape[1]};"
            f" grid of the ground truth {grid_peak(hr, factor):.3f}")


def save_figure(path, images, hr, label, fixes):
    """input (nearest, so its pixels show) | bicubic | ours (`label`) with each of `fixes` | ground truth."""
    size = (hr.shape[2], hr.shape[1])
    panels = [tc.tensor_to_image(images["input"]).resize(size, Image.Resampling.NEAREST),
              tc.tensor_to_image(images["bicubic"])]
    panels += [tc.tensor_to_image(images[f"{label} ({fix})"]) for fix in fixes] + [tc.tensor_to_image(hr)]
    tc.image_grid([panels]).save(path)
    print(f"\nfigure: {path} (input | bicubic | {' | '.join(f'ours {label}, {fix}' for fix in fixes)} | ground"
          " truth)")


def benchmark_model(bench, controlnet, hr):
    """Every variant through one ControlNet: {variant: {method: row}} (and "schedulers"), the label of its default
    rows, its tile config."""
    flags = ["--pretrained_model_name_or_path", bench.base, "--controlnet_model_name_or_path", controlnet,
             "--input", held_out_photo(), "--output", os.path.join(tempfile.gettempdir(), "bench_upscale.png"),
             "--num_inference_steps", str(bench.steps), "--guidance_scale", str(bench.guidance_scale),
             "--mixed_precision", bench.mixed_precision, "--batch_size", str(bench.batch_size),
             "--strength", str(bench.strength)]
    flags += ["--device", bench.device] if bench.device else []
    flags += ["--tile_overlap", str(bench.tile_overlap)] if bench.tile_overlap is not None else []
    flags += ["--color_fix", bench.color_fix] if bench.color_fix else []
    args = up.parse_args(flags)
    trained_factor = args.scale
    if trained_factor != int(trained_factor):
        raise SystemExit(f"error: the model's trained factor {trained_factor} is not an integer")
    config = args.tile_config
    pipe = up.load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config  # load_pipeline's UniPC, made from the base's: the base's settings
    peer = None
    if not bench.no_peer:
        from diffusers import StableDiffusionControlNetImg2ImgPipeline

        peer = StableDiffusionControlNetImg2ImgPipeline(**pipe.components)
        peer.set_progress_bar_config(disable=True)

    print(f"\n=== ControlNet {args.controlnet_dir}: trained x{trained_factor:g} ({config['interpolation']}), factors"
          f" {config.get('condition_scales', [trained_factor])}, degradation {config.get('condition_degradation', 'none')}")
    print(f"device {args.device}, mixed precision {args.mixed_precision}, {torch.get_num_threads()} threads;"
          f" base {bench.base}; HR {hr.shape[2]}x{hr.shape[1]}; {args.num_inference_steps} steps ({args.scheduler}),"
          f" guidance {args.guidance_scale:g}, tiles {args.tile_size} px overlapping by {args.tile_overlap} px,"
          f" batches of {args.batch_size}; * = --strength {bench.strength:g} --color_fix {args.color_fix}")
    args.default_fix = args.color_fix
    default = f"{strength_label(bench.strength)} ({args.default_fix})"
    args.scale = trained_factor
    up.generate(pipe, tc.tensor_to_image(reduce(hr, MAX_FACTOR, config["interpolation"])), args)  # warm-up
    results = {}
    for variant in variants(int(trained_factor), config["interpolation"]):
        if bench.variants and variant[0] not in bench.variants:
            continue
        rows, images = run_variant(pipe, peer, args, bench, hr, variant)
        print_table(variant_title(variant, images["input"], hr), hr, rows, default)
        results[variant[0]] = rows
        if variant[0] == "clean" and controlnet == bench.controlnet[0]:
            fixes = [args.default_fix] + (["wavelet"] if args.default_fix != "wavelet" else [])
            if bench.figure and 1.0 in bench.strengths:
                save_figure(bench.figure, images, hr, strength_label(1.0), fixes)
            if bench.strength_figure:
                save_figure(bench.strength_figure, images, hr, strength_label(bench.strength), [args.default_fix])
    args.scale = trained_factor
    if bench.schedulers:
        results["schedulers"] = run_schedulers(pipe, args, bench, hr, base_config)
        print_table(f"schedulers on the clean variant at --strength {bench.strength:g}", hr, results["schedulers"],
                    f"unipc ({args.default_fix})")
    return results, default


def gradient(width=40, height=28):
    """A smooth RGB gradient (red across, green down, blue against red): any frame or seam stands out on it."""
    x, y = torch.linspace(0, 1, width), torch.linspace(0, 1, height)
    rgb = torch.stack([x[None, :].expand(height, -1), y[:, None].expand(-1, width), 1 - x[None, :].expand(height, -1)])
    return tc.tensor_to_image(rgb)


def frame_steps(image):
    """uint8 CHW -> (last rows, first rows, first columns, last columns): the mean |step| between the two outermost
    lines over the median step between all lines, per side."""
    image = image.float()
    rows = image.diff(dim=-2).abs().mean((0, 2))
    cols = image.diff(dim=-1).abs().mean((0, 1))
    return rows[-1] / rows.median(), rows[0] / rows.median(), cols[0] / cols.median(), cols[-1] / cols.median()


def frame_check(bench, controlnet):
    """The border of a smooth gradient upscaled 4x: with the tile margin (upscale.TILE_MARGIN) and without (the
    decoder's zero padding at the canvas edge), at strength 1 and --strength, per colour fix; bicubic beside."""
    flags = ["--pretrained_model_name_or_path", bench.base, "--controlnet_model_name_or_path", controlnet,
             "--input", held_out_photo(), "--output", os.path.join(tempfile.gettempdir(), "bench_upscale.png"),
             "--num_inference_steps", str(bench.steps), "--batch_size", str(bench.batch_size)]
    flags += ["--device", bench.device] if bench.device else []
    args = up.parse_args(flags)
    pipe = up.load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    small = gradient()
    size = (small.height * int(args.scale), small.width * int(args.scale))
    print(f"\nframe: {small.width}x{small.height} gradient -> {size[1]}x{size[0]}; mean step between the two"
          " outermost rows/columns over the median step (last row, first row, first column, last column)")
    bicubic = tc.resize(tc.image_to_tensor(small), size, "bicubic")
    print(f"  {'bicubic':<40} " + " ".join(f"{v:6.2f}" for v in frame_steps(bicubic)))
    low_res = tc.image_to_tensor(small)[None].float() / 255
    margin = up.TILE_MARGIN
    for strength in (1.0, bench.strength):
        for tile_margin in (0, margin):
            up.TILE_MARGIN, args.strength = tile_margin, strength
            result, condition = up.generate(pipe, small, args)
            for fix in up.COLOR_FIXES:
                args.color_fix = fix
                fixed = to_uint8(up.color_fix(result, condition, low_res.to(result.device), args))
                label = f"S={strength:g}, margin {tile_margin}, {fix}"
                print(f"  {label:<40} " + " ".join(f"{v:6.2f}" for v in frame_steps(fixed)))
    up.TILE_MARGIN = margin


def speed_check(bench, controlnet, commit):
    """s/MP of `generate` in upscale.py as of `commit` and in the current one (strength 1 and --strength), on the
    same loaded pipeline, the runs alternated three times, best of three: ratios that hold on a busy machine."""
    from common import module_at

    then = module_at(commit, "upscale.py")
    hr = hr_image(bench.hr_width)
    flags = ["--pretrained_model_name_or_path", bench.base, "--controlnet_model_name_or_path", controlnet,
             "--input", held_out_photo(), "--output", os.path.join(tempfile.gettempdir(), "bench_upscale.png"),
             "--num_inference_steps", str(bench.steps), "--batch_size", str(bench.batch_size)]
    flags += ["--device", bench.device] if bench.device else []
    args = up.parse_args(flags + ["--strength", "1"])
    small = tc.tensor_to_image(reduce(hr, int(args.scale), args.tile_config["interpolation"]))
    pipe = up.load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    runs = {f"upscale.py of {commit}": lambda: then.generate(pipe, small, then.parse_args(flags)),
            "--strength 1": lambda: up.generate(pipe, small, args),
            f"--strength {bench.strength:g}": lambda: up.generate(pipe, small, up.parse_args(
                flags + ["--strength", str(bench.strength)]))}
    runs[f"--strength {bench.strength:g}"]()  # warm-up
    seconds = {name: math.inf for name in runs}
    for _ in range(3):
        for name, run in runs.items():
            seconds[name] = min(seconds[name], timed(run)[1])
    megapixels = hr.shape[1] * hr.shape[2] / 1e6
    first = seconds[f"upscale.py of {commit}"]
    print(f"\nspeed: {small.width}x{small.height} -> {hr.shape[2]}x{hr.shape[1]}, {bench.steps} steps, best of 3")
    print("| run | s/MP | ratio |\n|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value / megapixels:.1f} | {value / first:.2f} |")


def print_comparison(labels, all_results, fixes):
    """One line per variant: PSNR (consistency) of the baselines and of every model with its default colour fix;
    then the means over the degraded variants for every colour fix."""
    first = all_results[labels[0]]
    methods = ["bicubic", "lanczos"] + [f"{label} {fixes[label]}" for label in labels]
    print("\n=== Side by side: PSNR dB (consistency dB); each model with its default colour fix")
    print("| variant | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    for variant in (v for v in first if v != "schedulers"):
        cells = [first[variant][m] for m in ("bicubic", "lanczos")]
        cells += [all_results[label][variant][fixes[label]] for label in labels]
        print(f"| {variant} | " + " | ".join(f"{c['psnr']:.2f} ({c['consistency']:.2f})" for c in cells) + " |")
    print(f"\n=== Mean consistency dB over the degraded variants ({', '.join(DEGRADED)}), clean consistency dB,"
          " and the x8 grid (ground truth: see the x8 table)")
    print("| model | colour fix | degraded mean | clean | x8 grid |")
    print("|---|---|---|---|---|")
    for label in labels:
        results = all_results[label]
        for fix in up.COLOR_FIXES:
            method = fixes[label].rsplit(" (", 1)[0] + f" ({fix})"
            degraded = float(np.mean([results[v][method]["consistency"] for v in DEGRADED]))
            mark = " *" if method == fixes[label] else ""
            print(f"| {label} | {fix}{mark} | {degraded:.2f} | {results['clean'][method]['consistency']:.2f} |"
                  f" {results['x8'][method]['grid']:.3f} |")
    for method in ("bicubic", "lanczos"):
        degraded = float(np.mean([first[v][method]["consistency"] for v in DEGRADED]))
        print(f"| {method} | - | {degraded:.2f} | {first['clean'][method]['consistency']:.2f} |"
              f" {first['x8'][method]['grid']:.3f} |")


def main():
    bench = parse_args()
    labels = bench.label or [os.path.basename(os.path.normpath(c)) for c in bench.controlnet]
    if len(labels) != len(bench.controlnet):
        raise SystemExit("error: give one --label per --controlnet")
    tc.DropNotices.install(xformers_requested=False)
    if bench.frame_check:
        return frame_check(bench, bench.controlnet[0])
    if bench.speed_against:
        return speed_check(bench, bench.controlnet[0], bench.speed_against)
    hr = hr_image(bench.hr_width)
    print(f"held-out photo {held_out_photo()} -> HR {hr.shape[2]}x{hr.shape[1]}; grid of the ground truth at x8:"
          f" {grid_peak(hr, 8):.3f}")
    all_results, fixes = {}, {}
    for label, controlnet in zip(labels, bench.controlnet):
        all_results[label], fixes[label] = benchmark_model(bench, controlnet, hr)
    if len(labels) > 1:
        print_comparison(labels, all_results, fixes)

    for label in labels:
        results, ours = all_results[label], fixes[label]
        clean = results["clean"]
        unfixed = ours.rsplit(" (", 1)[0] + " (none)"
        today = f"{strength_label(1.0)} ({ours.rsplit(' (', 1)[1]}"
        prefix = f"{label}: " if len(labels) > 1 else ""
        print(f"\n{prefix}upscale_psnr_vs_bicubic: {clean[ours]['psnr'] - clean['bicubic']['psnr']:.2f}")
        print(f"{prefix}upscale_consistency_psnr: {clean[ours]['consistency']:.2f}")
        print(f"{prefix}seam_ratio: {clean[ours]['seam']:.3f}")
        if all(v in results for v in DEGRADED + ("x8",)):
            print(f"{prefix}degraded_consistency_psnr:"
                  f" {np.mean([results[v][ours]['consistency'] for v in DEGRADED]):.2f}")
            print(f"{prefix}x8_grid_vs_ground_truth: {results['x8'][ours]['grid'] / grid_peak(hr, 8):.3f}")
        if today in clean:
            print(f"{prefix}consistency_without_colour_fix: {clean[unfixed]['consistency']:.2f} (ceiling"
                  f" {clean['VAE round trip (ceiling)']['consistency']:.2f}, strength 1:"
                  f" {clean[strength_label(1.0) + ' (none)']['consistency']:.2f})")
            print(f"{prefix}seconds_per_mp_vs_strength_1: {clean[ours]['s_per_mp'] / clean[today]['s_per_mp']:.2f}")


if __name__ == "__main__":
    main()
