"""GPU memory of a ControlNet training step that does not depend on batch size or resolution, counted exactly on
the meta device (no GPU, no weights downloaded): the frozen modules' weights, the ControlNet's fp32 master weights,
its gradients and each optimizer's states and step-time temporaries, with what is left of a 24 GiB and an 80 GiB card
for the activations (those only a GPU can measure: benchmarks/bench_gpu.py).

    python benchmarks/memory_table.py [--shape sd1 sdxl]

The setup is the trainer's with --mixed_precision=fp16: the UNet, VAE and text encoders frozen in fp16, the
ControlNet trainable in fp32 under autocast, fp32 gradients. Byte counts are what torch.cuda.memory_allocated counts:
each tensor its own block, rounded up to the caching allocator's 512 bytes. Optimizer layouts as the installed
sources build them:
- AdamW (torch, foreach: the CUDA default): exp_avg and exp_avg_sq in fp32 (8 B/param), the step counters on the
  host; at its step `_foreach_sqrt(exp_avg_sqs)` makes one more fp32 copy of every state (4 B/param) while the
  gradients are still there.
- fused AdamW (--use_fused_adam): the same two states, plus one fp32 step counter per tensor on the device; no
  temporaries.
- 8-bit AdamW (bitsandbytes, --use_8bit_adam): tensors of >= 4096 values (min_8bit_size) keep two uint8 states
  (2 B/param) and two fp32 absmax per 256-value block (Optimizer2State.init_state, blocksize 256); smaller tensors
  keep two fp32 states; two 256-entry fp32 quantisation maps are shared by all tensors. Its kernels update in place.
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BLOCK = 512  # CUDA caching allocator: every allocation is rounded up to a multiple of 512 bytes
MIN_8BIT_SIZE, BNB_BLOCKSIZE, QMAP_VALUES = 4096, 256, 256
CARDS_GIB = (24, 80)
GIB = 2**30


def allocated(nbytes):
    """Bytes the caching allocator takes for one tensor of `nbytes`."""
    return max(1, math.ceil(nbytes / BLOCK)) * BLOCK


def tensor_nbytes(tensor, float_dtype):
    """Bytes of `tensor` after `.to(dtype=float_dtype)`: floating tensors take that dtype, the others keep theirs."""
    itemsize = float_dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
    return tensor.numel() * itemsize


def module_bytes(module, float_dtype):
    return sum(allocated(tensor_nbytes(t, float_dtype)) for t in [*module.parameters(), *module.buffers()])


def param_sizes(module):
    return [p.numel() for p in module.parameters() if p.requires_grad]


def fp32_blocks(sizes):
    return sum(allocated(4 * n) for n in sizes)


def optimizer_bytes(sizes):
    """-> {optimizer: (states, step-time temporaries)} in allocated bytes, for parameter tensors of `sizes` values."""
    eight_bit = 0
    for n in sizes:
        if n >= MIN_8BIT_SIZE:
            blocks = math.ceil(n / BNB_BLOCKSIZE)
            eight_bit += 2 * allocated(n) + 2 * allocated(4 * blocks)
        else:
            eight_bit += 2 * allocated(4 * n)
    eight_bit += 2 * allocated(4 * QMAP_VALUES)
    return {
        "AdamW (foreach)": (2 * fp32_blocks(sizes), fp32_blocks(sizes)),
        "fused AdamW": (2 * fp32_blocks(sizes) + len(sizes) * allocated(4), 0),
        "8-bit AdamW (bnb)": (eight_bit, 0),
    }


def memory_rows(models):
    """-> (frozen modules [(name, params, bytes)], controlnet params, {optimizer: dict of byte figures}).
    Every frozen module in fp16, the VAE too (an fp16-safe one; see format_table for the stock SDXL VAE)."""
    frozen = [("UNet", models["unet"]), ("VAE", models["vae"])]
    frozen += [(f"text encoder {i + 1}", enc) for i, enc in enumerate(models["text_encoders"])]
    frozen = [(f"{name} (fp16)", sum(p.numel() for p in m.parameters()), module_bytes(m, torch.float16))
              for name, m in frozen]
    controlnet = models["controlnet"]
    sizes = param_sizes(controlnet)
    weights = sum(b for _, _, b in frozen) + module_bytes(controlnet, torch.float32)
    rows = {}
    for name, (states, temporaries) in optimizer_bytes(sizes).items():
        rows[name] = dict(weights=weights, gradients=fp32_blocks(sizes), states=states)
        rows[name]["resident"] = sum(rows[name].values())
        rows[name]["temporaries"] = temporaries
    return frozen, sum(sizes), rows


def autocast_copies(module):
    """Upper bound of the fp16 copies autocast makes of the trainable conv/linear weights and biases, saved for
    backward (fewer with gradient checkpointing, which recomputes them): activation-class memory."""
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    return sum(allocated(2 * p.numel()) for m in module.modules() if isinstance(m, layers) for p in m.parameters())


def gib(nbytes):
    return f"{nbytes / GIB:7.2f}"


def card_column(row, card_gib):
    """The activations peak in forward/backward, beside the resident memory; the step's temporaries come after
    backward has freed them, so they need room only beside the resident memory."""
    card = card_gib * GIB
    if row["resident"] + row["temporaries"] > card:
        over = row["resident"] + row["temporaries"] - card
        return f"NO: {over / GIB:.2f} over" + (" at the step" if row["resident"] < card else "")
    return f"{(card - row['resident']) / GIB:.2f} left"


def format_table(shape, models):
    frozen, trainable, rows = memory_rows(models)
    lines = [f"## {shape}: exact, from the real configs on the meta device (GiB = 2^30 bytes, allocator blocks)", "",
             "| module | params | GiB |", "| --- | ---: | ---: |"]
    lines += [f"| {name} frozen | {params:,} | {gib(nbytes).strip()} |" for name, params, nbytes in frozen]
    lines += [f"| ControlNet (fp32, trainable) | {trainable:,} | {gib(module_bytes(models['controlnet'], torch.float32)).strip()} |",
              "", "| optimizer | weights | gradients | optimizer states | resident | + at the step | "
              + " | ".join(f"{c} GiB card: left for activations" for c in CARDS_GIB) + " |",
              "| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in CARDS_GIB) + " |"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(gib(r[k]).strip() for k in
                                                  ("weights", "gradients", "states", "resident", "temporaries"))
                     + " | " + " | ".join(card_column(r, c) for c in CARDS_GIB) + " |")
    lines += ["", "- resident: held from the first optimizer step on (the gradients too: the trainer zeroes them "
                  "in place unless --set_grads_to_none); + at the step: the optimizer's temporaries, after backward",
              f"- activations (batch and resolution dependent), CUDA context, allocator fragmentation: "
              f"measured on GPU: pending",
              f"- of them, autocast's fp16 copies of the ControlNet's conv/linear weights held for backward: at most "
              f"{gib(autocast_copies(models['controlnet'])).strip()} GiB",
              f"- DDP (more than one GPU) adds its gradient buckets (gradient_as_bucket_view=False, accelerate's "
              f"default): {gib(fp32_blocks(param_sizes(models['controlnet']))).strip()} GiB"]
    if shape == "sdxl" and models["vae"].config.get("force_upcast"):  # as the trainer's vae_dtype_for keeps it
        extra = module_bytes(models["vae"], torch.float32) - module_bytes(models["vae"], torch.float16)
        lines.append(f"- under fp16 the stock SDXL VAE stays fp32 (its config says force_upcast; "
                     f"madebyollin/sdxl-vae-fp16-fix, same shape, does not): {gib(extra).strip()} GiB more")
    return "\n".join(lines)


def main():
    from shapes import SHAPES, build

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    args = parser.parse_args()
    for shape in args.shape:
        print(format_table(shape, build(shape, device="meta")) + "\n")


if __name__ == "__main__":
    main()
