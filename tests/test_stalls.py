"""A data source that stops answering: a stalled `pipe:` shard is abandoned after --shard_timeout and training goes
on; a stop signal during a total stall is honoured within a minute (checkpoint, exit 0)."""

import glob
import os
import signal
import tarfile
import time

import psutil

from conftest import assert_ok, run_cli
from test_resume import launch_direct
from test_train import base_args, checkpoints, logged_steps

import train_controlnet as tc


def shard_paths(shards):
    return tc.wds.shardlists.expand_urls(shards)


def step_wall_times(output_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = {}
    for events in glob.glob(os.path.join(output_dir, "logs", "*", "events.out.tfevents.*")):
        acc = EventAccumulator(events)
        acc.Reload()
        times.update({e.step: e.wall_time for e in acc.Scalars("loss")})
    return [times[s] for s in sorted(times)]


def stalling_command(tmp_path):
    """A command that never ends, named for this test alone (another test's could still be running)."""
    return f"sleep 3000.{abs(hash(str(tmp_path))) % 10**6}"


def running(command):
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == command.split()]


def test_stalled_pipe_shard_is_abandoned_counted_named_and_training_goes_on(tiny_model, shards, tmp_path):
    s0, s1, s2 = shard_paths(shards)[:3]
    probe = tmp_path / "sigign"
    # The first command records its own ignored-signal mask; the second stops answering before its tar.
    stall = stalling_command(tmp_path)
    spec = f"pipe:grep SigIgn /proc/$$/status > {probe}; cat {s0}::pipe:{stall}; cat {s1}::pipe:cat {s2}"
    out = str(tmp_path / "out")
    # 24 readable samples a pass, 2 a step: pass 1 meets the stall between steps 12 and 13.
    proc = run_cli(base_args(tiny_model, spec, out, max_train_steps=16, dataloader_num_workers=1,
                             checkpointing_steps=1000, shard_timeout=3), cwd=tmp_path, timeout=240)
    assert_ok(proc)
    assert logged_steps(out) == list(range(1, 17))
    named = [l for l in proc.log.splitlines() if f"stalled_shard: pipe:{stall}" in l]
    assert len(named) == 1 and "no sample for 3 s" in named[0] and "its command killed" in named[0], named
    assert "stalled_shard=1" in proc.log.split("Data summary")[1]  # its own skip reason, once for both passes
    times = step_wall_times(out)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Pass 1's stall sits between two steps (less the batches the worker had ready): the timeout, never more.
    assert 1.5 <= max(gaps) < 3 + 10, gaps
    assert not running(stall)  # killed, not left behind
    # pipe: commands run with the default dispositions of the stop signals (the workers only survive them)
    ignored = int(probe.read_text().split()[1], 16)
    assert not ignored & (1 << (signal.SIGTERM - 1)) and not ignored & (1 << (signal.SIGUSR1 - 1)), hex(ignored)


def test_sigterm_during_a_total_stall_saves_and_exits_0_within_a_minute(tiny_model, tmp_path):
    from make_shards import write_shards

    big = write_shards(str(tmp_path / "big"), num_shards=1, samples_per_shard=150, seed=1)[0]
    cut = tmp_path / "cut.tar"  # the first 140 samples: the shuffle buffer then gives 20 before it needs more
    with open(big, "rb") as f:
        members = [m for m in tarfile.open(fileobj=f) if m.isfile()]
    per_sample = len(members) // 150
    with open(big, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(members[140 * per_sample].offset))
    out = tmp_path / "out"
    stall = stalling_command(tmp_path)
    args = base_args(tiny_model, f"pipe:cat {cut}; {stall}", str(out), max_train_steps=1000, logging_steps=1,
                     checkpointing_steps=1000, dataloader_num_workers=1, resume_from_checkpoint="latest")
    proc = launch_direct(args, tmp_path)
    try:
        metrics = out / "metrics.jsonl"
        lines, since = 0, time.time()
        while time.time() - since < 4:  # steps, then none for 4 s: every consumer is stalled
            assert proc.poll() is None and time.time() - since < 180, (tmp_path / "run.log").read_text()[-3000:]
            now = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            lines, since = (now, time.time()) if now != lines or not now else (lines, since)
            time.sleep(0.2)
        stopped_at = time.time()
        os.kill(proc.pid, signal.SIGTERM)  # the trainer only, as a scheduler or launcher does: the stall stays
        assert proc.wait(timeout=60) == 0
        took = time.time() - stopped_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "run.log").read_text()
    assert f"SIGTERM received while waiting for data from stalled shards: stopped at step {lines}" in log, log[-3000:]
    assert checkpoints(out) == [f"checkpoint-{lines}"] and tc.checkpoint_problem(str(out / f"checkpoint-{lines}")) is None
    assert took < 60 and not running(stall)
    print(f"stopped {took:.1f} s after SIGTERM, at step {lines}")
