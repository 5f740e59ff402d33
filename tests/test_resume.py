"""Never lose training: exact resume, kill -9 at any moment, planted bad checkpoints, SIGTERM preemption."""

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors.torch import load_file

import train_controlnet as tc
from conftest import ROOT, assert_ok, launch_command, run_cli
from test_train import base_args, checkpoints, logged_steps


def weights(path):
    return load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))


def sample_keys(output_dir, rank=0):
    with open(os.path.join(output_dir, "sample_keys", f"rank-{rank}.txt")) as f:
        return [line.split() for line in f]


RECIPES = {
    "adamw8bit": ["--use_8bit_adam"],
    # The degradation's draws come from the data's random stream, its noise from the device's generator.
    "adamw, realesrgan conditions at 3 factors": ["--condition_scales", "2", "3.5", "8",
                                                  "--condition_degradation=realesrgan"],
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_is_exact(tiny_model, shards, tmp_path, recipe):
    """8 steps straight == 4 steps, a new process resuming from checkpoint-4, 4 more steps."""
    extra = RECIPES[recipe]
    common = dict(learning_rate=1e-3, checkpointing_steps=4, dataloader_num_workers=0, num_holdout_samples=0,
                  save_sample_keys=None, logging_steps=2)

    def run(out, steps):
        args = base_args(tiny_model, shards, str(out), max_train_steps=steps, resume_from_checkpoint="latest", **common)
        proc = run_cli(args + ["--save_sample_keys"] + extra, cwd=tmp_path)
        assert_ok(proc)
        return proc

    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight, 8)
    run(split, 4)
    resumed = run(split, 8)
    assert "Resuming from checkpoint" in resumed.log and "checkpoint-4" in resumed.log

    a, b = weights(straight), weights(split)
    start = weights(split / "checkpoint-4" / "controlnet")
    # Bit-for-bit on CPU: same data, noise, timesteps, optimizer moments and lr at every step.
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 0  # and the last 4 steps did change the weights
    # The resumed stream went on where it stopped: steps 5-8 saw what the straight run saw, not steps 1-4 again.
    keys_straight, keys_split = sample_keys(straight), sample_keys(split)
    assert keys_split == keys_straight
    assert {k for s, _, k in keys_split if int(s) > 4}.isdisjoint({k for s, _, k in keys_split if int(s) <= 4})


def launch_direct(args, cwd):
    """The trainer as one plain process (no launcher) in its own process group, so that a test can signal all."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    log = open(os.path.join(cwd, "run.log"), "w")
    return subprocess.Popen([sys.executable, str(ROOT / "train_controlnet.py"), *args], cwd=cwd, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def test_kill_9_right_after_and_during_a_checkpoint(tiny_model, shards, tmp_path):
    out = tmp_path / "out"
    args = base_args(tiny_model, shards, str(out), max_train_steps=10000, checkpointing_steps=3,
                     num_holdout_samples=0, resume_from_checkpoint="latest", dataloader_num_workers=1)

    # 1) right after checkpoint-3 is complete
    proc = launch_direct(args, tmp_path)
    assert wait_for(lambda: (out / "checkpoint-3").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tc.checkpoint_problem(str(out / "checkpoint-3")) is None

    # 2) in the middle of a save: kill as soon as a temporary checkpoint folder appears
    proc = launch_direct(args, tmp_path)
    assert wait_for(lambda: any(p.name.endswith(".partial") for p in out.iterdir()), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    complete = checkpoints(out)
    assert complete and all(tc.checkpoint_problem(str(out / c)) is None for c in complete)
    newest = max(int(c.split("-")[1]) for c in complete)

    # The rerun resumes from the newest complete checkpoint, cleans the partial one and finishes.
    proc = run_cli(base_args(tiny_model, shards, str(out), max_train_steps=newest + 2, checkpointing_steps=3,
                             num_holdout_samples=0, resume_from_checkpoint="latest"), cwd=tmp_path)
    assert_ok(proc)
    assert f"Resuming from checkpoint {out}/checkpoint-{newest}" in proc.log
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert (out / "diffusion_pytorch_model.safetensors").exists()


def test_latest_skips_planted_garbage_and_explicit_garbage_is_an_error(tiny_model, shards, two_step_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_step_run, out)
    (out / "checkpoint-999" / "controlnet").mkdir(parents=True)
    (out / "checkpoint-999" / "controlnet" / "config.json").write_text("{garbage")
    (out / "checkpoint-1000").mkdir()  # empty: a partial copy
    (out / "checkpoint-final").mkdir()  # a name upstream's `latest` would crash on
    proc = run_cli(base_args(tiny_model, shards, str(out), max_train_steps=4, checkpointing_steps=100,
                             num_holdout_samples=0, resume_from_checkpoint="latest"), cwd=tmp_path)
    assert_ok(proc)
    assert f"ignoring {out}/checkpoint-1000" in proc.log and f"ignoring {out}/checkpoint-999" in proc.log
    assert f"Resuming from checkpoint {out}/checkpoint-2" in proc.log
    assert logged_steps(str(out)) == [1, 2, 3, 4]

    bad = subprocess.run([sys.executable, str(ROOT / "train_controlnet.py"), *base_args(
        tiny_model, shards, str(out), resume_from_checkpoint=str(out / "checkpoint-999"))], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "--resume_from_checkpoint:" in bad.stderr and "checkpoint-999 is not a usable checkpoint" in bad.stderr


def test_sigterm_stops_cleanly_and_rerun_continues(tiny_model, shards, tmp_path):
    out = tmp_path / "out"
    args = base_args(tiny_model, shards, str(out), max_train_steps=10000, checkpointing_steps=1000,
                     num_holdout_samples=0, logging_steps=2, dataloader_num_workers=2, resume_from_checkpoint="latest")
    proc = launch_direct(args, tmp_path)
    assert wait_for(lambda: (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: every process of the job, dataloader workers included
    assert proc.wait(timeout=60) == 0
    log = (tmp_path / "run.log").read_text()
    assert "SIGTERM received: stopped at step" in log
    stopped = int(log.split("stopped at step ")[1].split()[0])
    assert stopped % 2 == 0 and checkpoints(out) == [f"checkpoint-{stopped}"]
    assert not (out / "diffusion_pytorch_model.safetensors").exists()  # not finished: no final model yet

    proc = run_cli(base_args(tiny_model, shards, str(out), max_train_steps=stopped + 2, num_holdout_samples=0,
                             resume_from_checkpoint="latest"), cwd=tmp_path)
    assert_ok(proc)
    assert f"checkpoint-{stopped}" in proc.log and (out / "diffusion_pytorch_model.safetensors").exists()
    assert logged_steps(str(out))[-2:] == [stopped + 1, stopped + 2]


def test_sigusr1_on_one_rank_stops_both_ranks_at_the_same_step(tiny_model, shards, tmp_path):
    out = tmp_path / "out"
    args = base_args(tiny_model, shards, str(out), max_train_steps=10000, checkpointing_steps=1000,
                     num_holdout_samples=0, logging_steps=2)
    env = {**os.environ, "WANDB_MODE": "offline", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "run.log", "w")
    launcher = subprocess.Popen(
        launch_command(num_processes=2) + [str(ROOT / "train_controlnet.py"), *args],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: (out / "metrics.jsonl").exists(), launcher, timeout=180)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "train_controlnet.py" in " ".join(p.cmdline())]
        rank1 = next(p for p in ranks if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGUSR1)  # only rank 1 knows; rank 0 must stop with it
        assert launcher.wait(timeout=120) == 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    text = (tmp_path / "run.log").read_text()
    stops = [int(l.split("stopped at step ")[1].split()[0]) for l in text.splitlines() if "stopped at step" in l]
    assert len(stops) == 2 and stops[0] == stops[1], stops  # both ranks, same step
    assert "SIGUSR1 received" in text and "a stop signal on another rank received" in text
    assert checkpoints(out) == [f"checkpoint-{stops[0]}"]
    assert tc.checkpoint_problem(str(out / f"checkpoint-{stops[0]}")) is None
    assert os.path.exists(out / f"checkpoint-{stops[0]}" / "random_states_1.pkl")  # each rank's RNG state
