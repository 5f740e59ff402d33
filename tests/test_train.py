"""The real command line, end to end, through `accelerate launch` on the tiny offline pipeline."""

import glob
import os
import re

from PIL import Image

from conftest import ROOT, assert_ok, run_cli

VALIDATION = [
    "--validation_image", str(ROOT / "conditioning_image_1.png"), str(ROOT / "conditioning_image_2.jpeg"),
    "--validation_prompt", "a dog sitting on the grass", "home office",
]


def base_args(tiny_model, shards, output_dir, **overrides):
    flags = {
        "pretrained_model_name_or_path": tiny_model, "output_dir": output_dir, "train_shards_path_or_url": shards,
        "resolution": 64, "condition_resolution": 16, "train_batch_size": 2, "learning_rate": 1e-4, "seed": 0,
        "max_train_steps": 4, "report_to": "tensorboard", "mixed_precision": "no", "logging_steps": 1,
        # No held-out batch unless a test is about it (test_metrics, test_learning): its validations at step 0 and at
        # the end generate it three times (clean and two degraded inputs) and would dominate a plumbing test's time.
        "num_holdout_samples": 0,
        **overrides,
    }
    return [f"--{k}={v}" for k, v in flags.items() if v is not None]


def logged_steps(output_dir, tag="loss"):
    """Steps at which `tag` was written to tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted(glob.glob(os.path.join(output_dir, "logs", "*", "events.out.tfevents.*"))):
        acc = EventAccumulator(events)
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return steps


def checkpoints(output_dir):
    return sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-"))


def test_reference_command_flag_set(tiny_model, shards, tmp_path):
    """The reference command's flags with the tiny model: fp16 -> no, xformers and 8-bit Adam on, wandb offline."""
    out = str(tmp_path / "out")
    args = [
        f"--pretrained_model_name_or_path={tiny_model}", f"--output_dir={out}", "--condition_resolution=16",
        "--resolution=64", "--learning_rate=1e-5", "--max_train_steps=4", "--max_train_samples=80000000",
        "--dataloader_num_workers=2", f"--train_shards_path_or_url={shards}", *VALIDATION, "--validation_steps=2",
        "--checkpointing_steps=1", "--checkpoints_total_limit=2", "--train_batch_size=2", "--gradient_checkpointing",
        "--enable_xformers_memory_efficient_attention", "--gradient_accumulation_steps=1", "--use_8bit_adam",
        "--resume_from_checkpoint=latest", "--mixed_precision=no", "--tracker_project_name=controlnet",
        "--report_to=wandb", "--proportion_empty_prompts", "0.05", "--num_validation_images=2",
    ]
    proc = run_cli(args, cwd=tmp_path)
    assert_ok(proc)
    assert "Starting a new training run" in proc.log  # latest with no checkpoint yet
    assert re.search(r"xformers attention unavailable on cpu .*using PyTorch SDPA", proc.log)
    assert "Num Epochs = 1 of 40000000 steps" in proc.log  # 80M samples / batch 2
    # Checkpoints at every step, pruned to the newest two.
    assert checkpoints(out) == ["checkpoint-3", "checkpoint-4"]
    for ckpt in checkpoints(out):
        assert os.path.isfile(os.path.join(out, ckpt, "controlnet", "diffusion_pytorch_model.safetensors"))
        assert os.path.isfile(os.path.join(out, ckpt, "optimizer.bin"))
    # The final ControlNet loads, and its weights moved from the UNet-initialised ones.
    from diffusers import ControlNetModel

    assert os.path.isfile(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "config.json"))
    trained = ControlNetModel.from_pretrained(out)
    assert trained.config.conditioning_channels == 3
    # Validation grids: one row per prompt, condition + 2 samples per row, at 64 px.
    for name in ("step-000002.png", "final-000004.png"):  # the last step validates the saved model only
        grid = Image.open(os.path.join(out, "validation", name))
        assert grid.size == (3 * 64, 2 * 64)
    assert os.path.isfile(os.path.join(out, "README.md")) and "controlnet-tile" in open(os.path.join(out, "README.md")).read()
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))


def test_resume_continues_from_checkpoint_and_stops_at_max_steps(tiny_model, shards, tmp_path):
    out = str(tmp_path / "out")
    assert_ok(run_cli(base_args(tiny_model, shards, out, max_train_steps=3, checkpointing_steps=2), cwd=tmp_path))
    assert checkpoints(out) == ["checkpoint-2"]
    assert logged_steps(out) == [1, 2, 3]

    # Restarted with a larger budget: continues at step 3 from checkpoint-2 and ends at 5.
    proc = run_cli(
        base_args(tiny_model, shards, out, max_train_steps=5, checkpointing_steps=2, resume_from_checkpoint="latest"),
        cwd=tmp_path,
    )
    assert_ok(proc)
    assert re.search(r"Resuming from checkpoint .*checkpoint-2\b", proc.log)
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    assert logged_steps(out) == [1, 2, 3, 3, 4, 5]  # first run 1..3, resumed run 3..5, nothing past 5

    # Resumed once more at the end of the budget: no more steps.
    proc = run_cli(
        base_args(tiny_model, shards, out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"),
        cwd=tmp_path,
    )
    assert_ok(proc)
    assert "no more training steps" in proc.log
    assert logged_steps(out) == [1, 2, 3, 3, 4, 5]


def test_two_ranks_bf16_with_validation(tiny_model, shards, tmp_path):
    """Two real gloo ranks on CPU; bf16 mixed precision; validation on rank 0 while rank 1 waits. (bf16 runs ~50x
    slower than fp32 on CPUs without bf16 instructions: validation here is two images, no held-out batch.)"""
    out = str(tmp_path / "out")
    proc = run_cli(
        base_args(tiny_model, shards, out, max_train_steps=3, checkpointing_steps=3, mixed_precision="bf16",
                  dataloader_num_workers=1, validation_steps=2, num_validation_images=1, num_holdout_samples=0)
        + VALIDATION,
        cwd=tmp_path, num_processes=2, env={"ACCELERATE_USE_CPU": "1"},
    )
    assert_ok(proc)
    assert "Num processes: 2" in proc.log  # really two ranks, not two lone processes
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in proc.log
    assert checkpoints(out) == ["checkpoint-3"]
    assert logged_steps(out) == [1, 2, 3]
    assert os.path.isfile(os.path.join(out, "validation", "step-000002.png"))
    assert os.path.isfile(os.path.join(out, "diffusion_pytorch_model.safetensors"))


def test_gradient_accumulation_counts_optimisation_steps_and_token_stays_secret(tiny_model, shards, tmp_path):
    out = str(tmp_path / "out")
    secret = "hf_DoNotLeakThisToken123"
    proc = run_cli(base_args(tiny_model, shards, out, max_train_steps=2, gradient_accumulation_steps=2,
                             checkpointing_steps=1, lr_scheduler="linear", lr_warmup_steps=0, hub_token=secret),
                   cwd=tmp_path)
    assert_ok(proc)
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    assert logged_steps(out) == [1, 2]
    # The hub token reaches neither the log, nor tensorboard's hparams, nor the model card.
    assert secret not in proc.log
    for path in glob.glob(os.path.join(out, "**", "*"), recursive=True):
        if os.path.isfile(path):
            assert secret.encode() not in open(path, "rb").read(), path
