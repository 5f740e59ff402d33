"""The data path's speed work changes no output: the default recipe's tile pairs and batches are, to the last byte,
those of train_controlnet.py as it was before it (loaded from git): targets, conditions, token ids (SD's tokenizer
and SDXL's two), time ids, the draws left in the rng, on real photos at two resolutions and on the image modes LAION
holds."""

import io
import random

import pytest
import torch
from PIL import Image

import train_controlnet as tc
from conftest import ROOT, module_at

BEFORE_SPEED_WORK = "9da47bd"  # the last commit whose data path tokenised through the transformers wrapper


@pytest.fixture(scope="module")
def before():
    """train_controlnet.py of BEFORE_SPEED_WORK, imported from git as a module of its own."""
    return module_at(BEFORE_SPEED_WORK, "train_controlnet.py")


def encoded(image, format, **save):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    return buffer.getvalue()


def other_modes():
    """Raw samples in the modes to_rgb converts (grey and CMYK JPEGs, RGBA and palette PNGs) and a JPEG large
    enough to be drafted at 1/8 or 1/2 scale, with captions empty, long (truncated), non-ASCII and naming special
    tokens."""
    photo = Image.open(ROOT / "conditioning_image_1.png").convert("RGB")
    wide = photo.resize((1100, 700))
    rgba = photo.resize((300, 220)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((300, 220)))
    palette = photo.resize((200, 260)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    images = [
        encoded(photo.resize((330, 250)).convert("L"), "JPEG", quality=90),
        encoded(photo.resize((260, 340)).convert("CMYK"), "JPEG", quality=90),
        encoded(rgba, "PNG"),
        encoded(palette, "PNG", transparency=0),
        encoded(wide, "JPEG", quality=90),
    ]
    captions = ["", "a photo " * 60, "café au lait, déjà vu — 東京", "a <|endoftext|> inside, <|startoftext|>",
                "a wide photo"]
    return [{"__key__": f"mode{i}", "__url__": "modes.tar", "jpg": data, "txt": caption.encode()}
            for i, (data, caption) in enumerate(zip(images, captions))]


def photo_samples(shards, n):
    urls = tc.wds.shardlists.expand_urls(shards)
    return [s for _, s in zip(range(n), tc.wds.tarfile_samples([{"url": u} for u in urls]))]


def recipe_args(model, resolution, condition_resolution):
    """The default recipe (no --condition_scales, no --condition_degradation) as parse_args makes it."""
    return tc.make_parser().parse_args([
        "--train_shards_path_or_url=pipe:true", "--max_train_steps=1", f"--pretrained_model_name_or_path={model}",
        f"--resolution={resolution}", f"--condition_resolution={condition_resolution}",
        "--proportion_empty_prompts=0.3"])


def family_tokenizers(args, family):
    """The tokenizer (SD), or SDXL's two in a list, as the trainer loads them."""
    args.family = family
    return tc.load_tokenizers(args)


def assert_same(ours, theirs, where):
    """Same keys, and each value the same: tensors in values, dtype, shape and layout (strides)."""
    assert ours.keys() == theirs.keys(), where
    for key, value in ours.items():
        if torch.is_tensor(value):
            other = theirs[key]
            assert (value.dtype, value.shape, value.stride()) == (other.dtype, other.shape, other.stride()), where
            assert torch.equal(value, other), (where, key)
        else:
            assert value == theirs[key], (where, key)


@pytest.mark.parametrize("model, resolution, condition_resolution", [
    ("tiny_model", 64, 16), ("tiny_model", 256, 64), ("tiny_sdxl", 64, 16)])
def test_default_recipe_pairs_and_batches_are_the_same_bytes(before, request, shards, model, resolution,
                                                             condition_resolution):
    args = recipe_args(request.getfixturevalue(model), resolution, condition_resolution)
    tokenizer = family_tokenizers(args, "sdxl" if model == "tiny_sdxl" else "sd")
    samples = photo_samples(shards, 12) + other_modes()
    ours_rng, theirs_rng = random.Random(0), random.Random(0)
    ours, theirs = [], []
    for module in (tc, before):  # the process's skip counters, which collate_fn copies into the batch
        module.reset_data_stats()
    for sample in samples:
        for rng, made, module in ((ours_rng, ours, tc), (theirs_rng, theirs, before)):
            made.append(module.make_tile_pair(sample, tokenizer, args, rng=rng))
        assert_same(ours[-1], theirs[-1], sample["__key__"])
        held_out = tc.make_tile_pair(sample, tokenizer, args), before.make_tile_pair(sample, tokenizer, args)
        assert_same(*held_out, f"held-out {sample['__key__']}")
    assert ours_rng.getstate() == theirs_rng.getstate()  # the same draws made: the stream after them is the same
    assert any(p["caption"] == "" for p in ours) and any(p["caption"] for p in ours)
    ours_batch, theirs_batch = tc.collate_fn(ours), before.collate_fn(theirs)
    assert_same(ours_batch, theirs_batch, "batch")
    for ours_inputs, theirs_inputs in zip(tc.model_inputs(ours_batch, args, torch.device("cpu")),
                                          before.model_inputs(theirs_batch, args, torch.device("cpu"))):
        assert torch.equal(ours_inputs, theirs_inputs)
    for each in tokenizer if isinstance(tokenizer, list) else [tokenizer]:  # PromptEncoder's empty ids, a batch's
        for captions in ("", [p["caption"] for p in ours]):
            ours_ids, theirs_ids = tc.token_ids(each, captions), before.token_ids(each, captions)
            assert ours_ids.dtype == theirs_ids.dtype and torch.equal(ours_ids, theirs_ids)
