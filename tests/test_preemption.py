"""Preemption as users launch: stop signals to the launcher, its process group or every process of the job, with two
real ranks and their dataloader workers. Nothing trained is lost and no process outlives the job."""

import os
import signal
import subprocess
import psutil
import pytest

import train_controlnet as tc
from conftest import ROOT, launch_command
from test_resume import wait_for
from test_train import base_args, checkpoints

LAUNCH = launch_command(num_processes=2)
PREEMPTIBLE = str(ROOT / "scripts" / "preemptible.sh")


def start(tiny_model, shards, tmp_path, wrapped):
    out = tmp_path / "out"
    args = base_args(tiny_model, shards, str(out), max_train_steps=10000, checkpointing_steps=1000,
                     num_holdout_samples=0, logging_steps=2, dataloader_num_workers=1, resume_from_checkpoint="latest")
    env = {**os.environ, "WANDB_MODE": "offline", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    command = ([PREEMPTIBLE] if wrapped else []) + LAUNCH + [str(ROOT / "train_controlnet.py"), *args]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    # Training is under way once two logging steps are in; by then both ranks and their workers exist.
    metrics = out / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc, timeout=240), \
        (tmp_path / "run.log").read_text()[-3000:]
    tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    ranks = [p for p in tree if "train_controlnet.py" in " ".join(p.cmdline()) and p.name() != "pt_data_worker"
             and p.environ().get("RANK") in ("0", "1")]
    assert len(ranks) == 2 and len(tree) >= 2 + 2 + 1  # 2 ranks, a dataloader worker each, the launcher
    return proc, tree, out


def finish(proc, tree, out, tmp_path, timeout=150):
    try:
        rc = proc.wait(timeout=timeout)
        # No orphan: every process of the job (launcher, ranks, workers) is gone soon after.
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, f"orphans left: {alive}\n{(tmp_path / 'run.log').read_text()[-3000:]}"
    finally:
        for p in tree:
            if p.is_running():
                p.kill()
    log = (tmp_path / "run.log").read_text()
    stops = [int(l.split("stopped at step ")[1].split()[0]) for l in log.splitlines() if "stopped at step" in l]
    assert len(stops) == 2 and stops[0] == stops[1], log[-4000:]  # both ranks, at the same step
    assert checkpoints(out) == [f"checkpoint-{stops[0]}"] and tc.checkpoint_problem(str(out / checkpoints(out)[0])) is None
    assert os.path.exists(out / f"checkpoint-{stops[0]}" / "random_states_1.pkl")
    return rc, log


def test_stop_signal_to_the_wrapper_saves_and_exits_0(tiny_model, shards, tmp_path):
    proc, tree, out = start(tiny_model, shards, tmp_path, wrapped=True)
    os.kill(proc.pid, signal.SIGTERM)  # e.g. `kill` of the job's script, or `docker stop`
    rc, log = finish(proc, tree, out, tmp_path)
    assert rc == 0, log[-3000:]
    assert "preemptible.sh: SIGTERM received" in log and "SIGTERM received: stopped at step" in log


def test_usr1_to_every_process_of_the_job_saves_and_exits_0(tiny_model, shards, tmp_path):
    """SLURM's `--signal=USR1@120` reaches every process of the step: wrapper, launcher, ranks and workers."""
    proc, tree, out = start(tiny_model, shards, tmp_path, wrapped=True)
    for p in tree:
        p.send_signal(signal.SIGUSR1)
    rc, log = finish(proc, tree, out, tmp_path)
    assert rc == 0, log[-3000:]
    assert "SIGUSR1 received: stopped at step" in log


def test_usr1_to_a_bare_launcher_kills_it_but_the_ranks_save_and_end(tiny_model, shards, tmp_path):
    """Without the wrapper torchrun dies of USR1 (exit 138) and leaves its ranks behind: they notice, save and end."""
    proc, tree, out = start(tiny_model, shards, tmp_path, wrapped=False)
    os.killpg(proc.pid, signal.SIGUSR1)  # the launcher's process group: the ranks have sessions of their own
    rc, log = finish(proc, tree, out, tmp_path)
    assert rc == 128 + signal.SIGUSR1 or rc == -signal.SIGUSR1
    assert "launcher exit received: stopped at step" in log
