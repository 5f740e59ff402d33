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
    assert len(flags) == 24, flags  # the reference command as given in DEVELOPERS.md
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
