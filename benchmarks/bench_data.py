"""Data-path throughput per worker core (one process, one thread), three pipelines side by side in one run.

    python benchmarks/bench_data.py [--num_images 200] [--resolution 256] [--condition_resolution 64]
        [--condition_scales 2 3 4 6 8] [--condition_degradation realesrgan] [--against COMMIT]

(a) project: train_controlnet.read_shard -> make_tile_pair -> collate_fn -> the degradation draws (batches of 32):
    what a dataloader worker does
(b) seed reference: full JPEG decode, RGB, short side -> R (bicubic), random R x R crop, down to C and back up to R,
    float tensors (target in [-1, 1]), the same tokenization, torch.stack batches of 32
(c) limit: reading the tar + full JPEG decode to RGB, nothing else

Prints img/s for each (best of --passes alternating passes after a warm-up pass), then `data_vs_seed` and `data_vs_limit`.
--against COMMIT adds (a) with train_controlnet.py as of COMMIT (from git), alternated with the others in the same
run: the current data path against an earlier one, and each against the limit, on the same machine at the same time.
--stages prints where (a)'s time goes, ms per image in each of its functions (STAGES; the time inside each, less
that of the timed functions it calls), for the current data path and the --against one, passes alternated.
With a --condition_degradation, the degradation itself runs on the training device (train_controlnet.model_inputs),
not in the workers; it is timed apart, on this CPU, as `device_side_ms_per_img` (on a GPU: benchmarks/bench_gpu.py).
Shards are LAION-like: JPEGs (q90) of random crops/rescales of scikit-image's photos, short side 300..975 px
(long side up to ~1300), with .txt captions and img2dataset .json metadata.
"""

import argparse
import inspect
import io
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

import train_controlnet as tc  # noqa: E402
from common import module_at  # noqa: E402
from make_shards import write_shards  # noqa: E402  (random crops of make_shards.load_sources' photos)
from make_tiny_pipeline import save_pipeline  # noqa: E402

BATCH = 32


def project_batches(urls, tokenizer, args, tc=tc):
    rng, batch = random.Random(0), []
    for url in urls:
        for sample in tc.read_shard(url):
            batch.append(tc.make_tile_pair(sample, tokenizer, args, rng=rng))
            if len(batch) == BATCH:
                yield from tc.with_degradation_draws([tc.collate_fn(batch)], args.condition_degradation, rng)
                batch = []
    if batch:
        yield from tc.with_degradation_draws([tc.collate_fn(batch)], args.condition_degradation, rng)


def project_pass(urls, tokenizer, args, tc=tc):
    return sum(len(batch["keys"]) for batch in project_batches(urls, tokenizer, args, tc))


def device_side_ms_per_img(urls, tokenizer, args):
    """The training device's share of the data path (model_inputs: degradation and enlargement), here on the CPU."""
    batches = list(project_batches(urls, tokenizer, args))
    tc.model_inputs(batches[0], args, torch.device("cpu"))
    start = time.perf_counter()
    for batch in batches:
        tc.model_inputs(batch, args, torch.device("cpu"))
    return (time.perf_counter() - start) * 1000 / sum(len(b["keys"]) for b in batches)


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def seed_pair(sample, tokenizer, res, cond_res, rng):
    image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    w, h = image.size
    scale = res / min(w, h)
    image = image.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.BICUBIC)
    left, top = rng.randint(0, image.width - res), rng.randint(0, image.height - res)
    target = image.crop((left, top, left + res, top + res))
    condition = target.resize((cond_res, cond_res), Image.BICUBIC).resize((res, res), Image.BICUBIC)
    ids = tokenizer(sample["txt"].decode(), max_length=tokenizer.model_max_length, padding="max_length",
                    truncation=True, return_tensors="pt").input_ids[0]
    return to_tensor(target) * 2 - 1, to_tensor(condition), ids


def seed_pass(urls, tokenizer, args):
    rng, batch, n = random.Random(0), [], 0
    for sample in wds.tarfile_samples([{"url": u} for u in urls]):
        batch.append(seed_pair(sample, tokenizer, args.resolution, args.condition_resolution, rng))
        if len(batch) == BATCH:
            [torch.stack(column) for column in zip(*batch)]
            n, batch = n + len(batch), []
    if batch:
        [torch.stack(column) for column in zip(*batch)]
    return n + len(batch)


def limit_pass(urls, tokenizer, args):
    n = 0
    for sample in wds.tarfile_samples([{"url": u} for u in urls]):
        Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        n += 1
    return n


STAGES = ("read_shard", "make_tile_pair", "decode_image", "square_crop", "image_to_tensor", "resize", "sdxl_time_ids",
          "token_ids", "collate_fn")


def stage_times(urls, tokenizer, args, module):
    """One pass of (a) with STAGES of `module` timed -> ms per image in each (its own time: less that of the timed
    functions it calls; a generator's is the time spent getting each item) and the rest of the pass as 'other'."""
    own, stack, clock = dict.fromkeys(STAGES, 0.0), [], time.perf_counter

    def enter():
        stack.append([clock(), 0.0])

    def leave(name):
        start, inner = stack.pop()
        elapsed = clock() - start
        own[name] += elapsed - inner
        if stack:
            stack[-1][1] += elapsed

    def timed(name, fn):
        def call(*a, **k):
            enter()
            try:
                return fn(*a, **k)
            finally:
                leave(name)

        def items(*a, **k):
            iterator = fn(*a, **k)
            while True:
                enter()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                finally:
                    leave(name)
                yield item

        return items if inspect.isgeneratorfunction(fn) else call

    originals = {name: getattr(module, name) for name in STAGES if hasattr(module, name)}
    try:
        for name, fn in originals.items():
            setattr(module, name, timed(name, fn))
        start = clock()
        n = project_pass(urls, tokenizer, args, tc=module)
        total = clock() - start
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
    times = {name: own[name] * 1000 / n for name in originals}
    return {**times, "other": total * 1000 / n - sum(times.values()), "total": total * 1000 / n}


def print_stages(urls, tokenizer, args, modules, passes):
    """stage_times of each of `modules` (label -> train_controlnet module), best of `passes` alternated passes."""
    best = {}
    for _ in range(passes + 1):  # the first pass warms up
        for label, module in modules.items():
            times = stage_times(urls, tokenizer, args, module)
            best[label] = {k: min(v, best[label][k]) for k, v in times.items()} if label in best else times
    print(f"\n{'ms per image (own time, best pass)':<36}" + "".join(f"{label:>14}" for label in modules))
    for stage in [*STAGES, "other", "total"]:
        print(f"{stage:<36}" + "".join(f"{best[label].get(stage, float('nan')):14.3f}" for label in modules))


def best_rates(fns, *a, passes=5):
    """Warm each up (page cache, tokenizer, allocator), then alternate them pass by pass: best img/s of each.
    Alternating spreads any background load on the machine over all pipelines alike."""
    for fn in fns.values():
        fn(*a)
    best = dict.fromkeys(fns, 0.0)
    for _ in range(passes):
        for name, fn in fns.items():
            t = time.perf_counter()
            n = fn(*a)
            best[name] = max(best[name], n / (time.perf_counter() - t))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=200)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--condition_resolution", type=int, default=64)
    p.add_argument("--condition_scales", type=float, nargs="+", default=None)
    p.add_argument("--condition_degradation", default="none", choices=sorted(tc.DEGRADATIONS))
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--only", choices=["project", "seed", "limit"], default=None, help="time one pipeline (profiling)")
    p.add_argument("--against", default=None, metavar="COMMIT", help="also time (a) as of COMMIT (6f349fc or later)")
    p.add_argument("--stages", action="store_true", help="where (a)'s time goes, per function (see above)")
    cli = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        per_shard = min(50, cli.num_images)  # num_images is rounded up to whole shards
        urls = write_shards(os.path.join(tmp, "shards"), num_shards=math.ceil(cli.num_images / per_shard),
                            samples_per_shard=per_shard, seed=0, min_size=300, max_size=975)
        sizes = [Image.open(io.BytesIO(s["jpg"])).size for s in wds.tarfile_samples([{"url": u} for u in urls])]
        short = sorted(min(s) for s in sizes)
        mb = sum(os.path.getsize(u) for u in urls) / 2**20
        print(f"shards: {len(sizes)} JPEGs in {len(urls)} tars ({mb:.1f} MB), short side {short[0]}..{short[-1]} px"
              f" (median {short[len(short) // 2]}), long side up to {max(max(s) for s in sizes)} px")

        save_pipeline(os.path.join(tmp, "tiny"))
        args = tc.make_parser().parse_args(["--train_shards_path_or_url=pipe:true", "--max_train_steps=1",
                              f"--resolution={cli.resolution}", f"--condition_resolution={cli.condition_resolution}",
                              f"--condition_degradation={cli.condition_degradation}"]
                             + (["--condition_scales", *map(str, cli.condition_scales)] if cli.condition_scales else []))
        args.pretrained_model_name_or_path = os.path.join(tmp, "tiny")
        tokenizer = tc.load_tokenizer(args)

        fns = {"project": project_pass, "seed": seed_pass, "limit": limit_pass}
        if cli.against:
            then = module_at(cli.against, "train_controlnet.py")
            if not hasattr(then, "with_degradation_draws"):
                p.error(f"--against {cli.against}: its train_controlnet.py predates the condition recipes (6f349fc),"
                        " whose stages (a) runs")
            fns["then"] = lambda *a: project_pass(*a, tc=then)
        rates = best_rates({k: f for k, f in fns.items() if cli.only in (None, k)}, urls, tokenizer, args,
                           passes=cli.passes)
        print(f"{type(tokenizer).__name__}, {cli.resolution} px, condition {cli.condition_resolution} px, factors"
              f" {args.condition_scales or 'default'}, degradation {args.condition_degradation}, batch {BATCH},"
              f" 1 process x {torch.get_num_threads()} thread, best of {cli.passes} passes")
        labels = {"project": "(a) project make_tile_pair + collate_fn", "then": f"(a) as of {cli.against}",
                  "seed": "(b) seed reference (full decode, 2 resizes)",
                  "limit": "(c) limit: tar read + full JPEG decode"}
        for name, rate in rates.items():
            print(f"{labels[name]:<46} {rate:8.1f} img/s  ({1000 / rate:6.2f} ms/img)")
        if cli.only is None:
            print(f"data_vs_seed: {rates['project'] / rates['seed']:.2f}")
            print(f"data_vs_limit: {rates['project'] / rates['limit']:.2f}")
            if cli.against:
                print(f"data_vs_limit as of {cli.against}: {rates['then'] / rates['limit']:.2f}")
                print(f"data_vs_{cli.against}: {rates['project'] / rates['then']:.3f}")
            print(f"device_side_ms_per_img (this CPU, 1 thread): {device_side_ms_per_img(urls, tokenizer, args):.2f}")
        if cli.stages:
            print_stages(urls, tokenizer, args, {"current": tc, **({cli.against: then} if cli.against else {})},
                         cli.passes)


if __name__ == "__main__":
    main()
