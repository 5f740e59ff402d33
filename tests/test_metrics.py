"""What a user watching the run sees: interval metrics, held-out grids, the condition-use gap and condition PSNR."""

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

import train_controlnet as tc
from conftest import ROOT, assert_ok, run_cli
from test_train import base_args

N, LATENT = 4, 2  # held-out samples, latent side


class ToyVAE:
    """Latents are all zero and drawn without randomness, so the gap's noise is the generator's first draw."""
    config = SimpleNamespace(scaling_factor=1.0)

    def encode(self, pixel_values):
        zeros = torch.zeros(pixel_values.shape[0], 4, LATENT, LATENT)
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator=None: zeros))


def toy_text_encoder(input_ids, return_dict=False):
    return (torch.zeros(input_ids.shape[0], 3, 8),)


def toy_controlnet(noisy, t, encoder_hidden_states, controlnet_cond, return_dict=False):
    """Its one residual is each condition's mean brightness, everywhere."""
    mean = controlnet_cond.float().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    return [], mean.expand(-1, 4, LATENT, LATENT)


def toy_unet(noisy, t, encoder_hidden_states, down_block_additional_residuals, mid_block_additional_residual,
             return_dict=False):
    return (mid_block_additional_residual,)  # predicts the ControlNet's residual: the prediction follows the condition


def test_condition_use_gap_is_its_definition_on_a_toy_model():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    pixels = torch.tensor([25, 100, 180, 255], dtype=torch.uint8)  # held-out batches are uint8, like training's
    levels = pixels.float() / 255
    holdout = {
        "pixel_values": torch.zeros(N, 3, 8, 8, dtype=torch.uint8),
        "conditioning_pixel_values": pixels.view(N, 1, 1, 1).expand(N, 3, 8, 8).clone(),
        "input_ids": torch.zeros(N, 3, dtype=torch.long),
    }
    models = (ToyVAE(), toy_unet, toy_controlnet)
    args = SimpleNamespace(resolution=8, interpolation="bicubic")  # conditions already at 8 px: enlarging is a no-op
    def gap_losses(models):
        pixel_values, conditions = tc.model_inputs(holdout, args, torch.device("cpu"))
        prompt = (toy_text_encoder(holdout["input_ids"])[0], None)
        losses = tc.holdout_losses(models, scheduler, pixel_values, prompt,
                                   {"true": conditions, "rolled": conditions.roll(1, dims=0)}, torch.float32,
                                   torch.device("cpu"), seed=7)
        return losses["true"], losses["rolled"]

    true_loss, rolled_loss = gap_losses(models)

    # By hand: target = noise (the generator's first draw), prediction = the mean of the condition used.
    reps = tc.HOLDOUT_REPEATS
    noise = torch.randn((N * reps, 4, LATENT, LATENT), generator=torch.Generator().manual_seed(7))
    expected = {
        "true": ((levels.repeat(reps).view(-1, 1, 1, 1) - noise) ** 2).mean().item(),
        "rolled": ((levels.roll(1).repeat(reps).view(-1, 1, 1, 1) - noise) ** 2).mean().item(),
    }
    assert abs(true_loss - expected["true"]) < 1e-6 and abs(rolled_loss - expected["rolled"]) < 1e-6
    assert rolled_loss - true_loss != 0

    # A ControlNet that ignores its condition has a gap of exactly zero: same latents, noise and timesteps.
    blind = lambda noisy, t, encoder_hidden_states, controlnet_cond, return_dict=False: ([], torch.full((N * reps, 4, LATENT, LATENT), 0.5))
    t, r = gap_losses((ToyVAE(), toy_unet, blind))
    assert t == r


def test_psnr_identical_is_capped_unrelated_is_low():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert tc.psnr(a, a) == 100.0
    assert tc.psnr(a, b) < 10
    slightly = Image.fromarray(np.clip(np.asarray(a, np.int16) + 2, 0, 255).astype(np.uint8))
    assert 40 < tc.psnr(a, slightly) < 100


def scalars(output_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in glob.glob(os.path.join(output_dir, "logs", "*", "events.out.tfevents.*")):
        acc = EventAccumulator(events)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_run_logs_metrics_to_tensorboard_and_jsonl_and_plots(tiny_model, shards, tmp_path):
    out = str(tmp_path / "out")
    proc = run_cli(base_args(tiny_model, shards, out, max_train_steps=6, logging_steps=2, validation_steps=3,
                             num_holdout_samples=4, dataloader_num_workers=1, checkpointing_steps=100)
                   + ["--save_sample_keys"], cwd=tmp_path)
    assert_ok(proc)
    assert "held-out at step 3:" in proc.log and "condition-use gap" in proc.log

    tb = scalars(out)
    for tag in ("loss", "lr", "grad_norm", "images_per_s", "step_time_s", "data_wait_share", "data/samples_read",
                "holdout/condition_gap", "holdout/condition_psnr", "holdout/condition_psnr_rolled"):
        assert tag in tb, (tag, sorted(tb))
    assert [s for s, _ in tb["loss"]] == [2, 4, 6]
    assert [s for s, _ in tb["holdout/condition_gap"]] == [0, 3, 6]  # baseline, validation, final

    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for r in train_rows:
        assert 0 < r["loss"] < 10 and r["grad_norm"] > 0 and r["images_per_s"] > 0 and r["step_time_s"] > 0
        assert 0 <= r["data_wait_share"] <= 1
    assert [r["data/samples_read"] for r in train_rows] == [4, 8, 12]  # batch 2 x 2 steps per interval, no skips
    holdout_rows = [r for r in rows if "holdout/condition_gap" in r]
    assert holdout_rows[0]["step"] == 0 and holdout_rows[0]["holdout/condition_gap"] == 0.0  # zero-initialised
    for r in holdout_rows:
        assert abs(r["holdout/condition_gap"] - (r["holdout/loss_rolled_condition"] - r["holdout/loss"])) < 1e-9
        assert 0 < r["holdout/condition_psnr"] < 100

    # Grids: condition | output | ground truth, one row per held-out sample.
    grid = Image.open(os.path.join(out, "validation", "holdout-step-000003.png"))
    assert grid.size == (3 * 64, 4 * 64)
    # Held-out samples were never trained on.
    trained = {l.split()[2] for l in open(os.path.join(out, "sample_keys", "rank-0.txt"))}
    first = tc.wds.shardlists.expand_urls(shards)[0]
    held = [s["__key__"] for s, _ in zip(tc.wds.tarfile_samples([{"url": first}]), range(4))]
    assert trained.isdisjoint(held)

    plot = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), out], capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr
    assert Image.open(os.path.join(out, "metrics.png")).size[0] > 500
