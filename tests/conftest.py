"""Shared fixtures: a tiny random SD-1.x pipeline folder, real-photo shards, and a runner for the real CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from make_tiny_pipeline import save_pipeline

    path = tmp_path_factory.mktemp("tiny-sd") / "model"
    save_pipeline(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """5 shards x 12 samples: an odd count, so shards never divide evenly between ranks and workers."""
    from make_shards import write_shards

    path = tmp_path_factory.mktemp("shards")
    files = write_shards(str(path), num_shards=5, samples_per_shard=12, seed=0)
    assert len(files) == 5
    return str(path / "{00000..00004}.tar")


def run_cli(args, cwd, num_processes=1, env=None, timeout=300, launch_args=(), preexec_fn=None):
    """Run train_controlnet.py through `accelerate launch` exactly as a user would; return the finished process."""
    launch = [ACCELERATE, "launch", "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
    launch += ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else ["--num_processes", "1"]
    launch += list(launch_args)
    full_env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        launch + [str(ROOT / "train_controlnet.py")] + [str(a) for a in args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn,
    )
    proc.log = proc.stdout + proc.stderr
    return proc


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.log[-6000:]}"
