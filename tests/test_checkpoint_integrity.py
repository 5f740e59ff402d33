"""Checkpoints that prove themselves: a damaged newest checkpoint (a node crash before its data reached the disk)
is skipped with one warning and the run resumes from the next older one; a load that fails anyway falls back too;
upstream's checkpoints, which have no manifest, still load; pruning never removes the checkpoint just written."""

import json
import logging
import os
import shutil

import pytest
import torch

import train_controlnet as tc
from conftest import assert_ok, run_cli
from test_train import base_args, checkpoints


@pytest.fixture(scope="module")
def trained(tiny_model, shards, tmp_path_factory):
    """One 6-step run that writes checkpoint-2, -4 and -6; each test damages its own copy."""
    out = tmp_path_factory.mktemp("integrity") / "out"
    assert_ok(run_cli(base_args(tiny_model, shards, str(out), max_train_steps=6, checkpointing_steps=2),
                      cwd=out.parent))
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return out


def copy_of(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


def cut(path):
    """Keep the first half of a file, as a crash before its tail was written to the disk leaves it."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_every_file_of_a_checkpoint_is_in_its_manifest(trained):
    newest = trained / "checkpoint-6"
    with open(newest / tc.MANIFEST) as f:
        listed = set(json.load(f)["files"])
    assert listed == set(tc.checkpoint_files(str(newest))) - {tc.MANIFEST}
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", tc.DATA_STATE,
            "controlnet/diffusion_pytorch_model.safetensors"} <= listed


def test_each_cut_file_of_the_newest_checkpoint_is_caught(trained, tmp_path, caplog):
    """Every file in turn, the manifest included: `latest` names the damage once and offers checkpoint-4."""
    names = tc.checkpoint_files(str(trained / "checkpoint-6"))
    assert len(names) >= 8
    for name in names:
        out = copy_of(trained, tmp_path / name.replace("/", "_"))
        cut(out / "checkpoint-6" / name)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=tc.logger.name):
            step, path = next(tc.resolve_checkpoint("latest", str(out)))
        assert (step, path) == (4, str(out / "checkpoint-4")), name
        warnings = [r.getMessage() for r in caplog.records if "checkpoint-6" in r.getMessage()]
        assert len(warnings) == 1 and "not a usable checkpoint" in warnings[0], (name, warnings)


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                                  "controlnet/diffusion_pytorch_model.safetensors"])
def test_a_cut_file_of_a_checkpoint_without_manifest_is_caught(trained, tmp_path, name):
    """Upstream's checkpoints have no manifest: the structural checks still see a cut torch or model file (a cut
    random state would otherwise be loaded past by accelerate, and the resume silently not be exact)."""
    out = copy_of(trained, tmp_path)
    os.remove(out / "checkpoint-6" / tc.MANIFEST)
    assert tc.checkpoint_problem(str(out / "checkpoint-6")) is None
    cut(out / "checkpoint-6" / name)
    assert tc.checkpoint_problem(str(out / "checkpoint-6")) is not None


def test_a_flipped_byte_is_caught_by_the_checksum(trained, tmp_path):
    """The flag check reads sizes only (every rank parses the flags); the main process's checksums see the flip, and
    skip the checkpoint for `latest` or stop with one line for an explicit path."""
    from accelerate import Accelerator

    out = copy_of(trained, tmp_path)
    path = out / "checkpoint-6" / "optimizer.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "checksum" in tc.checkpoint_problem(str(out / "checkpoint-6"))
    assert tc.checkpoint_problem(str(out / "checkpoint-6"), checksums=False) is None  # sizes alone cannot see it
    accelerator = Accelerator(cpu=True)
    assert next(tc.agreed_checkpoints(accelerator, "latest", str(out))) == (4, str(out / "checkpoint-4"))
    with pytest.raises(SystemExit, match=r"--resume_from_checkpoint: .*checkpoint-6 is not a usable checkpoint"
                                         r" \(optimizer.bin is damaged \(checksum mismatch\)\)"):
        next(tc.agreed_checkpoints(accelerator, str(out / "checkpoint-6"), str(out)))


def test_resume_skips_a_cut_checkpoint_falls_back_from_a_failed_load_and_prunes_nothing_it_needs(trained, tiny_model,
                                                                                                   shards, tmp_path):
    """checkpoint-6: optimizer.bin cut in half (the issue's case), caught by the manifest. checkpoint-4 and -2 have no
    manifest, as upstream's script writes them; checkpoint-4's optimizer.bin is a whole torch file of the wrong
    content, which no structural check can see, so its load fails. The run, on 2 ranks, loads checkpoint-2 (rc 0),
    writes checkpoint-3 and, with --checkpoints_total_limit=1, keeps it although the damaged checkpoint-6 is newer."""
    out = copy_of(trained, tmp_path)
    cut(out / "checkpoint-6" / "optimizer.bin")
    for name in ("checkpoint-2", "checkpoint-4"):
        os.remove(out / name / tc.MANIFEST)
    torch.save({"state": {}, "param_groups": []}, out / "checkpoint-4" / "optimizer.bin")
    assert tc.checkpoint_problem(str(out / "checkpoint-4")) is None
    proc = run_cli(base_args(tiny_model, shards, str(out), max_train_steps=3, checkpointing_steps=3,
                             checkpoints_total_limit=1, resume_from_checkpoint="latest"), cwd=tmp_path,
                   num_processes=2, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert_ok(proc)
    # Two ranks, one warning: the main process alone verifies (and reads the checksums), and hands both ranks the
    # same checkpoints to try.
    assert proc.log.count(f"ignoring {out}/checkpoint-6") == 1
    assert f"Resuming from checkpoint {out}/checkpoint-6" not in proc.log
    assert f"could not load {out}/checkpoint-4" in proc.log
    assert f"Resuming from checkpoint {out}/checkpoint-2" in proc.log
    assert "Saved the ControlNet to" in proc.log and (out / "diffusion_pytorch_model.safetensors").exists()
    assert checkpoints(out) == ["checkpoint-3", "checkpoint-6"]
    assert tc.checkpoint_problem(str(out / "checkpoint-3")) is None
