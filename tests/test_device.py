"""Device bugs that CPU CI can catch: the training step's device-handling pieces driven on torch's meta device.

On a CPU-only machine every tensor lives on one device, so an operation that mixes host and device tensors (which
dies on CUDA with "Expected all tensors to be on the same device") passes unnoticed. The meta device refuses such
mixes the way CUDA does, and it also refuses every read back to the host (.item(), .tolist(), bool(), .cpu()): a
step that runs on meta has neither a mixed-device operation nor a hidden host sync.
"""

import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train_controlnet as tc

META = torch.device("meta")


class ReducingAccelerator:
    """The two things the meter and the data positions ask of accelerate: where the reduction runs, and the sum over
    ranks (meta tensors hold no values, so the test supplies the sum, by default 1 from each of the 2 ranks)."""

    num_processes, process_index, device = 2, 0, META

    def __init__(self, values=None):
        self.values = values

    def reduce(self, tensor, reduction):
        assert tensor.device == META, f"reduced a {tensor.device} tensor: it would not be on the training device"
        assert reduction == "sum"
        return self.values.clone() if self.values is not None else torch.full(tensor.shape, 2.0, dtype=tensor.dtype)


def test_interval_meter_reduction_stays_on_the_device():
    meter = tc.IntervalMeter(META)
    for finite in (True, False, True):
        meter.add(torch.ones((), device=META))
        meter.end_step(torch.ones((), device=META), finite, scaled=True)
    values = meter.pack({k: 1 for k in tc.STAT_KEYS}, stop_signal=None)
    assert values.device == META and values.dtype == torch.float64
    metrics, stats, stop = meter.collect(ReducingAccelerator(), {k: 1 for k in tc.STAT_KEYS}, None, samples_per_step=8)
    assert set(stats) == set(tc.STAT_KEYS) and stop == "a stop signal on another rank"  # the made-up sum says so


def test_fp16_skipped_steps_are_counted_and_kept_out_of_the_means():
    """The scaler's skipped steps report inf/NaN gradient norms; the interval's means are over the applied steps."""
    meter = tc.IntervalMeter(torch.device("cpu"))
    for loss, norm, finite in ((1.0, 2.0, True), (5.0, math.inf, False), (3.0, 4.0, True), (7.0, math.nan, False)):
        meter.add(torch.tensor(loss))
        meter.end_step(torch.tensor(norm), finite, scaled=True)

    class OneRank(ReducingAccelerator):
        num_processes, device = 1, torch.device("cpu")

        def reduce(self, tensor, reduction):
            return tensor

    metrics, _, _ = meter.collect(OneRank(), {k: 0 for k in tc.STAT_KEYS}, None, samples_per_step=8)
    assert metrics["loss"] == 2.0 and metrics["grad_norm"] == 3.0
    assert metrics["train/skipped_steps"] == 2 and metrics["train/nonfinite_steps"] == 0
    assert metrics["images_per_s"] > 0 and math.isfinite(metrics["step_time_s"])


def test_data_positions_gather_on_the_device():
    class Acc(ReducingAccelerator):
        pass

    progress = tc.DataProgress(Acc(torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=torch.float64)), num_workers=2)
    progress.update({"consumer": 0, "data_stats": {"samples_read": 3}})
    assert progress.positions(Acc(torch.tensor([3.0, 0.0, 5.0, 1.0], dtype=torch.float64))) == [3, 0, 5, 1]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "box", "nearest"])
def test_model_inputs_reach_the_device_without_a_round_trip(interpolation):
    args = tc.make_parser().parse_args(["--resolution=64", "--condition_resolution=16", f"--interpolation={interpolation}"])
    batch = {"pixel_values": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
             "conditioning_pixel_values": torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)}
    target, condition = tc.model_inputs(batch, args, META)
    assert target.device == META and condition.device == META
    assert target.shape == condition.shape == (2, 3, 64, 64)
    assert condition.dtype == target.dtype == torch.float32


RECIPE_ARGS = ["--resolution=64", "--condition_resolution=16", "--condition_scales", "2", "4", "8",
               "--condition_degradation=realesrgan", "--no_degradation_prob=0.25"]


def degraded_batch(seed):
    """A batch as the loader hands it over with RECIPE_ARGS: images 0-2 to degrade on the device at factors 2, 8
    and 4, image 3 kept clean (--no_degradation_prob) with the 16-px condition a worker made on the host."""
    factors = [2.0, 8.0, 4.0, 4.0]
    return {"pixel_values": torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8),
            "conditioning_pixel_values": [None, None, None, torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)],
            "condition_scales": factors,
            "degradation": tc.draw_degradation_groups("realesrgan", factors[:3] + [None], random.Random(seed))}


def test_degraded_conditions_are_made_on_the_device():
    """--condition_degradation's steps (blur, resize, noise, JPEG) and the enlargement, all on meta, with a clean
    condition from the host in the same batch: the draws come from the host, nothing goes back to it."""
    target, condition = tc.model_inputs(degraded_batch(0), tc.make_parser().parse_args(RECIPE_ARGS), META)
    assert condition.device == META and condition.shape == (4, 3, 64, 64) and condition.dtype == torch.float32


class HostToDeviceCopies(TorchDispatchMode):
    """Records every copy of a host tensor to another device and whether it waits (non_blocking=False): on a GPU a
    waiting copy, or one from pageable memory, is a host sync."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu":
            target = kwargs.get("device")
            if target is not None and torch.device(target).type != "cpu":
                self.copies.append((tuple(args[0].shape), kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def test_degraded_conditions_copy_to_the_device_without_waiting():
    """Every host tensor the degradation needs reaches the device in a non-blocking copy of what the loader pinned:
    the draws, the groups' indices and the clean conditions. Its constants are copied once per device, not once per
    step."""
    args = tc.make_parser().parse_args(RECIPE_ARGS)
    tc.model_inputs(degraded_batch(0), args, META)  # the first step copies the constants
    with HostToDeviceCopies() as recorder:
        tc.model_inputs(degraded_batch(1), args, META)
    assert recorder.copies, "no host-to-device copy recorded: the recorder is blind"
    assert (3, 16, 16) in [shape for shape, _ in recorder.copies]  # the clean condition
    waiting = [shape for shape, non_blocking in recorder.copies if not non_blocking]
    assert not waiting, f"blocking host-to-device copies of shapes {waiting}"


def test_training_step_on_the_meta_device(tiny_model):
    """Prompt encoding, the loss, backward, gradient clipping and the meter of one step, all on meta: no host read,
    no host tensor mixed in. (The one host read a step does by design, the non-finite guard's, comes after this.)"""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer", use_fast=False)
    text_encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").to(META)
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae").to(META)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet).to(META)
    unet = unet.to(META)
    scheduler = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    args = tc.make_parser().parse_args(["--resolution=64", "--condition_resolution=16"])
    ids = [tokenizer(c, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids[0] for c in ("a cat", "")]
    batch = {"pixel_values": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
             "conditioning_pixel_values": torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8),
             "input_ids": torch.stack(ids)}

    encode_prompts = tc.PromptEncoder(text_encoder, tokenizer, META)
    meter = tc.IntervalMeter(META)
    pixel_values, conditions = tc.model_inputs(batch, args, META)
    loss = tc.controlnet_loss(vae, unet, controlnet, scheduler, pixel_values, conditions,
                              encode_prompts(batch["input_ids"]), torch.float32).mean()
    loss.backward()
    meter.add(loss)
    grad_norm = torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
    assert grad_norm.device == META and all(p.grad.device == META for p in controlnet.parameters())
    meter.end_step(grad_norm, finite=True, scaled=False)
    meter.collect(ReducingAccelerator(), {k: 0 for k in tc.STAT_KEYS}, "SIGTERM", samples_per_step=2)
