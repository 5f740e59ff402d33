"""GPU training throughput and peak memory at the reference settings, SDPA vs xformers attention, in one run.

    python benchmarks/bench_gpu.py [--shape sd1|sdxl] [--batch_size 32 [64 ...]] [--resolution 256] [--steps 10]
        [--warmup 3] [-- TRAINER_FLAGS]

TRAINER_FLAGS (e.g. `-- --channels_last`) are added to the trainer's parsed arguments that the setup follows.

Randomly initialised real shapes (benchmarks/shapes.py; sd1: miniSD, SD-1.x UNet, SD VAE, CLIP-L-shaped text
encoder; sdxl: stabilityai/stable-diffusion-xl-base-1.0's UNet, VAE and two text encoders), set up as the trainer
does with --mixed_precision=fp16 --use_8bit_adam --gradient_checkpointing: frozen modules in fp16 (SDXL's VAE, whose
config says force_upcast, in fp32), ControlNet in fp32 master weights under autocast, bitsandbytes AdamW8bit,
gradient checkpointing in the ControlNet (and for SDXL in the frozen UNet). The timed
step is the trainer's (benchmarks/common.py: project_step) on fixed pinned batches, so data loading is left out.
xformers is measured only where it imports and its kernel runs (train_controlnet.enable_xformers decides).
Then the device's share of --condition_degradation=realesrgan at factors 2-8 (train_controlnet.model_inputs on
batches drawn as the workers draw them), against the step: `degradation_vs_step`.
It first prints the shape's exact memory table (benchmarks/memory_table.py: weights, gradients, optimizer states,
counted on the meta device), on any machine; the timed part then says what only a GPU can (activations, speed).
--shape sdxl times the trainer's SDXL step (both encoders, pooled embeddings, time ids) at 1024 px, batch 1, 2 and 4 by
default; a batch that does not fit prints "out of memory" and the next one is tried.
Without CUDA it prints the table and one line and exits 0.
"""

import argparse
import random
import sys
import time

import torch


def measure(s, batches, steps, warmup):
    """-> (images/s, peak GPU memory in GiB) of the trainer's step."""
    from common import project_step, seconds_per_step

    seconds_per_step(project_step, s, batches, warmup)
    torch.cuda.reset_peak_memory_stats()
    step_s = seconds_per_step(project_step, s, batches, steps)
    return len(batches[0]["pixel_values"]) / step_s, torch.cuda.max_memory_allocated() / 2**30


def degradation_seconds(batch_size, resolution, repeats=10):
    """Seconds per batch of model_inputs with realesrgan conditions at factors 2-8, on the GPU."""
    from common import tc

    args = tc.make_parser().parse_args([f"--resolution={resolution}", "--condition_degradation=realesrgan",
                                        "--condition_scales", "2", "3", "4", "6", "8"])
    rng = random.Random(0)
    batches = []
    for _ in range(4):  # as the loader delivers them: host tensors pinned
        factors = [tc.draw_condition_scale(args, rng) for _ in range(batch_size)]
        batch = {"pixel_values": torch.randint(0, 256, (batch_size, 3, resolution, resolution), dtype=torch.uint8),
                 "conditioning_pixel_values": [None] * batch_size, "condition_scales": factors,
                 "degradation": tc.draw_degradation_groups("realesrgan", factors, rng)}
        batches.append(torch.utils.data._utils.pin_memory.pin_memory(batch))
    device = torch.device("cuda")
    tc.model_inputs(batches[0], args, device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(repeats):
        tc.model_inputs(batches[i % len(batches)], args, device)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


DEFAULTS = {"sd1": dict(resolution=256, batch_size=[32]), "sdxl": dict(resolution=1024, batch_size=[1, 2, 4])}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["sd1", "sdxl"], default="sd1",
                   help="sd1: miniSD / SD 1.x (default); sdxl: SDXL base 1.0")
    p.add_argument("--batch_size", type=int, nargs="+", default=None,
                   help="one or several batch sizes, each measured in turn (default: 32 for sd1, 1 2 4 for sdxl)")
    p.add_argument("--resolution", type=int, default=None, help="default: 256 for sd1, 1024 for sdxl")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("trainer_flags", nargs="*", help="extra train_controlnet.py flags, after --")
    cli = p.parse_args()
    for key, value in DEFAULTS[cli.shape].items():
        if getattr(cli, key) is None:
            setattr(cli, key, value)
    from memory_table import format_table
    from shapes import build

    print(format_table(cli.shape, build(cli.shape, device="meta")) + "\n")
    if not torch.cuda.is_available():
        print("bench_gpu: skipped, no CUDA device")
        return 0

    from accelerate import Accelerator

    from common import make_batches, setup, shape_models, tc, trainer_args

    flags = ["--mixed_precision=fp16", "--gradient_checkpointing", f"--train_batch_size={cli.batch_size[0]}",
             f"--resolution={cli.resolution}", *cli.trainer_flags]
    try:
        import bitsandbytes  # noqa: F401

        flags.append("--use_8bit_adam")
        optimizer = "bitsandbytes AdamW8bit"
    except ImportError:
        optimizer = "torch AdamW (bitsandbytes does not import)"
    args = trainer_args(*flags)
    # Every text encoder layer: SDXL's second encoder is 32 layers deep (CLIP-L's 12 are sd1's whole encoder).
    models, tokenizer = shape_models(cli.shape, text_layers=None, vae_sample_size=cli.resolution)
    s = setup(models, tokenizer, Accelerator(mixed_precision="fp16"), args)
    checkpointed = "ControlNet and UNet" if cli.shape == "sdxl" else "ControlNet"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {cli.shape} shapes (ControlNet"
          f" {sum(p.numel() for p in s.controlnet.parameters()) / 1e6:.0f} M params), {cli.resolution} px, fp16"
          f" autocast, frozen modules fp16 (VAE {str(s.vae.dtype).removeprefix('torch.')}), {optimizer},"
          f" {checkpointed} gradient checkpointing; {cli.warmup} warm-up + {cli.steps} timed steps each; extra flags:"
          f" {' '.join(cli.trainer_flags) or 'none'}")

    def measure_sizes(attention):
        for batch_size in cli.batch_size:
            try:
                images_s, peak = measure(s, make_batches(4, batch_size, cli.resolution, tokenizer), cli.steps,
                                         cli.warmup)
                print(f"{attention:<9} batch {batch_size:3d} {images_s:8.2f} images/s  peak {peak:6.2f} GiB allocated")
                results[attention, batch_size] = images_s
            except torch.cuda.OutOfMemoryError:
                s.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                print(f"{attention:<9} batch {batch_size:3d} out of memory")

    results = {}
    measure_sizes("sdpa")
    t = time.perf_counter()
    if tc.enable_xformers([s.unet, s.controlnet], s.accelerator.device):
        measure_sizes("xformers")
        for batch_size in cli.batch_size:
            if ("sdpa", batch_size) in results and ("xformers", batch_size) in results:
                ratio = results["xformers", batch_size] / results["sdpa", batch_size]
                print(f"xformers_vs_sdpa (batch {batch_size}): {ratio:.2f}")
    else:
        print(f"xformers: unavailable here (see the warning above; {time.perf_counter() - t:.1f} s)")
    if not results:
        return 0
    batch_size = max(b for _, b in results)
    degradation_s = degradation_seconds(batch_size, cli.resolution)
    step_s = batch_size / max(v for (_, b), v in results.items() if b == batch_size)
    print(f"realesrgan conditions (factors 2-8) on the device: {degradation_s * 1000:.1f} ms per batch of"
          f" {batch_size}, step {step_s * 1000:.1f} ms")
    print(f"degradation_vs_step: {degradation_s / step_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
