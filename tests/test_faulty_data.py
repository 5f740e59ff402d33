"""Dirty LAION-like data: every usable sample is used, every bad one skipped and counted, nothing crashes."""

import os
import random
import time

import pytest

import train_controlnet as tc
from conftest import assert_ok, run_cli
from test_data import tile_args


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    from make_faulty_shards import write_faulty_shards

    return write_faulty_shards(str(tmp_path_factory.mktemp("faulty")), seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return tc.load_tokenizer(tile_args(pretrained_model_name_or_path=tiny_model))


def one_pass(spec, tokenizer, args):
    """One shuffled pass through the real stages (reading, tile pairs with their skip handler)."""
    urls = tc.wds.shardlists.expand_urls(spec)
    to_pair = tc.partial(tc.make_tile_pair, tokenizer=tokenizer, args=args, rng=random.Random(0))
    return list(tc.wds.map(to_pair, handler=tc.count_skip)(tc.shuffled_pass(urls, random.Random(0))))


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_every_usable_sample_used_every_bad_one_counted(faulty, tokenizer):
    tc.reset_data_stats()
    fds = open_fds()
    start = time.time()
    pairs = one_pass(faulty["spec"], tokenizer, tile_args())
    assert time.time() - start < 20  # the 100 MP bomb is refused from its header, never decoded
    assert sorted(p["key"] for p in pairs) == sorted(faulty["usable_keys"])
    counts = {k: v for k, v in tc.DATA_STATS.items() if k != "samples_read"}
    expected = {**faulty["expected_skip_counts"], "tar_error": faulty["tar_errors"], "missing_shard": faulty["missing_shards"]}
    assert counts == expected
    assert open_fds() <= fds  # every shard's file was closed, the cut one too
    for p in pairs:  # mode conversions: every used sample is a proper RGB tile pair
        assert p["pixel_values"].shape == (3, 64, 64) and p["conditioning_pixel_values"].shape == (3, 16, 16)


def test_transparent_sample_reads_as_white(faulty, tokenizer):
    key = next(k for k, name in faulty["faults"].items() if name == "fully_transparent_png")
    pairs = {p["key"]: p for p in one_pass(faulty["spec"], tokenizer, tile_args())}
    assert pairs[key]["pixel_values"].min() == 255


def test_metadata_filters_count_their_own_reasons(shards, tokenizer):
    tc.reset_data_stats()
    # make_shards' photos are 96-396 px crops of originals of 300-1000+ px, non-square
    pairs = one_pass(shards, tokenizer, tile_args(max_aspect_ratio=1.2, max_pwatermark=0.5))
    assert tc.DATA_STATS["filtered_aspect"] > 0 and pairs
    assert "filtered_watermark" not in tc.DATA_STATS  # the field is absent: unknown means keep
    tc.reset_data_stats()
    assert one_pass(shards, tokenizer, tile_args(min_image_size=100000)) == []
    assert tc.DATA_STATS["filtered_min_size"] == 60


def test_training_on_faulty_shards_completes_and_reports(tiny_model, faulty, tmp_path):
    out = tmp_path / "out"
    proc = run_cli([f"--pretrained_model_name_or_path={tiny_model}", f"--output_dir={out}",
                    f"--train_shards_path_or_url={faulty['spec']}", "--resolution=64", "--condition_resolution=16",
                    "--train_batch_size=4", "--max_train_steps=24", "--dataloader_num_workers=2",
                    "--logging_steps=4", "--checkpointing_steps=100", "--num_holdout_samples=0", "--seed=0",
                    "--report_to=tensorboard"], cwd=tmp_path)
    assert_ok(proc)
    summary = [l for l in proc.log.splitlines() if "Data summary" in l]
    assert len(summary) == 1
    for reason in ("decode_error", "empty_image", "too_small", "too_large", "no_image", "tar_error", "missing_shard"):
        assert f"{reason}=" in summary[0], summary[0]
    assert (out / "diffusion_pytorch_model.safetensors").exists()


def test_spec_without_any_usable_sample_is_one_clear_error(tiny_model, tmp_path):
    for i in range(2):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"not a tar at all" * 100)
    spec = f"{tmp_path}/{{00000..00001}}.tar"
    proc = run_cli([f"--pretrained_model_name_or_path={tiny_model}", f"--output_dir={tmp_path / 'out'}",
                    f"--train_shards_path_or_url={spec}", "--max_train_steps=2"], cwd=tmp_path)
    assert proc.returncode != 0
    assert f"error: no usable sample in --train_shards_path_or_url={spec}" in proc.log
    assert 'train_controlnet.py", line' not in proc.log  # our message, not a traceback of the script
    assert "Loading pipeline components" not in proc.log and "unet" not in proc.log.lower()  # before the models
