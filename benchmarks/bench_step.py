"""Training-step time: this project's step vs diffusers' upstream ControlNet step, side by side in one run.

    python benchmarks/bench_step.py [--steps 20]            # tiny offline model, 64 px, batch 4
    python benchmarks/bench_step.py --full_unet --steps 3   # random miniSD shapes, 256 px, batch 1 (slow on CPU)

Both steps share one model, optimizer and scheduler (prepared by accelerate as the trainer does) and fixed,
pre-made batches, so data loading is left out. Each is warmed up, then they alternate for --rounds rounds
(best s/step of each is kept). Last line: `step_vs_reference: <project / reference>` (< 1: project is faster).
"""

import argparse
import tempfile
import time

import torch

from common import compare, make_batches, project_step, reference_step, shape_models, setup, tiny_models, trainer_args


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full_unet", action="store_true", help="miniSD-shaped random model at 256 px, batch 1")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20; 3 with --full_unet)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (default 3; 1 full)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; 1 with --full_unet)")
    p.add_argument("--text_layers", type=int, default=2, help="--full_unet: text encoder layers (CLIP-L has 12)")
    p.add_argument("--threads", type=int, default=1)
    cli = p.parse_args()
    torch.set_num_threads(cli.threads)
    full = cli.full_unet
    steps, warmup, rounds = cli.steps or (3 if full else 20), cli.warmup or (1 if full else 3), cli.rounds or (1 if full else 3)
    resolution, batch_size = (256, 1) if full else (64, 4)

    from accelerate import Accelerator

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if full:
            models, tokenizer = shape_models("sd1", text_layers=cli.text_layers)
            what = (f"random miniSD shapes (SD-1.x UNet, SD VAE, CLIP-L-width text encoder with {cli.text_layers}"
                    " of 12 layers)")
        else:
            models, tokenizer = tiny_models(tmp)
            what = "tools/make_tiny_pipeline.py model"
        args = trainer_args(f"--resolution={resolution}", f"--condition_resolution={resolution // 4}")
        s = setup(models, tokenizer, Accelerator(), args)
        batches = make_batches(4, batch_size, resolution, tokenizer)
        best = compare({"project": project_step, "reference": reference_step}, s, batches, steps, warmup, rounds)

    params = sum(p.numel() for p in s.controlnet.parameters()) / 1e6
    print(f"{what}; ControlNet {params:.1f} M params; {resolution} px, batch {batch_size}, fp32 on"
          f" {s.accelerator.device.type} x {torch.get_num_threads()} thread(s); warmup {warmup}, best of {rounds}"
          f" round(s) x {steps} steps; total {time.perf_counter() - t0:.0f} s")
    print(f"project step (train_controlnet.train_step)                          {best['project']:.4f} s/step")
    print(f"reference step (diffusers examples/controlnet, loss.item() per step) {best['reference']:.4f} s/step")
    print(f"step_vs_reference: {best['project'] / best['reference']:.2f}")


if __name__ == "__main__":
    main()
