"""Nothing trained is lost on a cluster: divergence, a full disk, a rank that dies."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time

import psutil
import torch

import train_controlnet as tc
from conftest import ACCELERATE, ROOT, assert_ok, run_cli
from test_resume import wait_for, weights
from test_train import base_args, checkpoints


def finite(path):
    return all(torch.isfinite(t).all() for t in weights(path).values())


def test_divergence_changes_no_weight_and_stops_naming_the_good_checkpoint(tiny_model, shards, tmp_path):
    """lr 1e4: the first step blows the weights up, every later loss is NaN. The NaN steps are skipped, counted,
    never saved, never prune a good checkpoint, and the run stops with one error line."""
    out = tmp_path / "out"
    proc = run_cli(base_args(tiny_model, shards, str(out), learning_rate=1e4, max_train_steps=60, checkpointing_steps=2,
                             checkpoints_total_limit=2, max_nonfinite_steps=5, num_holdout_samples=0), cwd=tmp_path)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: training diverged")]
    assert len(errors) == 1, proc.log[-3000:]
    assert f"the newest complete checkpoint is {out}/checkpoint-2" in errors[0]
    assert "5 optimisation steps in a row" in errors[0]
    assert checkpoints(out) == ["checkpoint-2"] and finite(out / "checkpoint-2" / "controlnet")
    assert not (out / "diffusion_pytorch_model.safetensors").exists()  # no final model of diverged weights
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/nonfinite_steps"] == 5 and rows[-1]["step"] == 7
    assert proc.log.count("non-finite loss or gradient norm; step skipped") == 5


def test_non_finite_steps_change_no_weight(tiny_model, shards, tmp_path):
    """The same blow-up, ending before the streak limit: steps 3-6 are skipped, so the final model is exactly the
    step-2 checkpoint's weights (finite); the checkpoints due mid-streak wait. With torch's fused AdamW, whose step
    the guard must skip like any other's."""
    out = tmp_path / "out"
    proc = run_cli(base_args(tiny_model, shards, str(out), learning_rate=1e4, max_train_steps=6, checkpointing_steps=2,
                             num_holdout_samples=0) + ["--use_fused_adam"], cwd=tmp_path)
    assert_ok(proc)
    assert checkpoints(out) == ["checkpoint-2"]
    final, step2 = weights(out), weights(out / "checkpoint-2" / "controlnet")
    assert all(torch.equal(final[k], step2[k]) for k in final) and finite(out)
    assert proc.log.count("non-finite loss or gradient norm; step skipped") == 4


def limit_file_size(size):
    """A write beyond `size` bytes fails (EFBIG), as a write to a full disk fails with ENOSPC."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_failed_write_keeps_earlier_checkpoints_and_stops_with_one_line(tiny_model, shards, two_step_run, tmp_path):
    out = tmp_path / "out"
    common = dict(checkpointing_steps=2, num_holdout_samples=0, resume_from_checkpoint="latest")
    shutil.copytree(two_step_run, out)
    final_before = weights(out)

    # The disk "fills up" while checkpoint-4 is written (the ControlNet alone is 4.4 MB).
    proc = run_cli(base_args(tiny_model, shards, str(out), max_train_steps=4, **common), cwd=tmp_path,
                   preexec_fn=limit_file_size(1 << 20))
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: could not write checkpoint-4")]
    assert len(errors) == 1, proc.log[-3000:]
    assert f"the newest complete checkpoint is {out}/checkpoint-2" in errors[0]
    assert checkpoints(out) == ["checkpoint-2"] and tc.checkpoint_problem(str(out / "checkpoint-2")) is None
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]

    # ... and while the final model is written: the previous final model stays whole.
    proc = run_cli(base_args(tiny_model, shards, str(out), max_train_steps=3, **common), cwd=tmp_path,
                   preexec_fn=limit_file_size(1 << 20))
    assert proc.returncode != 0
    assert [l for l in proc.stderr.splitlines() if l.startswith(f"error: could not write the final model to {out}")]
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert all(torch.equal(final_before[k], v) for k, v in weights(out).items())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_rank_restarts_the_group_which_resumes_and_finishes(tiny_model, shards, tmp_path):
    """The elastic launch of the README: kill -9 of one rank -> torchrun restarts both -> resume from latest -> rc 0.
    (With the default static rendezvous the restarted ranks hang in init_process_group.)"""
    out = tmp_path / "out"
    steps = 40
    args = base_args(tiny_model, shards, str(out), max_train_steps=steps, checkpointing_steps=6, logging_steps=2,
                     num_holdout_samples=0, resume_from_checkpoint="latest", dataloader_num_workers=1)
    # A fresh store for each restart: with torchrun's shared one, a restarted rank can read the dead rank's gloo
    # address, left there by the first attempt, and the restart fails (see README, "Self-healing launches").
    env = {**os.environ, "WANDB_MODE": "offline", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "--max_restarts", "1", "--rdzv_backend", "c10d", "--main_process_ip",
              "127.0.0.1", "--main_process_port", str(free_port())]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(launch + [str(ROOT / "train_controlnet.py"), *args], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: (out / "checkpoint-6").exists(), proc, timeout=240), (tmp_path / "run.log").read_text()[-3000:]
        ranks = [p for p in psutil.Process(proc.pid).children() if "train_controlnet.py" in " ".join(p.cmdline())]
        rank1 = next(p for p in ranks if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGKILL)
        killed_at = time.time()
        assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "run.log").read_text()
    resumed = [l for l in text.splitlines() if "Resuming from checkpoint" in l]
    assert resumed and all(f"{out}/checkpoint-" in l for l in resumed), text[-3000:]
    step = int(resumed[0].rsplit("checkpoint-", 1)[1])
    assert 6 <= step < steps
    assert finite(out) and (out / "diffusion_pytorch_model.safetensors").exists()
    assert time.time() - killed_at < 300
