"""The ControlNet copy each validation samples from: this project's (built on the meta device, weights shared or cast
on the training device) vs the plain way (random init on the CPU, weights copied device -> CPU -> device), side by
side in one run, on the miniSD-shaped ControlNet (~361 M parameters).

    python benchmarks/bench_validation.py [--rounds 3] [--dtype fp32|fp16|bf16]

Last line: `validation_copy_vs_cpu_init: <project / plain>` (< 1: the project's is faster). On a GPU the plain copy
also moves ~1.4 GB through the host twice while the other ranks wait.
"""

import argparse
import time

import torch

from common import shape_models, tc


def cpu_init_copy(controlnet, device, dtype):
    """The plain way: a randomly initialised model on the CPU, loaded, then moved."""
    from diffusers import ControlNetModel

    copy = ControlNetModel.from_config(controlnet.config)
    copy.load_state_dict(controlnet.state_dict())
    copy.set_attn_processor(controlnet.attn_processors)
    return copy.to(device, dtype=dtype).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    cli = p.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cli.dtype]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    controlnet = shape_models("sd1", text_layers=1)[0][4].to(device)
    best = {"project": float("inf"), "cpu_init": float("inf")}
    for _ in range(cli.rounds):
        for name, make in (("project", tc.inference_copy), ("cpu_init", cpu_init_copy)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            copy = make(controlnet, device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
            assert all(torch.equal(a.to(dtype), b) for a, b in zip(controlnet.parameters(), copy.parameters()))
            del copy
    params = sum(p.numel() for p in controlnet.parameters()) / 1e6
    print(f"miniSD-shaped ControlNet, {params:.0f} M params, {cli.dtype} copy on {device.type}"
          f" x {torch.get_num_threads()} thread(s); best of {cli.rounds}")
    print(f"project copy (meta init, weights shared/cast on the device)  {best['project']:.3f} s")
    print(f"plain copy (CPU random init, load, move)                     {best['cpu_init']:.3f} s")
    print(f"validation_copy_vs_cpu_init: {best['project'] / best['cpu_init']:.3f}")


if __name__ == "__main__":
    main()
