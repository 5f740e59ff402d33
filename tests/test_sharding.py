"""Sharding across ranks, workers and nodes: disjoint data, no sample missed or repeated within a pass,
the same step count on every rank, reproducible order."""

import os
import socket
import subprocess
from collections import defaultdict


import train_controlnet as tc
from conftest import ACCELERATE, ROOT, assert_ok, run_cli
from test_data import loader_args, shard_keys
from test_train import base_args


def consumed(output_dir):
    """{rank: [(step, consumer, key)]} from --save_sample_keys."""
    out = {}
    for name in sorted(os.listdir(os.path.join(output_dir, "sample_keys"))):
        with open(os.path.join(output_dir, "sample_keys", name)) as f:
            out[int(name.split("-")[1].split(".")[0])] = [(int(s), int(c), k) for s, c, k in (l.split() for l in f)]
    return out


def test_two_ranks_two_workers_read_disjoint_shards_and_miss_nothing(tiny_model, shards, tmp_path):
    """5 shards over 2 ranks x 2 workers: consumer 0 owns shards 0 and 4, consumers 1-3 one shard each."""
    per_shard = shard_keys(shards)
    out = str(tmp_path / "out")
    steps = 24  # consumer 0 needs 12 batches of 2 for its 24 samples; rank 0 alternates consumers 0 and 1
    proc = run_cli(base_args(tiny_model, shards, out, max_train_steps=steps, dataloader_num_workers=2,
                             num_holdout_samples=0, checkpointing_steps=1000, logging_steps=6) + ["--save_sample_keys"],
                   cwd=tmp_path, num_processes=2, env={"ACCELERATE_USE_CPU": "1"})
    assert_ok(proc)
    assert "Num processes: 2" in proc.log
    by_rank = consumed(out)
    assert sorted(by_rank) == [0, 1]
    # Every rank ran exactly the same steps (no rank ran dry while the other waited).
    for rank, rows in by_rank.items():
        assert sorted({s for s, _, _ in rows}) == list(range(1, steps + 1)), rank
    by_consumer = defaultdict(list)
    for rows in by_rank.values():
        for _, consumer, key in rows:
            by_consumer[consumer].append(key)
    owned = {0: per_shard[0] | per_shard[4], 1: per_shard[1], 2: per_shard[2], 3: per_shard[3]}
    assert sorted(by_consumer) == [0, 1, 2, 3]
    for consumer, keys in by_consumer.items():
        first_pass = keys[: len(owned[consumer])]
        assert sorted(first_pass) == sorted(owned[consumer]), consumer  # each of its samples once, none missed
        assert set(keys) <= owned[consumer]  # and nothing of another consumer's, in later passes either
    rank_keys = [{k for _, _, k in rows} for rows in by_rank.values()]
    assert rank_keys[0].isdisjoint(rank_keys[1])


def test_same_seed_same_order_other_seed_other_order(shards, tiny_model):
    def keys(seed):
        args = loader_args(shards, workers=2)
        args.seed, args.pretrained_model_name_or_path = seed, tiny_model
        batches = iter(tc.make_train_dataloader(args, tc.load_tokenizer(args)))
        return [k for _ in range(10) for k in next(batches)["keys"]]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)


def test_two_nodes_complete_and_read_disjoint_data(tiny_model, shards, tmp_path):
    """Two `accelerate launch --num_machines 2` processes on this machine, one rank each, as on two nodes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "out")
    args = base_args(tiny_model, shards, out, max_train_steps=6, dataloader_num_workers=1, num_holdout_samples=0,
                     checkpointing_steps=3) + ["--save_sample_keys"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    nodes = [
        subprocess.Popen(
            [ACCELERATE, "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank",
             str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision",
             "no", "--dynamo_backend", "no", str(ROOT / "train_controlnet.py"), *args],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "Num processes: 2" in logs[0]
    by_rank = consumed(out)
    assert sorted(by_rank) == [0, 1]
    assert {k for _, _, k in by_rank[0]}.isdisjoint({k for _, _, k in by_rank[1]})
    assert os.path.isfile(os.path.join(out, "checkpoint-6", "random_states_1.pkl"))
    assert os.path.isfile(os.path.join(out, "diffusion_pytorch_model.safetensors"))


def test_resampled_shards_draw_with_replacement(shards, tiny_model):
    args = loader_args(shards, workers=0, batch_size=12)
    args.resampled_shards, args.pretrained_model_name_or_path = True, tiny_model
    batches = iter(tc.make_train_dataloader(args, tc.load_tokenizer(args)))
    keys = [k for _ in range(20) for k in next(batches)["keys"]]  # 4 passes of 5 drawn shards
    assert len(keys) == 240
    per_pass = [keys[i:i + 60] for i in range(0, 240, 60)]
    assert any(len(set(p)) < 60 for p in per_pass)  # some shard drawn twice in a pass: samples repeat
