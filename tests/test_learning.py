"""Learning, not just plumbing: on the shipped tiny base that has learned to draw, a short ControlNet-tile run
must come to use its condition. This fails the day the conditioning path breaks."""

import json
import os

from conftest import ROOT, assert_ok, run_cli
from test_train import base_args

TRAINED_BASE = str(ROOT / "tools" / "tiny-sd-trained")
STEPS = 300


def test_shipped_base_has_learned_to_draw():
    from make_tiny_pipeline import score

    scores = score(TRAINED_BASE)
    # Shipped: 21.70 dB and 0.145. A random pipeline of the same shape scores ~11.3 dB and ~1.09.
    assert scores["vae_psnr_db"] > 21.0 and scores["unet_loss"] < 0.16, scores


def test_controlnet_follows_its_condition_after_a_short_run(shards, tmp_path):
    out = str(tmp_path / "out")
    proc = run_cli(base_args(TRAINED_BASE, shards, out, max_train_steps=STEPS, train_batch_size=8, learning_rate=1e-3,
                             lr_warmup_steps=0, logging_steps=50, validation_steps=STEPS, checkpointing_steps=1000,
                             num_holdout_samples=16, dataloader_num_workers=1), cwd=tmp_path)
    assert_ok(proc)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    held = [r for r in rows if "holdout/condition_gap" in r][-1]
    # Its noise, measured with two noise seeds on this held-out set, is ~0.01; a ControlNet that never sees its
    # condition scores exactly 0.
    assert held["holdout/condition_gap"] > 0.03, held
    # Outputs resemble their own condition more than another sample's.
    assert held["holdout/condition_psnr"] > held["holdout/condition_psnr_rolled"] + 1.0, held
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]
