"""Super-resolution benchmark: a trained ControlNet tile model (through upscale.py's code) against bicubic and
lanczos enlargement, on a held-out photo, for the trainer's own reduction and for degradations it never saw.

    python benchmarks/bench_upscale.py --controlnet quickstart/controlnet-tile [--base tools/tiny-sd-trained]
        [--steps 20] [--color_fix backprojection] [--guidance_scale 1] [--tile_overlap PX] [--device cpu]
        [--mixed_precision no] [--hr_width 256] [--figure docs/upscale-example.png]

Held-out photo: matplotlib's sample `grace_hopper.jpg` (512x600, installed with matplotlib, a dev requirement). The
training shards (tools/make_shards.py) and the shipped base's training crops (tools/make_tiny_pipeline.py --trained,
which draws them through make_shards.load_sources) both come from the 18 scikit-image photos of
make_shards.SKIMAGE_PHOTOS only; no other photo ships with the installed packages (scikit-image's other images are
synthetic, binary, 25 px faces, a 102 px retina crop or the right view of the same motorcycle scene). The HR image
is the photo reduced by the trainer's resize to --hr_width wide (the shipped tiny base learned whole-photo views at
64 px, not 512-px close-ups), cropped to sides divisible by 8, the largest factor.

Variants (each a low-resolution input, and the clean reduction it is scored against):
  clean      the trainer's reduction (its resize with the model's filter) by the model's trained factor
  area       box (area-average) reduction instead
  jpeg30     the trainer's reduction, then JPEG quality 30
  blur1.5    Gaussian blur sigma 1.5 on the HR image, then the trainer's reduction
  noise10    the trainer's reduction, then Gaussian noise sigma 10/255
  x2, x8     the trainer's reduction by 2 and by 8
Columns: PSNR and SSIM against the HR image; consistency: PSNR of the output reduced back by the variant's reduction
against the clean reduction of the HR image (does it keep the content, and does it remove the degradation?); seam:
upscale.seam_score at the tile borders the model used (the other methods scored at the same lines); seconds per
output megapixel. The model's rows share one denoising run per variant and differ only in the colour fix;
"bicubic + backprojection" is upscale.py's back-projection applied to the bicubic enlargement, so that what
back-projection adds by itself (it sharpens) is not credited to the model.
"""

import argparse
import io
import os
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
    parser.add_argument("--controlnet", required=True, help="A trained ControlNet: output_dir or checkpoint-N.")
    parser.add_argument("--base", default=str(ROOT / "tools" / "tiny-sd-trained"), help="Its base model.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--color_fix", default=None, choices=up.COLOR_FIXES,
                        help="The colour fix of the summary lines (every one is in the tables); upscale.py's default"
                        " if unset.")
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--tile_overlap", type=int, default=None, help="Pixels; upscale.py's default if unset.")
    parser.add_argument("--batch_size", type=int, default=8, help="Tiles per forward pass.")
    parser.add_argument("--device", default=None)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--hr_width", type=int, default=256, help="Width of the HR image made from the photo.")
    parser.add_argument("--figure", default=None, help="Write input | bicubic | ours | ground truth (clean) here.")
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


def jpeg(image, quality):
    buffer = io.BytesIO()
    tc.tensor_to_image(image).save(buffer, format="JPEG", quality=quality)
    return tc.image_to_tensor(Image.open(buffer).convert("RGB"))


def gaussian_blur(image, sigma):
    from skimage.filters import gaussian

    blurred = gaussian(image.permute(1, 2, 0).numpy() / 255.0, sigma=sigma, channel_axis=-1)
    return torch.from_numpy(np.round(blurred * 255).astype(np.uint8)).permute(2, 0, 1)


def gaussian_noise(image, sigma, seed=0):
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (image.float() + noise).round().clamp(0, 255).to(torch.uint8)


def variants(trained_factor, interpolation):
    """(name, description, factor, reduction filter, degradation of the HR image, degradation of the reduced one)."""
    return [
        ("clean", f"the trainer's reduction ({interpolation})", trained_factor, interpolation, None, None),
        ("area", "area (box) reduction", trained_factor, "box", None, None),
        ("jpeg30", "JPEG quality 30 after the reduction", trained_factor, interpolation, None, lambda x: jpeg(x, 30)),
        ("blur1.5", "Gaussian blur sigma 1.5 before the reduction", trained_factor, interpolation,
         lambda x: gaussian_blur(x, 1.5), None),
        ("noise10", "Gaussian noise sigma 10/255 after the reduction", trained_factor, interpolation, None,
         lambda x: gaussian_noise(x, 10)),
        ("x2", "the trainer's reduction by 2", 2, interpolation, None, None),
        ("x8", "the trainer's reduction by 8", 8, interpolation, None, None),
    ]


def ssim(a, b):
    from skimage.metrics import structural_similarity

    return structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), channel_axis=2,
                                 data_range=255)


def scores(output, hr, clean_small, factor, interpolation, tiles, seconds):
    """output, hr: uint8 CHW at the HR size -> the row of one method."""
    return {
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


def to_uint8(image):
    return (image[0] * 255).round().clamp(0, 255).to(torch.uint8).cpu()


def run_variant(pipe, args, hr, variant):
    """-> {method: row}, and the images of the figure."""
    name, _, factor, interpolation, before, after = variant
    small = reduce(before(hr) if before else hr, factor, interpolation)
    small = after(small) if after else small
    clean_small = reduce(hr, factor, interpolation)
    args.scale = factor
    size = tuple(hr.shape[1:])
    tiles = up.canvas_tiles(*size, args)
    rows, images = {}, {"input": small}
    low_res = small[None].float() / 255
    for method in ("bicubic", "lanczos"):
        images[method], seconds = timed(tc.resize, small, size, method)
        rows[method] = scores(images[method], hr, clean_small, factor, interpolation, tiles, seconds)
    # The same back-projection on the bicubic enlargement: what the model's own detail adds is the difference.
    projected, seconds = timed(up.backprojection, images["bicubic"][None].float() / 255, low_res, interpolation)
    rows["bicubic + backprojection"] = scores(to_uint8(projected.clamp(0, 1)), hr, clean_small, factor, interpolation,
                                              tiles, seconds)
    (result, condition), seconds = timed(up.generate, pipe, tc.tensor_to_image(small), args)
    low_res = low_res.to(result.device)
    for fix in up.COLOR_FIXES:
        args.color_fix = fix
        fixed, fix_seconds = timed(up.color_fix, result, condition, low_res, args)
        images[f"model ({fix})"] = to_uint8(fixed)
        rows[f"model ({fix})"] = scores(images[f"model ({fix})"], hr, clean_small, factor, interpolation, tiles,
                                        seconds + fix_seconds)
    return rows, images


def print_table(variant, small, hr, rows, default_fix):
    name, description, factor, *_ = variant
    print(f"\n{name}: {description}, x{factor}: {small.shape[2]}x{small.shape[1]} -> {hr.shape[2]}x{hr.shape[1]}")
    print(f"  {'method':<24} {'PSNR dB':>8} {'SSIM':>7} {'consist. dB':>12} {'seam':>7} {'s/MP':>9}")
    for method, row in rows.items():
        mark = " *" if method == f"model ({default_fix})" else ""
        print(f"  {method + mark:<24} {row['psnr']:8.2f} {row['ssim']:7.4f} {row['consistency']:12.2f}"
              f" {row['seam']:7.3f} {row['s_per_mp']:9.2f}")


def save_figure(path, images, hr, default_fix):
    """input (nearest, so its pixels show) | bicubic | ours | ours with the wavelet fix, if not the default (the
    model's own drawing, colours fixed) | ground truth."""
    size = (hr.shape[2], hr.shape[1])
    fixes = [default_fix] + (["wavelet"] if default_fix != "wavelet" else [])
    panels = [tc.tensor_to_image(images["input"]).resize(size, Image.Resampling.NEAREST),
              tc.tensor_to_image(images["bicubic"])]
    panels += [tc.tensor_to_image(images[f"model ({fix})"]) for fix in fixes] + [tc.tensor_to_image(hr)]
    tc.image_grid([panels]).save(path)
    print(f"\nfigure: {path} (input | bicubic | {' | '.join(f'ours, {fix}' for fix in fixes)} | ground truth)")


def main():
    bench = parse_args()
    flags = ["--pretrained_model_name_or_path", bench.base, "--controlnet_model_name_or_path", bench.controlnet,
             "--input", held_out_photo(), "--output", os.path.join(tempfile.gettempdir(), "bench_upscale.png"),
             "--num_inference_steps", str(bench.steps), "--guidance_scale", str(bench.guidance_scale),
             "--mixed_precision", bench.mixed_precision, "--batch_size", str(bench.batch_size)]
    flags += ["--device", bench.device] if bench.device else []
    flags += ["--tile_overlap", str(bench.tile_overlap)] if bench.tile_overlap is not None else []
    flags += ["--color_fix", bench.color_fix] if bench.color_fix else []
    args = up.parse_args(flags)
    bench.color_fix = args.color_fix
    trained_factor = args.scale
    if trained_factor != int(trained_factor):
        raise SystemExit(f"error: the model's trained factor {trained_factor} is not an integer")
    interpolation = args.tile_config["interpolation"]
    tc.DropNotices.install(xformers_requested=False)
    pipe = up.load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    hr = hr_image(bench.hr_width)

    print(f"device {args.device}, mixed precision {args.mixed_precision}, {torch.get_num_threads()} threads;"
          f" base {bench.base}; ControlNet {args.controlnet_dir}, trained x{trained_factor:g} ({interpolation})")
    print(f"held-out photo {held_out_photo()} -> HR {hr.shape[2]}x{hr.shape[1]}; {args.num_inference_steps} steps,"
          f" guidance {args.guidance_scale:g}, tiles {args.tile_size} px overlapping by {args.tile_overlap} px,"
          f" batches of {args.batch_size}; * = --color_fix {bench.color_fix}")
    args.scale = trained_factor
    up.generate(pipe, tc.tensor_to_image(reduce(hr, MAX_FACTOR, interpolation)), args)  # warm-up: first calls are slow
    results = {}
    for variant in variants(int(trained_factor), interpolation):
        rows, images = run_variant(pipe, args, hr, variant)
        print_table(variant, images["input"], hr, rows, bench.color_fix)
        results[variant[0]] = rows
        if variant[0] == "clean" and bench.figure:
            save_figure(bench.figure, images, hr, bench.color_fix)

    ours, clean = f"model ({bench.color_fix})", results["clean"]
    print(f"\nupscale_psnr_vs_bicubic: {clean[ours]['psnr'] - clean['bicubic']['psnr']:.2f}")
    print(f"upscale_consistency_psnr: {clean[ours]['consistency']:.2f}")
    print(f"seam_ratio: {clean[ours]['seam']:.3f}")


if __name__ == "__main__":
    main()
