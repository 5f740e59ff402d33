"""Tile pairs and the WebDataset pipeline, in-process."""

import io
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import train_controlnet as tc

RES, COND = 64, 16


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer", use_fast=False)


def first_sample(shard_spec):
    url = tc.wds.shardlists.expand_urls(shard_spec)[0]
    return next(iter(tc.wds.tarfile_samples([{"url": url}])))


def tile_args(**overrides):
    """The argparse namespace the data path reads, as parse_args would make it."""
    return tc.make_parser().parse_args(["--train_shards_path_or_url=pipe:true", "--max_train_steps=1", f"--resolution={RES}",
                          f"--condition_resolution={COND}", *[f"--{k}={v}" for k, v in overrides.items()]])


def pair(sample, tokenizer, proportion_empty_prompts=0.0, interpolation="bicubic", rng=random):
    args = tile_args(proportion_empty_prompts=proportion_empty_prompts, interpolation=interpolation)
    return tc.make_tile_pair(sample, tokenizer, args, rng=rng)


def box_reduce(chw, size):
    """Independent reference: average-pool a CHW array to size x size."""
    c, h, w = chw.shape
    return chw.reshape(c, size, h // size, size, w // size).mean(axis=(2, 4))


def test_tile_pair_shapes_dtypes_ranges(shards, tokenizer):
    out = pair(first_sample(shards), tokenizer)
    # Pairs travel as uint8 and become model inputs on the device.
    assert out["pixel_values"].shape == (3, RES, RES) and out["pixel_values"].dtype == torch.uint8
    assert out["conditioning_pixel_values"].shape == (3, COND, COND)  # enlarged on the device by model_inputs
    assert out["conditioning_pixel_values"].dtype == torch.uint8
    assert out["input_ids"].shape == (tokenizer.model_max_length,) and out["input_ids"].dtype == torch.long
    target, condition = tc.model_inputs(tc.collate_fn([out]), tile_args(), torch.device("cpu"))
    assert target.shape == condition.shape == (1, 3, RES, RES)
    assert target.dtype == condition.dtype == torch.float32
    assert -1.0 <= target.min() and target.max() <= 1.0
    assert target.min() < -0.5 and target.max() > 0.5  # really spans [-1, 1]
    assert 0.0 <= condition.min() and condition.max() <= 1.0 and condition.max() > 0.5
    assert torch.equal(target[0], out["pixel_values"].float() / 127.5 - 1)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos"])
def test_condition_is_target_reduced_and_enlarged(shards, tokenizer, interpolation):
    random.seed(0)
    out = pair(first_sample(shards), tokenizer, interpolation=interpolation)
    target = out["pixel_values"].numpy() / 255
    _, cond = tc.model_inputs(tc.collate_fn([out]), tile_args(interpolation=interpolation), torch.device("cpu"))
    cond = cond[0].numpy()
    # Same low-resolution content (compared coarser than COND, where the filters' own blur no longer matters).
    assert np.abs(box_reduce(cond, COND // 2) - box_reduce(target, COND // 2)).mean() < 0.03
    # The enlarged condition equals the target pushed through the low resolution with PIL's filter, pixel for pixel
    # (the trainer's torch kernels for bilinear/bicubic agree with PIL's within rounding).
    target_img = Image.fromarray((target.transpose(1, 2, 0) * 255).round().astype(np.uint8))
    filt = tc.INTERPOLATIONS[interpolation]
    expected = np.asarray(target_img.resize((COND, COND), filt).resize((RES, RES), filt), dtype=np.float32) / 255
    assert np.abs(expected.transpose(2, 0, 1) - cond).max() <= 3 / 255
    # ...and lost the detail: the target keeps far more pixel-to-pixel variation than the condition.
    detail = lambda a: np.abs(np.diff(a, axis=2)).mean()
    assert detail(target) > 1.5 * detail(cond)


def test_non_square_and_small_images_become_square_pairs(tokenizer):
    rng = np.random.default_rng(0)
    for size in [(300, 97), (40, 90), (64, 64)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
        out = pair({"__key__": "k", "jpg": buf.getvalue(), "txt": b"noise"}, tokenizer)
        assert out["pixel_values"].shape == (3, RES, RES)


def test_transparent_png_composited_on_white(tokenizer):
    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))  # fully transparent black
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    out = pair({"__key__": "k", "jpg": buf.getvalue(), "txt": b"x"}, tokenizer)
    assert out["pixel_values"].min() == 255  # white, not the hidden black


def test_captions_dropped_at_requested_proportion(shards, tokenizer):
    sample = first_sample(shards)
    empty = tokenizer("", max_length=tokenizer.model_max_length, padding="max_length", return_tensors="pt").input_ids[0]
    random.seed(0)
    n = 300
    dropped = sum(torch.equal(pair(sample, tokenizer, 0.3)["input_ids"], empty) for _ in range(n))
    assert abs(dropped / n - 0.3) < 0.07
    assert not torch.equal(pair(sample, tokenizer, 0.0)["input_ids"], empty)


def test_validation_image_reduced_like_training(tmp_path):
    """A validation image larger than the condition resolution ends up at that resolution's detail level."""
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
    path = tmp_path / "v.png"
    big.save(path)
    args = SimpleNamespace(resolution=RES, condition_resolution=COND, interpolation="bicubic")
    cond = tc.validation_condition(str(path), args)
    assert cond.size == (RES, RES)
    filt = tc.INTERPOLATIONS["bicubic"]
    reference = big.resize((RES, RES), filt).resize((COND, COND), filt).resize((RES, RES), filt)
    assert np.abs(np.asarray(cond, np.float32) - np.asarray(reference, np.float32)).max() <= 2


def loader_args(shards, workers, batch_size=4):
    args = tile_args(seed=0, train_batch_size=batch_size, dataloader_num_workers=workers)
    args.train_shards_path_or_url = shards
    return args


def shard_keys(spec):
    """{shard index: set of keys} read straight from the tars."""
    out = {}
    for i, url in enumerate(tc.wds.shardlists.expand_urls(spec)):
        out[i] = {s["__key__"] for s in tc.wds.tarfile_samples([{"url": url}])}
    return out


def test_loader_single_consumer_one_pass_is_every_sample_once(shards, tokenizer):
    per_shard = shard_keys(shards)
    all_keys = set().union(*per_shard.values())
    assert len(all_keys) == 60
    batches = iter(tc.make_train_dataloader(loader_args(shards, workers=0), tokenizer))
    first_pass = [k for _ in range(15) for k in next(batches)["keys"]]
    assert sorted(first_pass) == sorted(all_keys)
    second_pass = [k for _ in range(15) for k in next(batches)["keys"]]  # the stream cycles on, reshuffled
    assert sorted(second_pass) == sorted(all_keys) and second_pass != first_pass


def test_loader_workers_own_disjoint_shards(shards, tokenizer):
    """2 workers over 5 shards: worker 0 owns shards 0, 2, 4 (36 samples), worker 1 shards 1, 3 (24)."""
    per_shard = shard_keys(shards)
    batches = iter(tc.make_train_dataloader(loader_args(shards, workers=2), tokenizer))
    by_worker = {0: [], 1: []}
    for i in range(18):  # torch's loader takes batches from its workers in turn
        by_worker[i % 2] += next(batches)["keys"]
    w0, w1 = by_worker[0][:36], by_worker[1][:24]  # each worker's first pass
    assert sorted(w0) == sorted(per_shard[0] | per_shard[2] | per_shard[4])
    assert sorted(w1) == sorted(per_shard[1] | per_shard[3])
    assert set(by_worker[1][24:]) <= set(w1)  # worker 1 then cycles over its own shards again
    assert next(batches)["pixel_values"].shape == (4, 3, RES, RES)


def test_missing_shard_is_counted_and_named_once_over_many_passes(shards, tokenizer, caplog):
    spec = shards.replace("00004}", "00005}")  # 00005.tar does not exist
    tc.reset_data_stats()
    batches = iter(tc.make_train_dataloader(loader_args(spec, 0), tokenizer))
    keys = [k for _ in range(45) for k in next(batches)["keys"]]  # 3 passes over the 60 samples
    assert len(keys) == 180 and len(set(keys)) == 60
    assert tc.DATA_STATS["missing_shard"] == 1 and tc.DATA_STATS["samples_read"] >= 180
    assert len([r for r in caplog.records if "00005.tar" in r.getMessage()]) == 1  # named once, not once a pass


def test_failed_pipe_command_is_reported_with_its_exit_status(shards, tokenizer, tmp_path, caplog):
    spec = f"{shards}::pipe:cat {tmp_path}/gone.tar"
    tc.reset_data_stats()
    batches = iter(tc.make_train_dataloader(loader_args(spec, 0), tokenizer))
    keys = [k for _ in range(30) for k in next(batches)["keys"]]
    assert len(set(keys)) == 60
    assert tc.DATA_STATS["pipe_error"] == 1 and tc.DATA_STATS["tar_error"] == 0
    assert f"pipe_error: pipe:cat {tmp_path}/gone.tar: command 'cat {tmp_path}/gone.tar' exit status 1" in caplog.text


def test_held_out_samples_are_told_apart_by_shard_across_joined_specs(tmp_path, tokenizer):
    """Two img2dataset outputs joined with '::' have the same keys (both restart at 0): holding out the first one's
    first samples must not drop the second one's samples with the same keys."""
    from make_shards import write_shards

    for name in ("a", "b"):
        write_shards(str(tmp_path / name), num_shards=1, samples_per_shard=12, seed=0)
    spec = f"{tmp_path}/a/00000.tar::{tmp_path}/b/00000.tar"
    args = loader_args(spec, 0)
    args.num_holdout_samples = 4
    holdout = tc.load_holdout(args, tokenizer)
    held_out = set(zip(holdout["urls"], holdout["keys"]))
    assert all(url.endswith("a/00000.tar") for url, _ in held_out)
    batches = iter(tc.make_train_dataloader(args, tokenizer, held_out))
    first_pass = [(u, k) for _ in range(5) for b in [next(batches)] for u, k in zip(b["urls"], b["keys"])]
    assert len(first_pass) == 20 and not held_out & set(first_pass)
    assert sum(u.endswith("b/00000.tar") for u, _ in first_pass) == 12  # all of b, same keys as a's held-out ones
