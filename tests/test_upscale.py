"""upscale.py: sizes, file and folder mode, equivalence with diffusers' pipeline on one tile, seams, colour fix,
one-line errors. On the tiny random pipeline with a ControlNet whose zero convolutions are random, so that its
condition changes the result (a fresh ControlNet adds exactly nothing)."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT

import train_controlnet as tc
import upscale as up

STEPS = "2"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiles of 8x8 latents gain nothing from a second thread, and on a busy 2-core machine its spin-waiting slows
    this file several-fold (conftest's OMP_NUM_THREADS=1 does the same unless the environment set another count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_random_controlnet(base, path, family="sd"):
    """A ControlNet of `base`'s UNet whose condition acts (its zero convolutions made random), with the tile config
    of 64 px targets from 16 px conditions, saved to `path`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith("controlnet_cond_embedding") and p.ndim == 4:  # He init: the condition's signal survives
                p.copy_(torch.randn(p.shape, generator=generator) * math.sqrt(2 / p[0].numel()))
            elif not p.any():  # the zero convolutions
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    controlnet.save_pretrained(path)
    args = tc.make_parser().parse_args(["--resolution=64", "--condition_resolution=16"])
    args.family = family
    tc.save_tile_config(args, path)
    return str(path)


@pytest.fixture(scope="module")
def controlnet_dir(tiny_model, tmp_path_factory):
    return save_random_controlnet(tiny_model, tmp_path_factory.mktemp("controlnet") / "controlnet-tile")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A real photo no tool trains on (matplotlib's sample), reduced to 48x56: several tiles at 4x."""
    from matplotlib import cbook

    path = tmp_path_factory.mktemp("photo") / "grace_hopper_small.png"
    Image.open(cbook.get_sample_data("grace_hopper.jpg")).resize((48, 56), Image.Resampling.BICUBIC).save(path)
    return str(path)


def cli(tiny_model, controlnet_dir, input_path, output_path, *extra):
    """Flags for upscale.py; from pure noise (--strength 1) unless `extra` says otherwise, so that STEPS steps run."""
    flags = ["--pretrained_model_name_or_path", tiny_model, "--controlnet_model_name_or_path", controlnet_dir,
             "--input", input_path, "--output", output_path, "--num_inference_steps", STEPS, "--device", "cpu",
             "--strength", "1", *extra]
    return [str(flag) for flag in flags]


def load(base, controlnet_dir, photo, out):
    """A pipeline, and a function that makes parsed arguments for it."""
    def make_args(*extra):
        return up.parse_args(cli(base, controlnet_dir, photo, out, *extra))

    pipe = up.load_pipeline(make_args())
    pipe.set_progress_bar_config(disable=True)
    return pipe, make_args


@pytest.fixture(scope="module")
def pipeline(tiny_model, controlnet_dir, photo, tmp_path_factory):
    """On the random base: its colours are its own, and it is the plain pipeline's equal."""
    return load(tiny_model, controlnet_dir, photo, tmp_path_factory.mktemp("out") / "x.png")


@pytest.fixture(scope="module")
def trained_pipeline(controlnet_dir, photo, tmp_path_factory):
    """On the shipped trained base (same shapes as the random one): its VAE decodes real image structure, so a tile
    border that the decoder leaves unblended shows (the random VAE's output is noise-like everywhere)."""
    base = str(ROOT / "tools" / "tiny-sd-trained")
    return load(base, controlnet_dir, photo, tmp_path_factory.mktemp("out") / "x.png")


def write_image(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Sizes, file and folder mode


@pytest.mark.parametrize("size, extra, expected", [
    ((37, 23), [], (148, 92)),             # odd sides, landscape, several tiles at the default (trained) 4x
    ((23, 37), [], (92, 148)),             # portrait
    ((5, 3), [], (20, 12)),                # smaller than one tile, not a multiple of 8
    ((37, 23), ["--scale", "2.5"], (93, 58)),  # 92.5 and 57.5 round half up
])
def test_output_size_single_file(tiny_model, controlnet_dir, tmp_path, size, extra, expected):
    source = write_image(tmp_path / "in.png", *size)
    up.main(up.parse_args(cli(tiny_model, controlnet_dir, source, tmp_path / "out.png", *extra)))
    assert Image.open(tmp_path / "out.png").size == expected


def test_folder_mode_skips_unreadable_files(tiny_model, controlnet_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(folder / "wide.png", 37, 23)
    write_image(folder / "tall.jpg", 19, 29, seed=1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (folder / "notes.txt").write_text("not an image, not an image file name: ignored")
    up.main(up.parse_args(cli(tiny_model, controlnet_dir, folder, tmp_path / "out")))
    assert sorted(os.listdir(tmp_path / "out")) == ["tall.png", "wide.png"]
    assert Image.open(tmp_path / "out" / "wide.png").size == (148, 92)
    assert Image.open(tmp_path / "out" / "tall.png").size == (76, 116)
    assert "2 done, 0 skipped (output already there), 1 failed of 3: broken.png" in capsys.readouterr().out


def test_folder_mode_keeps_inputs_that_share_a_name_apart(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "a.jpg", "b.webp"):
        write_image(folder / name, 9, 7)
    jobs = up.list_jobs(str(folder), str(tmp_path / "out"))
    assert sorted(os.path.basename(o) for _, o in jobs) == ["a.jpg.png", "a.png.png", "b.png"]


def test_checkpoint_folder_and_old_folder_without_tile_config(tiny_model, controlnet_dir, photo, tmp_path, caplog):
    checkpoint = tmp_path / "run" / "checkpoint-5"
    shutil.copytree(controlnet_dir, checkpoint / "controlnet")
    args = up.parse_args(cli(tiny_model, checkpoint, photo, tmp_path / "a.png"))
    assert args.controlnet_dir == str(checkpoint / "controlnet") and args.scale == 4.0 and args.tile_size == 64

    old = tmp_path / "old"
    shutil.copytree(controlnet_dir, old)
    os.remove(old / tc.TILE_CONFIG)
    source = write_image(tmp_path / "in.png", 10, 6)
    with caplog.at_level("WARNING"):
        args = up.parse_args(cli(tiny_model, old, source, tmp_path / "b.png"))
    assert "tile_config.json" in caplog.text
    assert (args.scale, args.tile_size, args.tile_config["interpolation"]) == (4.0, 256, "bicubic")  # trainer defaults
    up.main(args)
    assert Image.open(tmp_path / "b.png").size == (40, 24)


def test_defaults_follow_tile_config(tiny_model, controlnet_dir, photo, tmp_path, caplog):
    """The colour fix keeps the input's degradations unless the model was trained to remove them; a factor the
    model never saw is allowed, with a warning."""
    assert up.parse_args(cli(tiny_model, controlnet_dir, photo, tmp_path / "a.png")).color_fix == "backprojection"
    degraded = tmp_path / "degraded"
    shutil.copytree(controlnet_dir, degraded)
    config = json.loads((degraded / tc.TILE_CONFIG).read_text())
    config.update(condition_scales=[2, 4], condition_degradation="realesrgan")
    (degraded / tc.TILE_CONFIG).write_text(json.dumps(config))
    args = up.parse_args(cli(tiny_model, degraded, photo, tmp_path / "b.png"))
    assert (args.color_fix, args.scale) == ("wavelet", 4.0)
    with caplog.at_level("WARNING"):
        up.parse_args(cli(tiny_model, degraded, photo, tmp_path / "b.png", "--scale", "2"))
        assert not caplog.text
        up.parse_args(cli(tiny_model, degraded, photo, tmp_path / "b.png", "--scale", "3"))
    assert "--scale=3: the ControlNet was trained for x2, x4" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# The loop is diffusers' loop


def test_one_tile_matches_stable_diffusion_controlnet_pipeline(pipeline, tmp_path, monkeypatch):
    """The pipeline decodes without a margin (its border has the frame upscale.py's margin removes)."""
    monkeypatch.setattr(up, "TILE_MARGIN", 0)
    pipe, make_args = pipeline
    args = make_args("--prompt", "a cat", "--negative_prompt", "blurry", "--guidance_scale", "3",
                     "--controlnet_conditioning_scale", "0.7", "--num_inference_steps", "3", "--seed", "7")
    image = Image.open(write_image(tmp_path / "in.png", 16, 12))  # -> 64x48, one tile
    ours, condition = up.generate(pipe, image, args)
    theirs = pipe(
        "a cat", condition, height=48, width=64, num_inference_steps=3, guidance_scale=3.0, negative_prompt="blurry",
        controlnet_conditioning_scale=0.7, generator=torch.Generator().manual_seed(7), output_type="np",
    ).images[0]
    assert ours.shape == (1, 3, 48, 64)
    difference = (ours[0].permute(1, 2, 0) - torch.from_numpy(theirs)).abs().mean().item()
    assert difference < 1e-3, difference
    # The comparison has teeth: another condition moves the result by several times the tolerance (and another
    # seed by ~200 times).
    other = pipe("a cat", condition.flip(-1), height=48, width=64, num_inference_steps=3, guidance_scale=3.0,
                 negative_prompt="blurry", controlnet_conditioning_scale=0.7,
                 generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    assert np.abs(other - theirs).mean() > 3e-3


# ----------------------------------------------------------------------------------------------------------------
# Tiles


def gradient_image():
    x = np.linspace(0, 1, 40)
    rgb = np.stack([x[None, :].repeat(40, 0), x[:, None].repeat(40, 1), 1 - x[None, :].repeat(40, 0)], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


@pytest.mark.parametrize("source", ["gradient", "photo"])
def test_no_seams(trained_pipeline, photo, source):
    """Measured over seeds 0-5: 0.93-1.20 on the gradient, 0.93-1.12 on the photo (2 steps leave the random
    ControlNet's noise-driven content, which differs between the few border lines and the others); with the decoded
    tiles averaged instead of blended: 3.3-4.0; with tiles pasted over each other: 4.9-5.2."""
    assert_no_seams(*trained_pipeline, gradient_image() if source == "gradient" else Image.open(photo))


def assert_no_seams(pipe, make_args, image):
    """Upscaled in 9 tiles or more without a colour fix, the tile borders step as the other lines do."""
    args = make_args("--color_fix", "none")
    result, _ = up.generate(pipe, image, args)
    tiles = up.canvas_tiles(*result.shape[-2:], args)
    assert len(tiles) >= 9
    score = up.seam_score(result[0], tiles)
    assert abs(score - 1) < 0.25, score


def test_overlaps_agree(trained_pipeline, photo):
    """Two tilings of one canvas share its noise and blend the same predictions: nearly the same image, far closer
    than two seeds are. Measured: 0.21 of the seeds' difference; 0.93 with the noise drawn per tiling, 0.36 with the
    tiles pasted unblended."""
    pipe, make_args = trained_pipeline
    image = Image.open(photo)
    a, _ = up.generate(pipe, image, make_args("--tile_overlap", "32"))
    b, _ = up.generate(pipe, image, make_args("--tile_overlap", "48"))
    c, _ = up.generate(pipe, image, make_args("--tile_overlap", "32", "--seed", "1"))
    overlaps, seeds = (a - b).abs().mean().item(), (a - c).abs().mean().item()
    assert overlaps < 0.3 * seeds, (overlaps, seeds)


# ----------------------------------------------------------------------------------------------------------------
# Colour fix


def test_color_fix_brings_back_the_input_colours(pipeline, photo):
    """The random base draws colours of its own; reduced back to the input's size, the result matches the input
    better with either colour fix."""
    pipe, make_args = pipeline
    image = Image.open(photo)
    scores = {}
    for method in up.COLOR_FIXES:
        result = up.upscale_image(pipe, image, make_args("--color_fix", method))
        reduced = tc.resize(tc.image_to_tensor(result), (image.height, image.width), "bicubic")
        scores[method] = tc.psnr(tc.tensor_to_image(reduced), image)
    assert scores["adain"] > scores["none"] + 1, scores
    assert scores["wavelet"] > scores["none"] + 3, scores
    assert scores["backprojection"] > 30, scores  # 5 steps from ~8 dB; the reduction it inverts is the trainer's


def test_color_fix_functions():
    generator = torch.Generator().manual_seed(0)
    image, reference = torch.rand(2, 1, 3, 40, 30, generator=generator)
    reference = reference * 0.3 + 0.1  # darker and flatter than the image
    high, low = up.wavelet_decomposition(image)
    assert torch.allclose(high + low, image, atol=1e-6)
    assert low.diff(dim=-1).abs().mean() < 0.1 * image.diff(dim=-1).abs().mean()  # the low band is smooth

    def distance(a, b):  # of the low bands
        return (up.wavelet_decomposition(a)[1] - up.wavelet_decomposition(b)[1]).abs().mean()

    assert distance(up.wavelet_color_fix(image, reference), reference) < 0.1 * distance(image, reference)
    fixed = up.adain_color_fix(image, reference)
    assert torch.allclose(fixed.mean((-2, -1)), reference.mean((-2, -1)), atol=1e-5)
    assert torch.allclose(fixed.std((-2, -1)), reference.std((-2, -1)), atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line each, before any model loads


def mismatched_controlnet(controlnet_dir, tmp_path, **changes):
    path = tmp_path / "mismatched"
    shutil.copytree(controlnet_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


BAD_INPUTS = {
    "missing input": (lambda d, t, c: {"--input": t / "nope.png"}, "--input not found"),
    "unreadable input": (lambda d, t, c: {"--input": broken(t)}, "cannot read image"),
    "empty output": (lambda d, t, c: {"--scale": "0.01"}, "into an empty image"),
    "unwritable output": (lambda d, t, c: {"--output": t / "a_file" / "out.png"}, "cannot write to"),
    "output format": (lambda d, t, c: {"--output": t / "out.unknown"}, "needs an image extension"),
    "unknown controlnet": (lambda d, t, c: {"--controlnet_model_name_or_path": t / "nothing"}, "no such folder"),
    "not a controlnet folder": (lambda d, t, c: {"--controlnet_model_name_or_path": t}, "no ControlNet"),
    "hub id, offline": (lambda d, t, c: {"--controlnet_model_name_or_path": "someone/no-such-tile"},
                        "not in the local hub cache and HF_HUB_OFFLINE is set"),
    "cross_attention_dim": (lambda d, t, c: {"--controlnet_model_name_or_path": mismatched_controlnet(
        c, t, cross_attention_dim=64)}, "cross_attention_dim is 64 in the ControlNet and 32 in the base"),
    "block channels": (lambda d, t, c: {"--controlnet_model_name_or_path": mismatched_controlnet(
        c, t, block_out_channels=[32, 32])}, "block_out_channels is [32, 32] in the ControlNet and [32, 64]"),
    "conditioning channels": (lambda d, t, c: {"--controlnet_model_name_or_path": mismatched_controlnet(
        c, t, conditioning_channels=1)}, "takes 1-channel conditions"),
    "sdxl controlnet on an sd base": (lambda d, t, c: {"--controlnet_model_name_or_path": mismatched_controlnet(
        c, t, addition_embed_type="text_time")}, "it is a Stable Diffusion XL ControlNet and the base is Stable"
                                                 " Diffusion 1.x/2.x"),
    "missing vae": (lambda d, t, c: {"--pretrained_vae_model_name_or_path": t / "no-vae"},
                    "--pretrained_vae_model_name_or_path: model not found"),
    "fp16 on cpu": (lambda d, t, c: {"--mixed_precision": "fp16"}, "needs a CUDA GPU"),
    "tile size": (lambda d, t, c: {"--tile_size": "60"}, "--tile_size must be a positive multiple of 8"),
    "tile overlap": (lambda d, t, c: {"--tile_overlap": "64"}, "--tile_overlap must be a multiple of 8 in [0, "),
    "output is the input": (lambda d, t, c: {"--output": t / "in.png"}, "in.png would overwrite the input"),
    "output folder is the input folder": (lambda d, t, c: {"--input": t, "--output": t},
                                          "in.png would overwrite the input"),
    "strength 0": (lambda d, t, c: {"--strength": "0"}, "--strength must be in (0, 1], got 0"),
    "strength above 1": (lambda d, t, c: {"--strength": "1.5"}, "--strength must be in (0, 1], got 1.5"),
    "strength runs no step": (lambda d, t, c: {"--strength": "0.3"}, "runs int(0.3 x --num_inference_steps=2) = 0"),
    "negative eta": (lambda d, t, c: {"--eta": "-1"}, "--eta must be >= 0"),
    "missing init image": (lambda d, t, c: {"--init_image": t / "nope.png"}, "--init_image: not found"),
    "no init image for an input": (lambda d, t, c: {"--input": t, "--output": t / "out", "--init_image": t / "a_dir"},
                                   "has no start image for 1 input(s): in.png"),
}


def broken(tmp_path):
    path = tmp_path / "truncated.png"
    Image.new("RGB", (32, 32), "red").save(path)
    path.write_bytes(path.read_bytes()[:60])
    return path


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line(case, tiny_model, controlnet_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "a_file").write_text("a file where a folder should be")
    (tmp_path / "a_dir").mkdir()
    source = write_image(tmp_path / "in.png", 37, 23)
    make_changes, message = BAD_INPUTS[case]
    flags = dict(zip(*[iter(cli(tiny_model, controlnet_dir, source, tmp_path / "out.png"))] * 2))
    flags.update({k: str(v) for k, v in make_changes(tiny_model, tmp_path, controlnet_dir).items()})
    with pytest.raises(SystemExit) as exit_info:
        up.parse_args([x for pair in flags.items() for x in pair])
    error = str(exit_info.value.code)
    assert error.startswith("upscale.py: error: ") and "\n" not in error and message in error, error
    assert capsys.readouterr().err == ""


def test_bad_input_from_the_command_line(tiny_model, controlnet_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "upscale.py"),
         *cli(tiny_model, controlnet_dir, tmp_path / "nope.png", tmp_path / "o.png")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"upscale.py: error: --input not found: {tmp_path / 'nope.png'}"]


def test_benchmark_grid_metric_sees_a_grid_at_the_reduction_period():
    """bench_upscale's grid score (the issue's "no grid artifacts at 8x"): below 1 for a photo, far above it once a
    faint pattern repeating every 8 px is added, and unmoved by a pattern of another period."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_upscale

    hr = bench_upscale.hr_image(256)
    y, x = torch.meshgrid(torch.arange(hr.shape[1]), torch.arange(hr.shape[2]), indexing="ij")

    def with_pattern(period):  # +-3 levels on the first row and column of every period x period cell
        pattern = (((y % period) == 0) | ((x % period) == 0)).float() * 6 - 3
        return (hr.float() + pattern).clamp(0, 255).to(torch.uint8)

    photo = bench_upscale.grid_peak(hr, 8)
    assert 0.3 < photo < 1.0, photo  # measured 0.63
    assert bench_upscale.grid_peak(with_pattern(8), 8) > 4 * photo  # 5.0
    assert bench_upscale.grid_peak(with_pattern(7), 8) < 1.2 * photo  # 0.65
