"""The exact memory table (benchmarks/memory_table.py): the real configs it builds on the meta device have the
published sizes, and its optimizer-state layouts are what the installed optimizers really allocate."""

import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_table  # noqa: E402
from shapes import build  # noqa: E402


def params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sdxl():
    return build("sdxl", device="meta")


def test_real_sdxl_shapes_have_the_published_sizes(sdxl):
    # stabilityai/stable-diffusion-xl-base-1.0: UNet 2.567 B, CLIP ViT-L/14 text 123 M, OpenCLIP bigG text + projection
    # 695 M, the SD VAE 83.7 M; its ControlNets (e.g. diffusers/controlnet-canny-sdxl-1.0, 2.5 GB in fp16) ~1.25 B.
    assert sdxl["unet"].device.type == "meta"
    assert params(sdxl["unet"]) == 2_567_463_684
    assert [params(enc) for enc in sdxl["text_encoders"]] == [123_060_480, 694_659_840]
    assert params(sdxl["vae"]) == 83_653_863
    assert 1.24e9 < params(sdxl["controlnet"]) < 1.26e9
    assert sdxl["controlnet"].config.addition_embed_type == "text_time"


def test_sd1_shapes_have_the_published_sizes():
    sd1 = build("sd1", device="meta")
    # SD 1.5's UNet and the lllyasviel ControlNet 1.1 checkpoints made from it.
    assert params(sd1["unet"]) == 859_520_964 and params(sd1["controlnet"]) == 361_279_120


def test_byte_sums_follow_from_the_parameter_counts(sdxl):
    frozen, trainable, rows = memory_table.memory_rows(sdxl)
    assert trainable == params(sdxl["controlnet"])
    gib = 2**30
    adamw, fused, eight_bit = rows["AdamW (foreach)"], rows["fused AdamW"], rows["8-bit AdamW (bnb)"]
    # Allocator blocks round each tensor up by < 512 bytes: within 1 MiB of the plain products.
    near = lambda got, want: abs(got - want) < 2**20 * 2  # noqa: E731
    assert near(adamw["gradients"], 4 * trainable) and near(adamw["states"], 8 * trainable)
    assert near(adamw["temporaries"], 4 * trainable) and fused["temporaries"] == 0
    frozen_params = params(sdxl["unet"]) + params(sdxl["vae"]) + sum(params(e) for e in sdxl["text_encoders"])
    assert near(adamw["weights"], 2 * frozen_params + 4 * trainable)
    assert 2 * trainable < eight_bit["states"] < 2.04 * trainable  # + fp32 absmax per 256 values, small tensors fp32
    for row in rows.values():
        assert row["resident"] == row["weights"] + row["gradients"] + row["states"]
    # The table's verdict: on 24 GiB only 8-bit Adam leaves room for the activations; everything fits on 80 GiB.
    assert eight_bit["resident"] < 24 * gib < adamw["resident"] < fused["resident"]  # + its on-device step counters
    assert adamw["resident"] + adamw["temporaries"] < 80 * gib
    assert memory_table.card_column(eight_bit, 24).endswith("left") and memory_table.card_column(fused, 24).startswith("NO")


def state_bytes(optimizer):
    """Bytes of the distinct tensors an optimizer holds in its state (shared ones, e.g. bnb's qmaps, once)."""
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def test_optimizer_layouts_match_the_installed_optimizers(monkeypatch):
    """Real optimizers, one step on the CPU, on tensors each side of bitsandbytes' 8-bit threshold (4096 values)
    and of its 256-value blocks; the table's arithmetic without the allocator's rounding must give their bytes."""
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(memory_table, "BLOCK", 1)
    model = torch.nn.ModuleList([torch.nn.Linear(4095, 1), torch.nn.Linear(4096, 1), torch.nn.Linear(4097, 3)])
    sizes = memory_table.param_sizes(model)
    expected = memory_table.optimizer_bytes(sizes)
    optimizers = {
        "AdamW (foreach)": torch.optim.AdamW(model.parameters(), foreach=True),
        "fused AdamW": torch.optim.AdamW(model.parameters(), fused=True),
        "8-bit AdamW (bnb)": bnb.optim.AdamW8bit(model.parameters()),
    }
    for name, optimizer in optimizers.items():
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        states, _ = expected[name]
        # On a CPU the non-fused AdamW keeps its per-tensor step counters beside the states; on CUDA they stay
        # on the host, so the table leaves them out.
        host_steps = 4 * len(sizes) if name == "AdamW (foreach)" else 0
        assert state_bytes(optimizer) == states + host_steps, name
