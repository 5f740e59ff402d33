"""Shared fixtures: a tiny random SD-1.x pipeline folder, real-photo shards, and a runner for the real CLI."""

import os
import subprocess
import sys
from pathlib import Path

# One thread per process: the suite runs on two pytest-xdist workers (see pytest.ini), each of which may start training
# processes of its own; on a 2-core machine more threads than cores only spin against each other. Set before torch is
# imported anywhere, and inherited by every subprocess a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


# Files whose tests train through the CLI, several runs each, longest first: collected before the rest, so that both
# xdist workers start on long tests and the short ones fill in at the end (no worker left idling behind the other's
# last long run). The learning runs are the longest of all.
LONG_RUNNING = ("test_learning.py", "test_sdxl.py", "test_elastic_resume.py", "test_resume.py", "test_train.py",
                "test_reliability.py", "test_stalls.py", "test_stall_ranks.py", "test_checkpoint_integrity.py",
                "test_preemption.py")


def pytest_collection_modifyitems(items):
    def weight(item):
        rank = LONG_RUNNING.index(item.path.name) if item.path.name in LONG_RUNNING else len(LONG_RUNNING)
        return rank, "learn" not in item.name  # a stable sort: the rest keeps its order

    items.sort(key=weight)


def launch_command(num_processes=1, launch_args=()):
    """`accelerate launch` as the tests run it: CPU-friendly defaults, and for several ranks a free rendezvous port
    (port 0: accelerate picks one), so that two multi-rank tests on two workers never meet on the default 29500."""
    launch = [ACCELERATE, "launch", "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
    if num_processes > 1:
        launch += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", "0"]
    else:
        launch += ["--num_processes", "1"]
    return launch + list(launch_args)


def built_once(tmp_path_factory, name, build):
    """A folder made by `build(path)` once for the whole run and shared by its xdist workers (under a lock; without
    xdist, in this run's own temporary folder)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    path = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.done").exists():
            build(path)
            (root / f"{name}.done").touch()
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from make_tiny_pipeline import save_pipeline

    return str(built_once(tmp_path_factory, "tiny-sd", lambda path: save_pipeline(str(path), seed=0)))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from make_tiny_pipeline import save_pipeline

    return str(built_once(tmp_path_factory, "tiny-sdxl", lambda path: save_pipeline(str(path), family="sdxl")))


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    from make_tiny_pipeline import save_pipeline

    return str(built_once(tmp_path_factory, "tiny-sd2", lambda path: save_pipeline(str(path), family="sd2")))


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """5 shards x 12 samples: an odd count, so shards never divide evenly between ranks and workers."""
    from make_shards import write_shards

    def build(path):
        files = write_shards(str(path), num_shards=5, samples_per_shard=12, seed=0)
        assert len(files) == 5

    return str(built_once(tmp_path_factory, "shards", build) / "{00000..00004}.tar")


@pytest.fixture(scope="session")
def two_step_run(tiny_model, shards, tmp_path_factory):
    """The output folder of a finished 2-step run with checkpoint-2, made once: tests that resume from it copy it."""
    from test_train import base_args

    def build(path):
        assert_ok(run_cli(base_args(tiny_model, shards, str(path), max_train_steps=2, checkpointing_steps=2,
                                    num_holdout_samples=0), cwd=path.parent))

    return built_once(tmp_path_factory, "two-step-run", build)


def module_at(commit, filename):
    """The project's `filename` as of `commit` (benchmarks/common.module_at), imported from git as a module of its
    own; the test is skipped, saying why, where this checkout's history lacks the commit."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import module_at as load

    try:
        return load(commit, filename)
    except (OSError, subprocess.CalledProcessError) as exn:
        pytest.skip(f"{filename} of {commit} is not in this checkout's git history ({exn})")


def run_cli(args, cwd, num_processes=1, env=None, timeout=300, launch_args=(), preexec_fn=None):
    """Run train_controlnet.py through `accelerate launch` exactly as a user would; return the finished process."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        launch_command(num_processes, launch_args) + [str(ROOT / "train_controlnet.py")] + [str(a) for a in args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn,
    )
    proc.log = proc.stdout + proc.stderr
    return proc


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.log[-6000:]}"
