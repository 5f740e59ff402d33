"""A resume on other ranks x workers deals the rest of the pass to the new consumers: nothing trained twice in a
pass, nothing skipped (samples that sat in shuffle buffers included); the same ranks x workers stay exact."""

import json
import os
from collections import defaultdict

import pytest

import train_controlnet as tc
from conftest import assert_ok, run_cli
from test_sharding import consumed
from test_train import base_args


def all_ids(urls):
    return {url: [tc.sample_id(s) for s in tc.wds.tarfile_samples([{"url": url}])] for url in urls}


def take(stream, n, state):
    """n raw samples of a consumer's stream, as batches of 1 would carry them, and its per-shard state after them."""
    ids = []
    for _ in range(n):
        ids.append(tc.sample_id(next(stream)))
        state.update(tc.PassLedger.current.take_changes())
    return ids


def consumer(monkeypatch, urls, rank, world, resume=None):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    tc.reset_data_stats()
    return tc.consumer_samples(urls, 0, frozenset(), resume)


def saved(state, urls):
    """Through the checkpoint's JSON, as resume_data reads it."""
    return tc.expand_shards(json.loads(json.dumps(tc.compact_shards(state))), urls)


def test_two_consumers_to_three_deal_the_rest_of_the_pass(shards, monkeypatch):
    """Shuffle buffers smaller than a shard: at the checkpoint, shards are partly read and samples sit in buffers."""
    monkeypatch.setattr(tc, "SHUFFLE_BUFFER", 6)
    urls = tc.wds.shardlists.expand_urls(shards)
    ids = all_ids(urls)
    state, trained = {u: tc.FRESH for u in urls}, []
    for rank, n in ((0, 9), (1, 7)):  # 2 consumers, each some way into its part
        trained += take(consumer(monkeypatch, urls, rank, 2), n, state)
    plan = saved(state, urls)
    assert any(e[1] and not e[2] for e in plan.values()), plan  # a shard read part of the way
    assert any(e[3] for e in plan.values()), plan  # samples that were in a buffer, not trained
    assert len(set(trained)) == len(trained) == 16

    for rank in range(3):  # each new consumer's first pass is exactly what its shards still owed
        owed = {i for u in urls[rank::3] for i in ids[u]} - set(trained)
        got = take(consumer(monkeypatch, urls, rank, 3, {"plan": plan}), len(owed), {})
        assert len(got) == len(set(got)) and set(got) == owed, rank

    # The same consumers resuming a stream that began from a plan replay it exactly (skip, then the same samples).
    straight = take(consumer(monkeypatch, urls, 1, 3, {"plan": plan}), 20, {})
    resumed = take(consumer(monkeypatch, urls, 1, 3, {"plan": plan, "positions": [0, 5, 0]}), 15, {})
    assert resumed == straight[5:]


def keys_by_consumer(rows, after=0, until=None):
    out = defaultdict(list)
    for step, c, key in rows:
        if step > after and (until is None or step <= until):
            out[c].append(key)
    return out


def assert_first_pass_owed(rows, trained, shard_count, consumers, urls_keys):
    """Each consumer's first samples after the resume are what its shards still owed: none trained before, none twice."""
    owed_total = 0
    for c, keys in keys_by_consumer(rows).items():
        owed = {k for shard in range(c, shard_count, consumers) for k in urls_keys[shard]} - trained
        owed_total += len(owed)
        first = keys[:len(owed)]
        assert len(first) == len(set(first)) and set(first) <= owed, (c, sorted(set(first) - owed))
        if len(keys) >= len(owed):
            assert set(first) == owed, c
    return owed_total


@pytest.fixture
def shard_keys_by_index(shards):
    from test_data import shard_keys

    return shard_keys(shards)


def test_two_ranks_to_one_then_to_three_workers_repeat_nothing(tiny_model, shards, shard_keys_by_index, tmp_path):
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    common = dict(checkpointing_steps=6, logging_steps=6, resume_from_checkpoint="latest")
    a = str(tmp_path / "a")
    # 2 ranks x 1 worker, 6 steps: 24 of the 60 samples trained
    assert_ok(run_cli(base_args(tiny_model, shards, a, max_train_steps=6, dataloader_num_workers=1, **common)
                      + ["--save_sample_keys"], cwd=tmp_path, num_processes=2, env=env))
    before = {k for rows in consumed(a).values() for _, _, k in rows}
    assert len(before) == 24

    # 1 rank x 1 worker: the 36 samples left of the pass, each once, then the next pass
    proc = run_cli(base_args(tiny_model, shards, a, max_train_steps=6 + 18 + 2, dataloader_num_workers=1, **common)
                   + ["--save_sample_keys"], cwd=tmp_path, env=env)
    assert_ok(proc)
    assert "the checkpoint's data state is from 2 consumers (ranks x workers), this run has 1" in proc.log
    rows = [r for r in consumed(a)[0] if r[0] > 6]
    rest = [k for s, _, k in rows if s <= 24]
    assert len(rest) == len(set(rest)) == 36 and before.isdisjoint(rest)  # 0 repeated, 0 skipped
    assert len({k for s, _, k in rows if s > 24} & (before | set(rest))) == 4  # pass 1 has begun

    # 1 rank x 3 workers from the 1 x 1 run's checkpoint-12, a stream that itself began from a dealt-out plan
    c = str(tmp_path / "c")
    proc = run_cli(base_args(tiny_model, shards, c, max_train_steps=12 + 6, dataloader_num_workers=3,
                             checkpointing_steps=100, logging_steps=6,
                             resume_from_checkpoint=os.path.join(a, "checkpoint-12")) + ["--save_sample_keys"],
                   cwd=tmp_path, env=env)
    assert_ok(proc)
    assert "this run has 3" in proc.log
    trained = before | {k for s, _, k in rows if s <= 12}
    assert len(trained) == 36
    owed = assert_first_pass_owed(consumed(c)[0], trained, 5, 3, shard_keys_by_index)
    assert owed == 60 - 36
