"""A stop signal during a total stall of several ranks: the ranks agree, through the process group's store, that every
one of them is stalled in the same wait, and save and exit 0 at once; a rank that gets its data in the meantime either
stops with the others or makes all of them go on, never one of each."""

import itertools
import json
import os
import signal
import subprocess
import tarfile
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, launch_command
from test_stalls import running, stalling_command
from test_train import base_args, checkpoints

import train_controlnet as tc


def agreements(world):
    """`world` ranks' agreements over one store."""
    store = dist.HashStore()
    return [tc.StallAgreement(dist.PrefixStore("job", store), world) for _ in range(world)]


def outcome(schedule, world):
    """Play `schedule`, a sequence of (rank, "post" | "data") -> what each rank does: "stop" or "go" (it trained on),
    or None (still stalled, polling). "data": the rank's batch arrives; after a post it asks `resume` first."""
    ranks = agreements(world)
    posted, done = set(), {}
    for rank, event in schedule:
        if event == "post":
            posted.add(rank)
            ranks[rank].post(0)
        elif rank in posted:
            done[rank] = ranks[rank].resume(0)
        else:
            done[rank] = "go"  # it never stalled: it takes its batch into the step
    # A rank still in its wait polls the decision until there is one.
    return [done.get(rank, ranks[rank].decision(0) if rank in posted else None) for rank in range(world)]


def schedules(world):
    """Every interleaving of the ranks' own sequences: post then data, post only (stalled on), data only."""
    own = [("post", "data"), ("post",), ("data",)]
    for choice in itertools.product(own, repeat=world):
        events = [(rank, event) for rank, sequence in enumerate(choice) for event in sequence]
        for order in set(itertools.permutations(events)):
            if all(order.index((r, "post")) < order.index((r, "data")) for r, seq in enumerate(choice) if len(seq) == 2):
                yield order


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_ranks_never_split_between_stop_and_go(world):
    seen = set()
    for schedule in schedules(world):
        decisions = outcome(schedule, world)
        seen.add(tuple(decisions))
        known = {d for d in decisions if d is not None}
        assert len(known) <= 1, (schedule, decisions)  # never one rank in the step while another saves
        everyone_posted = all((r, "post") in schedule for r in range(world))
        if "stop" in known:
            assert everyone_posted and None not in decisions, (schedule, decisions)  # all stop together
        # A total stall decides stop; only a rank that got its data first can make it "go".
        stalled_first = everyone_posted and all(
            (r, "data") not in schedule or schedule.index((r, "data")) > max(schedule.index((q, "post"))
                                                                               for q in range(world))
            for r in range(world))
        assert ("stop" in known) == stalled_first, (schedule, decisions)
    assert ("stop",) * world in seen and (world == 1 or ("go",) * world in seen)


def test_each_wait_is_decided_on_its_own():
    a, b = agreements(2)
    a.post(0)
    assert a.resume(0) == "go" and b.post(0) == "go"  # a partial stall: both go on
    a.post(1)
    assert b.post(1) == "stop" and a.decision(1) == "stop" and a.resume(1) == "stop"  # wait 0's posts do not count
    assert a.decision(2) is None


@pytest.fixture
def stop_requests(monkeypatch):
    """Two ranks' StopRequests in this process, with no grace and a poll that never fires during the test."""
    saved = {sig: signal.getsignal(sig) for sig in (*tc.STOP_SIGNALS, signal.SIGALRM)}
    monkeypatch.setattr(tc, "STOP_GRACE", 0)
    monkeypatch.setattr(tc, "STALL_POLL", 600)
    try:
        requests = [tc.StopRequests() for _ in range(2)]
        for request, agreement in zip(requests, agreements(2)):
            request.agreement, request.received = agreement, ["SIGTERM"]
        yield requests
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_rank_whose_data_comes_after_the_stop_drops_its_batch_and_stops(stop_requests):
    a, b = stop_requests
    trained = []
    with pytest.raises(tc.StopDuringStall):
        with a.waiting():  # no grace: a posts at once, and nothing is decided yet
            with pytest.raises(tc.StopDuringStall, match="SIGTERM"), b.waiting():  # b posts last: stop
                trained.append("b")
            batch = "a's batch, come at last"  # noqa: F841
        trained.append("a")
    assert trained == [] and a.waits == b.waits == 0  # neither took a batch into the step


def test_a_second_stop_signal_during_the_post_does_not_count_the_rank_twice(stop_requests):
    """SLURM signals every process and scripts/preemptible.sh then signals each rank again: the second handler can
    run inside the first one's store call, and must not post this rank's stall again (2 posts of 2 with one rank
    stalled would stop it alone while the other trains)."""
    a, _ = stop_requests
    post = a.agreement.post

    def post_with_a_second_signal_inside(wait):
        a.handler(signal.SIGTERM, None)  # the interpreter runs a handler that arrives meanwhile right here
        return post(wait)

    a.agreement.post = post_with_a_second_signal_inside
    with a.waiting():
        assert a.decided is None  # one of two ranks stalled: nothing decided yet
    assert a.agreement.store.get("0/stalled") == b"1" and a.decided == "go"


def test_a_store_that_fails_after_the_post_ends_the_rank_instead_of_training_on(stop_requests):
    """The post may have counted: going on could leave this rank training while the others save. An error ends it,
    and the launcher ends (or restarts) the group."""
    a, _ = stop_requests

    def failing_post(wait):
        raise RuntimeError("Connection reset by peer")

    a.agreement.post = failing_post
    with pytest.raises(SystemExit, match="could not agree on a stop while waiting for data"), a.waiting():
        pass


def test_a_rank_whose_data_comes_first_makes_every_rank_go_on(stop_requests):
    a, b = stop_requests
    with a.waiting():  # a posts, then its batch comes
        pass
    with b.waiting():  # b's grace runs out after a went on: the stall was not total
        assert b.decided == "go"
    assert a.waits == b.waits == 1


def cut_shard(tmp_path, samples):
    """A tar of `samples` whole samples, without its end: read through `pipe:cat`, it leaves its reader waiting."""
    from make_shards import write_shards

    full = write_shards(str(tmp_path / "full"), num_shards=1, samples_per_shard=samples + 1, seed=1)[0]
    with open(full, "rb") as f:
        members = [m for m in tarfile.open(fileobj=f) if m.isfile()]
    cut = tmp_path / "cut.tar"
    with open(full, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(members[samples * len(members) // (samples + 1)].offset))
    return cut


def test_sigterm_to_the_job_during_a_total_stall_of_two_ranks_saves_and_exits_0_within_a_minute(tiny_model, tmp_path):
    # Each rank's one shard holds 114 samples and then stops answering: the shuffle buffer (100 before it yields,
    # then one per two read) lets out 3 batches of 2 on each rank, which then both wait for the same 4th batch: amid
    # the second optimisation step, which accumulates 2 micro-batches.
    cut = cut_shard(tmp_path, 114)
    stalls = [stalling_command(tmp_path / f"rank{rank}") for rank in range(2)]
    spec = "::".join(f"pipe:cat {cut}; {stall}" for stall in stalls)
    out = tmp_path / "out"
    args = base_args(tiny_model, spec, str(out), max_train_steps=1000, logging_steps=1, checkpointing_steps=1000,
                     dataloader_num_workers=1, resume_from_checkpoint="latest", gradient_accumulation_steps=2)
    env = {**os.environ, "WANDB_MODE": "offline", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}
    command = [str(ROOT / "scripts" / "preemptible.sh"), *launch_command(num_processes=2),
               str(ROOT / "train_controlnet.py"), *args]
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        lines, since = 0, time.time()
        while time.time() - since < 4:  # steps, then none for 4 s: every consumer is stalled
            assert proc.poll() is None and time.time() - since < 240, log.read_text()[-3000:]
            now = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            lines, since = (now, time.time()) if now != lines or not now else (lines, since)
            time.sleep(0.2)
        job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        stopped_at = time.time()
        os.killpg(proc.pid, signal.SIGTERM)  # the job's process group, as a scheduler does; the stalls stay
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
        took = time.time() - stopped_at
        print(f"two ranks stopped {took:.1f} s after SIGTERM, at step {lines}")
        _, alive = psutil.wait_procs(job, timeout=10)
        assert not alive and not any(running(stall) for stall in stalls), f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in psutil.process_iter(["cmdline"]):  # the ranks have sessions of their own
            if p.info["cmdline"] and str(out) in " ".join(p.info["cmdline"]):
                p.kill()
        for p in [p for stall in stalls for p in running(stall)]:
            p.kill()
    text = log.read_text()
    assert "Num processes: 2" in text
    notice = f"SIGTERM received while waiting for data from stalled shards: stopped at step {lines} after saving"
    assert text.count(notice) == 2, text[-4000:]  # both ranks, at the same step
    assert lines == 1 and checkpoints(out) == ["checkpoint-1"]
    saved = out / "checkpoint-1"
    assert tc.checkpoint_problem(str(saved)) is None  # its manifest verifies
    # The unfinished step's micro-batch is in neither the data state nor accelerate's count: a resume reads it again.
    assert json.loads((saved / tc.DATA_STATE).read_text())["samples_read"] == [4, 4]
    assert [torch.load(saved / f"random_states_{r}.pkl", weights_only=False)["step"] for r in range(2)] == [2, 2]
    assert took < 60
