"""Condition recipes: several reduction factors and the degradations of real low-resolution images
(--condition_scales, --condition_degradation), in-process."""

import collections
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

import train_controlnet as tc
from test_data import RES, COND, first_sample, tokenizer  # noqa: F401  (tokenizer is a fixture)

CPU = torch.device("cpu")


def recipe_args(*flags):
    return tc.make_parser().parse_args(["--train_shards_path_or_url=pipe:true", "--max_train_steps=1",
                                        f"--resolution={RES}", f"--condition_resolution={COND}", *flags])


def photo(size=128):
    """A real photograph (scikit-image's astronaut), reduced to size x size: (1, 3, size, size) float in [0, 1]."""
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BICUBIC)
    return tc.image_to_tensor(image)[None].float() / 255


def samples(shards, n):
    urls = tc.wds.shardlists.expand_urls(shards)
    return list(tc.wds.tarfile_samples([{"url": u} for u in urls]))[:n]


def blockiness(images):
    """Mean |step| across the 8x8 block borders over the mean |step| inside the blocks (1: no blocks)."""
    steps = images.diff(dim=-1).abs().mean(dim=(0, 1, 2))
    border = torch.arange(steps.shape[0]) % 8 == 7
    return (steps[border].mean() / steps[~border].mean()).item()


def high_frequency_energy(images, cutoff):
    """Share of the spectral energy above `cutoff` cycles per pixel (either axis), mean removed."""
    grey = images.mean(dim=1)
    power = torch.fft.fft2(grey - grey.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    fy, fx = (torch.fft.fftfreq(n).abs() for n in grey.shape[-2:])
    high = (fy[:, None] > cutoff) | (fx[None, :] > cutoff)
    return (power[..., high].sum() / power.sum()).item()


def test_default_recipe_is_the_plain_reduction_bit_for_bit(shards, tokenizer):
    """Unset, or set to the default single factor with no degradation: the same crops, the same conditions (the target
    reduced to --condition_resolution by --interpolation, enlarged on the device) and the same random stream."""
    raw = samples(shards, 6)
    streams = {}
    for name, flags in {"default": [], "same factor": ["--condition_scales", str(RES / COND)],
                        "none": ["--condition_degradation=none"]}.items():
        args, rng = recipe_args(*flags), random.Random(0)
        pairs = [tc.make_tile_pair(s, tokenizer, args, rng=rng) for s in raw]
        streams[name] = (pairs, rng.random(), args)
    pairs, next_draw, args = streams["default"]
    for p in pairs:  # the default recipe, by its definition
        assert torch.equal(p["conditioning_pixel_values"], tc.resize(p["pixel_values"], COND, "bicubic"))
    batch = tc.collate_fn(pairs)
    _, conditions = tc.model_inputs(batch, args, CPU)
    assert torch.equal(conditions, tc.enlarge_condition(batch["conditioning_pixel_values"], RES, "bicubic"))
    for other_pairs, other_draw, other_args in list(streams.values())[1:]:
        assert other_draw == next_draw
        other = tc.collate_fn(other_pairs)
        assert torch.equal(other["pixel_values"], batch["pixel_values"])
        assert torch.equal(tc.model_inputs(other, other_args, CPU)[1], conditions)
    assert tc.tile_config(args)["condition_scales"] == [RES / COND]
    assert tc.tile_config(args)["condition_degradation"] == "none"


def test_several_factors_are_drawn_from_the_set_and_enlarged_to_the_resolution(shards, tokenizer):
    factors = [2.0, 2.5, 4.0, 8.0]
    args = recipe_args("--condition_scales", *map(str, factors))
    rng = random.Random(0)
    drawn = collections.Counter(tc.draw_condition_scale(args, rng) for _ in range(4000))
    assert set(drawn) == set(factors)
    assert all(abs(n / 4000 - 1 / len(factors)) < 0.03 for n in drawn.values()), drawn  # uniform
    pairs = [tc.make_tile_pair(s, tokenizer, args, rng=random.Random(i)) for i, s in enumerate(samples(shards, 12))]
    sizes = {p["condition_scale"]: p["conditioning_pixel_values"].shape[-1] for p in pairs}
    assert len(sizes) > 1 and all(size == round(RES / f) for f, size in sizes.items()), sizes  # 2.5 -> 26 px
    _, conditions = tc.model_inputs(tc.collate_fn(pairs), args, CPU)
    assert conditions.shape == (12, 3, RES, RES)
    for p, c in zip(pairs, conditions):  # each enlarged from its own size
        alone = tc.enlarge_condition(p["conditioning_pixel_values"][None], RES, "bicubic")[0]
        assert torch.equal(c, alone)
    # Held-out data keeps the clean recipe: the default factor, whatever the training factors.
    held = tc.make_tile_pair(samples(shards, 1)[0], tokenizer, args)
    assert held["conditioning_pixel_values"].shape[-1] == COND


def test_a_factor_of_8_carries_what_an_eighth_of_the_resolution_carries():
    """Reduced to 1/8 of the resolution, the condition is the photo's 1/8-resolution image; at 1/4 it lacks what a
    factor-4 condition has."""
    photo_u8 = (photo(128)[0] * 255).round().byte()

    def fidelity(factor, side):
        small = tc.resize(photo_u8, tc.condition_size(128, factor), "bicubic")
        condition = (tc.enlarge_condition(small[None], 128, "bicubic")[0] * 255).round().byte()
        return tc.psnr(tc.tensor_to_image(tc.resize(condition, side, "bicubic")),
                       tc.tensor_to_image(tc.resize(photo_u8, side, "bicubic")))

    assert tc.condition_size(128, 8) == 16
    assert fidelity(8, 16) > 25  # 29.0 dB (bicubic down, up and down again)
    assert fidelity(8, 32) < fidelity(8, 16) - 6  # 19.6 dB: what 32 px carry is not there
    assert fidelity(8, 32) < fidelity(4, 32) - 6  # 30.9 dB at factor 4


def test_jpeg_is_libjpegs_and_raises_blockiness():
    image = photo(128)
    for quality in (30, 75):
        ours = tc.jpeg(image, torch.tensor([float(quality)]))
        buffer = io.BytesIO()
        tc.tensor_to_image(image[0]).save(buffer, format="JPEG", quality=quality)
        pil = tc.image_to_tensor(Image.open(buffer).convert("RGB"))[None].float() / 255
        # The same compression as PIL's libjpeg (its integer DCT and smoother chroma upsampling aside)...
        assert tc.psnr(tc.tensor_to_image(ours[0]), tc.tensor_to_image(pil[0])) > 35
        # ...and it loses what libjpeg loses, within 1 dB.
        loss_ours = tc.psnr(tc.tensor_to_image(ours[0]), tc.tensor_to_image(image[0]))
        loss_pil = tc.psnr(tc.tensor_to_image(pil[0]), tc.tensor_to_image(image[0]))
        assert abs(loss_ours - loss_pil) < 1.0, (quality, loss_ours, loss_pil)
    # 1.06 for the photo; 1.37, 1.22, 1.09 after quality 30, 60, 95.
    blocks = [blockiness(tc.jpeg(image, torch.tensor([q]))) for q in (30.0, 60.0, 95.0)]
    assert blocks[0] > 1.2 * blockiness(image) and blocks[0] > blocks[1] > blocks[2]


def test_blur_lowers_and_noise_raises_high_frequency_energy():
    image = photo(128)
    kernel = tc.blur_kernel("iso", 13, 2.0, 2.0, 0.0)
    assert torch.isclose(kernel.sum(), torch.tensor(1.0))
    blurred = tc.blur(image, kernel[None])
    noisy = tc.gaussian_noise(image, torch.tensor([20.0]), torch.tensor([False]), torch.Generator().manual_seed(0))
    shot = tc.poisson_noise(image, torch.tensor([2.0]), torch.tensor([False]), torch.Generator().manual_seed(0))
    # Share of the energy above 1/4 cycle per pixel: 0.033 for the photo, 0.050 with Gaussian noise of
    # sigma 20/255, 0.052 with Poisson noise of scale 2.
    before = high_frequency_energy(image, 0.25)
    assert high_frequency_energy(blurred, 0.25) < before / 4
    assert high_frequency_energy(noisy, 0.25) > 1.3 * before
    assert high_frequency_energy(shot, 0.25) > 1.3 * before
    # Grey noise is the same in every channel; colour noise is not.
    grey = tc.gaussian_noise(image, torch.tensor([20.0]), torch.tensor([True]), torch.Generator().manual_seed(0)) - image
    colour = noisy - image
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-6) and not torch.allclose(colour[:, 0], colour[:, 1], atol=1e-6)
    # Kernels: anisotropic ones blur more along their long axis; a sinc kernel rings (negative lobes).
    wide = tc.blur_kernel("aniso", 21, 3.0, 0.5, 0.0)
    assert (wide.sum(0) > 0).sum() > (wide.sum(1) > 1e-3).sum()
    assert tc.sinc_kernel(21, np.pi / 4).min() < 0


@pytest.mark.parametrize("preset", ["mild", "realesrgan"])
def test_presets_are_reproducible_in_range_and_degrade(preset):
    images = photo(128).repeat(6, 1, 1, 1)
    sizes = [32, 64, 32, 16, 64, 32]  # factors 4, 2, 8, in any order within the batch

    def conditions(seed):
        groups = tc.draw_degradation_groups(preset, [128 / s for s in sizes], random.Random(seed))
        return tc.degraded_conditions((images * 255).round().byte(), groups, 128, torch.Generator().manual_seed(seed))

    first, again, other = conditions(0), conditions(0), conditions(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the same seed draws the same degradations
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert all(c.dtype == torch.uint8 and c.shape == (3, s, s) for c, s in zip(first, sizes))
    # Every image was degraded beyond the clean reduction, and differently from its twins at the same size.
    clean = [tc.resize((images[0] * 255).round().byte(), s, "bicubic") for s in sizes]
    assert all(not torch.equal(c, r) for c, r in zip(first, clean))
    assert not torch.equal(first[0], first[2])


def test_mild_is_milder_than_realesrgan():
    images = (photo(128).repeat(8, 1, 1, 1) * 255).round().byte()
    clean = tc.resize(images[0], 32, "bicubic")
    distance = {}
    for preset in ("mild", "realesrgan"):
        psnrs = []
        for seed in range(4):
            groups = tc.draw_degradation_groups(preset, [4.0] * 8, random.Random(seed))
            for c in tc.degraded_conditions(images, groups, 128, torch.Generator().manual_seed(seed)):
                psnrs.append(tc.psnr(tc.tensor_to_image(c), tc.tensor_to_image(clean)))
        distance[preset] = np.mean(psnrs)
    assert distance["mild"] > distance["realesrgan"] + 1.0, distance


def test_degraded_batches_come_from_the_workers_as_draws(shards, tokenizer):
    """The worker makes no condition, only draws; the device makes them, at every factor's size, reproducibly."""
    args = recipe_args("--condition_scales", "2", "4", "8", "--condition_degradation=realesrgan")
    raw = samples(shards, 8)

    def batch(seed):
        rng = random.Random(seed)
        pairs = [tc.make_tile_pair(s, tokenizer, args, rng=rng) for s in raw]
        return next(tc.with_degradation_draws([tc.collate_fn(pairs)], args.condition_degradation, rng))

    def conditions(seed):  # the noise comes from the device's generator: seeded by --seed, saved with checkpoints
        torch.manual_seed(0)
        return tc.model_inputs(batch(seed), args, CPU)[1]

    first = batch(0)
    assert all(c is None for c in first["conditioning_pixel_values"]) and first["degradation"] is not None
    assert conditions(0).shape == (8, 3, RES, RES) and 0 <= conditions(0).min() and conditions(0).max() <= 1
    assert torch.equal(conditions(0), conditions(0))
    assert not torch.equal(conditions(1), conditions(0))
    saved = tc.tile_config(args)
    assert saved["condition_scales"] == [2.0, 4.0, 8.0] and saved["condition_degradation"] == "realesrgan"


def test_a_clean_share_keeps_the_clean_condition_and_degrades_the_rest(shards, tokenizer):
    """--no_degradation_prob: that share of the samples gets the clean condition at its drawn factor, the others are
    degraded on the device, in one batch; 0 leaves the degraded stream exactly as without the flag."""
    raw = samples(shards, 16)

    def loader_batch(*flags):
        args, rng = recipe_args("--condition_scales", "2", "4", "--condition_degradation=realesrgan", *flags), random.Random(0)
        pairs = [tc.make_tile_pair(s, tokenizer, args, rng=rng) for s in raw]
        return args, next(tc.with_degradation_draws([tc.collate_fn(pairs)], args.condition_degradation, rng)), rng.random()

    args, batch, next_draw = loader_batch("--no_degradation_prob=0.5")
    clean = [i for i, c in enumerate(batch["conditioning_pixel_values"]) if c is not None]
    assert 0 < len(clean) < 16, clean  # 8 of 16 with this seed
    for i in clean:  # the clean condition at the drawn factor
        size = tc.condition_size(RES, batch["condition_scales"][i])
        assert torch.equal(batch["conditioning_pixel_values"][i], tc.resize(batch["pixel_values"][i], size, "bicubic"))
    degraded = sorted(i for g in batch["degradation"] for i in g["index"].tolist())
    assert degraded == [i for i in range(16) if i not in clean]
    torch.manual_seed(0)
    _, conditions = tc.model_inputs(batch, args, CPU)
    for i in clean:
        alone = tc.enlarge_condition(batch["conditioning_pixel_values"][i][None], RES, "bicubic")[0]
        assert torch.equal(conditions[i], alone)
    assert tc.tile_config(args)["no_degradation_prob"] == 0.5

    _, everything_clean, _ = loader_batch("--no_degradation_prob=1")
    assert everything_clean["degradation"] is None
    _, default, default_next = loader_batch()
    _, zero, zero_next = loader_batch("--no_degradation_prob=0")
    assert zero_next == default_next and same(zero["degradation"], default["degradation"])


def same(a, b):
    """Whether two nested draws (lists, dicts, tensors, plain values) are equal in every element."""
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_held_out_variants_are_degraded_reductions(shards, tokenizer):
    args = recipe_args()
    targets = torch.stack([tc.make_tile_pair(s, tokenizer, args)["pixel_values"] for s in samples(shards, 4)])
    variants = tc.holdout_variants(targets, args)
    factor, small = variants["jpeg30"]
    assert factor == RES / COND and small.shape == (4, 3, COND, COND) and small.dtype == torch.uint8
    area = torch.stack([tc.resize(t, COND, "box") for t in targets])
    assert not torch.equal(small, area) and (small.float() - area.float()).abs().mean() < 12  # JPEG'd, not replaced
    factor, small = variants["x8"]
    assert factor == 8 and small.shape == (4, 3, RES // 8, RES // 8)
