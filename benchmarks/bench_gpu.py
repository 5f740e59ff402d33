"""GPU training throughput and peak memory at the reference settings, SDPA vs xformers attention, in one run.

    python benchmarks/bench_gpu.py [--shape sd1|sdxl] [--batch_size 32] [--resolution 256] [--steps 10] [--warmup 3]
        [-- TRAINER_FLAGS]

TRAINER_FLAGS (e.g. `-- --channels_last`) are added to the trainer's parsed arguments that the setup follows.

Randomly initialised miniSD-shaped model (SD-1.x UNet, SD VAE, CLIP-L-shaped text encoder), set up as the trainer
does with --mixed_precision=fp16 --use_8bit_adam --gradient_checkpointing: frozen modules in fp16, ControlNet in
fp32 master weights under autocast, bitsandbytes AdamW8bit, gradient checkpointing in the ControlNet. The timed
step is the trainer's (benchmarks/common.py: project_step) on fixed pinned batches, so data loading is left out.
xformers is measured only where it imports and its kernel runs (train_controlnet.enable_xformers decides).
Then the device's share of --condition_degradation=realesrgan at factors 2-8 (train_controlnet.model_inputs on
batches drawn as the workers draw them), against the step: `degradation_vs_step`.
It first prints the shape's exact memory table (benchmarks/memory_table.py: weights, gradients, optimizer states,
counted on the meta device), on any machine; the timed part then says what only a GPU can (activations, speed).
--shape sdxl: stabilityai/stable-diffusion-xl-base-1.0's shapes (benchmarks/shapes.py). Its timed step is the
trainer's SDXL step, which train_controlnet.py does not have yet: until then it prints the table only.
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["sd1", "sdxl"], default="sd1",
                   help="sd1: miniSD / SD 1.x (default); sdxl: SDXL base 1.0")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("trainer_flags", nargs="*", help="extra train_controlnet.py flags, after --")
    cli = p.parse_args()
    from memory_table import format_table
    from shapes import build

    print(format_table(cli.shape, build(cli.shape, device="meta")) + "\n")
    if cli.shape == "sdxl":
        print("bench_gpu: SDXL timed step pending (train_controlnet.py has no SDXL conditioning yet)")
        return 0
    if not torch.cuda.is_available():
        print("bench_gpu: skipped, no CUDA device")
        return 0

    from accelerate import Accelerator

    from common import make_batches, sd1_models, setup, tc, trainer_args

    flags = ["--mixed_precision=fp16", "--gradient_checkpointing", f"--train_batch_size={cli.batch_size}",
             f"--resolution={cli.resolution}", *cli.trainer_flags]
    try:
        import bitsandbytes  # noqa: F401

        flags.append("--use_8bit_adam")
        optimizer = "bitsandbytes AdamW8bit"
    except ImportError:
        optimizer = "torch AdamW (bitsandbytes does not import)"
    args = trainer_args(*flags)
    models, tokenizer = sd1_models(text_layers=12, vae_sample_size=cli.resolution)
    s = setup(models, tokenizer, Accelerator(mixed_precision="fp16"), args)
    batches = make_batches(4, cli.batch_size, cli.resolution, tokenizer)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; miniSD shapes (ControlNet"
          f" {sum(p.numel() for p in s.controlnet.parameters()) / 1e6:.0f} M params), {cli.resolution} px, batch"
          f" {cli.batch_size}, fp16 autocast, frozen modules fp16, {optimizer}, ControlNet gradient checkpointing;"
          f" {cli.warmup} warm-up + {cli.steps} timed steps each; extra flags: {' '.join(cli.trainer_flags) or 'none'}")
    results = {"sdpa": measure(s, batches, cli.steps, cli.warmup)}
    t = time.perf_counter()
    if tc.enable_xformers([s.unet, s.controlnet], s.accelerator.device):
        results["xformers"] = measure(s, batches, cli.steps, cli.warmup)
    else:
        print(f"xformers: unavailable here (see the warning above; {time.perf_counter() - t:.1f} s)")
    for name, (images_s, peak) in results.items():
        print(f"{name:<9} {images_s:8.1f} images/s  peak {peak:6.2f} GiB allocated")
    if "xformers" in results:
        print(f"xformers_vs_sdpa: {results['xformers'][0] / results['sdpa'][0]:.2f}")
    degradation_s = degradation_seconds(cli.batch_size, cli.resolution)
    step_s = cli.batch_size / max(images_s for images_s, _ in results.values())
    print(f"realesrgan conditions (factors 2-8) on the device: {degradation_s * 1000:.1f} ms per batch of"
          f" {cli.batch_size}, step {step_s * 1000:.1f} ms")
    print(f"degradation_vs_step: {degradation_s / step_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
