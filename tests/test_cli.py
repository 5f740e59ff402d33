"""The command line surface: --help covers the reference command, bad input fails fast with one clear line."""

import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT


def reference_flags():
    """Flags of the reference command as written in the README."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("accelerate launch --multi_gpu train_controlnet.py", 1)[1].split("```", 1)[0]
    return sorted(set(re.findall(r"(--[a-z0-9_]+)", block)))


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "train_controlnet.py"), *args], capture_output=True, text=True)


def test_help_lists_every_reference_flag():
    flags = reference_flags()
    assert len(flags) == 24, flags  # the reference command as the README gives it
    proc = run_script("--help")
    assert proc.returncode == 0
    missing = [f for f in flags if f not in proc.stdout]
    assert not missing, missing


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--train_shards_path_or_url is required"),
        (["--train_shards_path_or_url=/nonexistent/{000..003}.tar"], "no shard of --train_shards_path_or_url exists: /nonexistent/{000..003}.tar"),
        (["--resolution=100"], "--resolution must be divisible by 8"),
        (["--condition_resolution=512"], "--condition_resolution must be in"),
        (["--validation_prompt", "x"], "--validation_prompt and --validation_image must be given together"),
        (["--validation_prompt", "x", "--validation_image", "/nope.png"], "--validation_image not found: /nope.png"),
        (["--proportion_empty_prompts=1.5"], "--proportion_empty_prompts must be in the range [0, 1]"),
        (["--report_to=wandb", "--hub_token=hf_secret"], "--hub_token cannot be used with --report_to=wandb"),
        (["--resume_from_checkpoint=/nope/checkpoint-7"], "--resume_from_checkpoint: no checkpoint-N directory at /nope/checkpoint-7"),
        (["--mixed_precision=fp16"], "--mixed_precision=fp16 needs a CUDA GPU"),
        (["--condition_scales", "4", "0.5"], "--condition_scales: 0.5 is below 1"),
        (["--condition_scales", "600"], "--condition_scales: 600 reduces --resolution=256 to less than 1 pixel"),
        (["--condition_degradation=jpeg"], "argument --condition_degradation: invalid choice: 'jpeg'"),
        (["--no_degradation_prob=1.5"], "--no_degradation_prob must be in the range [0, 1]"),
        (["--condition_degradation=realesrgan", "--interpolation=lanczos"],
         "--condition_degradation=realesrgan makes conditions on the training device"),
    ],
)
def test_bad_input_is_one_clear_line_before_any_model_loads(shards, tmp_path, extra, message):
    if "--mixed_precision=fp16" in extra and __import__("torch").cuda.is_available():
        pytest.skip("fp16 is valid where CUDA is present")
    base = [f"--output_dir={tmp_path}", "--max_train_steps=1", "--pretrained_model_name_or_path=/no/model/here"]
    if not any(a.startswith("--train_shards_path_or_url") for a in extra) and extra != []:
        base.append(f"--train_shards_path_or_url={shards}")
    start = time.time()
    proc = run_script(*base, *extra)
    assert proc.returncode == 2, proc.stderr
    error_lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - start < 20  # argparse only: no model, no accelerate state


def test_models_and_output_dir_are_checked_before_anything_loads(tiny_model, shards, tmp_path):
    """Each: exit 2, one error line naming the problem, no traceback, in seconds (no model is loaded)."""
    import json

    unet = json.loads((ROOT / tiny_model / "unet" / "config.json").read_text())
    wrong = tmp_path / "controlnet-of-another-base"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({**unet, "_class_name": "ControlNetModel",
                                                   "cross_attention_dim": unet["cross_attention_dim"] * 2}))
    (tmp_path / "a-file").write_text("")
    cases = [
        ([f"--pretrained_model_name_or_path={tmp_path}/typo"], f"model not found: {tmp_path}/typo (no such folder)"),
        ([f"--pretrained_model_name_or_path={shards.rsplit('/', 1)[0]}"], "(no unet/config.json in it)"),
        (["--pretrained_model_name_or_path=lambdalabs/miniSD-diffusers"],
         "model not found: lambdalabs/miniSD-diffusers/unet is not in the local hub cache and HF_HUB_OFFLINE is set"),
        (["--pretrained_model_name_or_path=not a repo!"], "model not found: not a repo! is neither a local folder nor a valid hub id"),
        ([f"--pretrained_model_name_or_path={tiny_model}", f"--controlnet_model_name_or_path={wrong}"],
         f"does not fit the base {tiny_model}: cross_attention_dim is {unet['cross_attention_dim'] * 2} in the ControlNet"),
        ([f"--pretrained_model_name_or_path={tiny_model}", f"--output_dir={tmp_path}/a-file/out"],
         f"--output_dir {tmp_path}/a-file/out: Not a directory"),
    ]
    for extra, message in cases:
        start = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "train_controlnet.py"), f"--output_dir={tmp_path}/out",
                               "--max_train_steps=1", f"--train_shards_path_or_url={shards}", *extra],
                              capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 2, proc.stderr
        error_lines = [l for l in proc.stderr.splitlines() if "error:" in l]
        assert len(error_lines) == 1 and message in error_lines[0], (message, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert time.time() - start < 20
