"""upscale.py --strength, --init_image, --scheduler: strength 1 is the code before them, bit for bit; below 1 one tile
is diffusers' StableDiffusionControlNetImg2ImgPipeline; stochastic samplers follow the seed; the tiled VAE round
trip has no seam and no frame; a non-finite tile decode is redone in float32. On the tiny models of test_upscale."""

import logging

import pytest
import torch
from PIL import Image

from conftest import module_at
from test_upscale import (cli, controlnet_dir, gradient_image, one_thread, photo, pipeline,  # noqa: F401
                          trained_pipeline, write_image)

import train_controlnet as tc
import upscale as up

BEFORE_STRENGTH = "a4e7cb7"  # the last commit whose upscale.py always started from pure noise


def test_strength_1_is_the_code_before_strength(tiny_model, controlnet_dir, pipeline, photo, tmp_path, monkeypatch):
    """Same pipeline, same flags, several tiles: the same image to the last bit once the tile margin (the frame fix,
    which changes only the decode) is off."""
    pipe, _ = pipeline
    old = module_at(BEFORE_STRENGTH, "upscale.py")
    image = Image.open(photo).resize((24, 20))  # 96x80: 2x2 tiles
    flags = cli(tiny_model, controlnet_dir, photo, tmp_path / "x.png", "--num_inference_steps", "3", "--seed", "3")
    old_flags = flags[:flags.index("--strength")] + flags[flags.index("--strength") + 2:]
    theirs, _ = old.generate(pipe, image, old.parse_args(old_flags))
    args = up.parse_args(flags)
    assert args.strength == 1 and len(up.canvas_tiles(80, 96, args)) == 4
    monkeypatch.setattr(up, "TILE_MARGIN", 0)
    ours, _ = up.generate(pipe, image, args)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("scheduler", ["unipc", "ddim"])
def test_one_tile_matches_img2img_pipeline(pipeline, tmp_path, monkeypatch, scheduler):
    """One tile at --strength 0.5 is StableDiffusionControlNetImg2ImgPipeline with the same seed, scheduler,
    strength and steps, started from the condition. The pipeline draws its latents from the VAE's posterior with
    the seed; upscale.py takes the mean, so the pipeline is given the mean too (then both draw the same noise)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    pipe, make_args = pipeline
    monkeypatch.setattr(up, "TILE_MARGIN", 0)  # the pipeline decodes without one
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    base_scheduler = pipe.scheduler
    pipe.scheduler = up.make_scheduler(base_scheduler.config, scheduler)
    try:
        args = make_args("--strength", "0.5", "--num_inference_steps", "4", "--seed", "5", "--scheduler", scheduler,
                         "--prompt", "a cat", "--controlnet_conditioning_scale", "0.7")
        image = Image.open(write_image(tmp_path / "in.png", 16, 12))  # -> 64x48, one tile
        ours, condition = up.generate(pipe, image, args)
        img2img = StableDiffusionControlNetImg2ImgPipeline(**pipe.components)
        img2img.set_progress_bar_config(disable=True)

        def theirs(strength):
            return torch.from_numpy(img2img(
                "a cat", image=condition, control_image=condition, height=48, width=64, strength=strength,
                num_inference_steps=4, guidance_scale=1.0, controlnet_conditioning_scale=0.7,
                generator=torch.Generator().manual_seed(5), output_type="np").images[0])

        same = theirs(0.5)
        difference = (ours[0].permute(1, 2, 0) - same).abs().mean().item()
        assert difference < 1e-3, difference
        # Teeth: one step more (strength 0.75) moves the result far beyond the tolerance.
        assert (theirs(0.75) - same).abs().mean().item() > 1e-2
    finally:
        pipe.scheduler = base_scheduler


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "dpmpp_2m_sde"])
def test_stochastic_scheduler_follows_the_seed(pipeline, tmp_path, scheduler):
    pipe, make_args = pipeline
    base_scheduler = pipe.scheduler
    pipe.scheduler = up.make_scheduler(base_scheduler.config, scheduler)
    try:
        image = Image.open(write_image(tmp_path / "in.png", 16, 12))
        args = make_args("--strength", "0.5", "--num_inference_steps", "4", "--scheduler", scheduler)
        first, second = up.generate(pipe, image, args)[0], up.generate(pipe, image, args)[0]
        other = up.generate(pipe, image, make_args("--strength", "0.5", "--num_inference_steps", "4", "--scheduler",
                                                   scheduler, "--seed", "1"))[0]
    finally:
        pipe.scheduler = base_scheduler
    assert torch.equal(first, second)
    assert (first - other).abs().mean() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# The tiled VAE round trip


def edge_steps(image):
    """(C, H, W) in [0, 1] -> the mean |step| between the two outermost rows and columns on each side (4 values)
    over the mean step between the interior lines (rows and columns separately), in grey levels."""
    rows = image.diff(dim=-2).abs().mean((0, 2)) * 255
    cols = image.diff(dim=-1).abs().mean((0, 1)) * 255
    return [(rows[i] / rows[2:-2].mean()).item() for i in (0, -1)] + [(cols[i] / cols[2:-2].mean()).item()
                                                                        for i in (0, -1)]


def test_tiled_round_trip_has_no_frame_and_no_seam(trained_pipeline):
    """A smooth 40x28 gradient enlarged 4x, encoded and decoded in tiles by the trained base's VAE: its outermost
    rows and columns step like the interior (measured 0.5-2.4 times it; without the margin 14-50 times), and the
    tile borders like the other lines."""
    pipe, make_args = trained_pipeline
    args = make_args("--color_fix", "none")
    image = gradient_image().resize((40, 28))
    condition = up.make_condition(image, (112, 160), "bicubic", "cpu")
    tiles = up.canvas_tiles(112, 160, args)
    assert len(tiles) >= 9
    with torch.no_grad():
        result = up.decode(pipe, up.encode(pipe, condition, tiles, 4), tiles, 4)[0]
    ratios = edge_steps(result)
    assert max(ratios) < 4, ratios
    score = up.seam_score(result, tiles)
    assert abs(score - 1) < 0.25, score


def test_init_image_is_honoured(trained_pipeline, photo):
    """At low strength the result keeps the start image: from the photo's negative it is far nearer the negative
    than the plain run (which starts from the condition) is, and the plain run far nearer the condition."""
    from PIL import ImageOps

    pipe, make_args = trained_pipeline
    image = Image.open(photo).convert("RGB").resize((24, 20))
    args = make_args("--strength", "0.25", "--num_inference_steps", "4")
    negative = ImageOps.invert(image).resize((96, 80))
    plain, condition = up.generate(pipe, image, args)
    started, _ = up.generate(pipe, image, args, negative)
    target = tc.image_to_tensor(negative)[None].float() / 255
    near, far = (started - target).abs().mean().item(), (plain - target).abs().mean().item()
    assert near < 0.5 * far, (near, far)
    near, far = (plain - condition).abs().mean().item(), (started - condition).abs().mean().item()
    assert near < 0.5 * far, (near, far)


def test_non_finite_tile_decode_is_redone_in_float32(pipeline, caplog, monkeypatch):
    """A tile whose decode overflows (injected: NaN from the first decode call) is decoded again, so the image is
    the one a clean decode gives, and the log says how many tiles were redone."""
    pipe, make_args = pipeline
    args = make_args()
    tiles = up.canvas_tiles(80, 96, args)
    latents = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = up.decode(pipe, latents, tiles, 4)
        decode, calls = pipe.vae.decode, []

        def overflowing(z, **kwargs):
            calls.append(z.shape[0])
            sample = decode(z, **kwargs)
            if len(calls) == 1:
                sample[0][1] = float("nan")
            return sample

        monkeypatch.setattr(pipe.vae, "decode", overflowing)
        with caplog.at_level(logging.WARNING):
            redone = up.decode(pipe, latents, tiles, 4)
    assert torch.isfinite(redone).all()
    assert (redone - clean).abs().max() < 1e-4  # one tile decoded alone, not in a batch of 4: rounding apart
    assert f"1 of {len(tiles)} tile(s) decoded to non-finite values" in caplog.text
    assert calls == [4, 1]
