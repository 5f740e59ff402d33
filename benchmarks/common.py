"""Shared by the benchmarks: model building, the trainer's setup and step, an upstream reference step.

Nothing here asserts a timing; the scripts print figures measured side by side in one run.
"""

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "benchmarks")]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train_controlnet as tc  # noqa: E402


def module_at(commit, filename):
    """The project's `filename` (train_controlnet.py, upscale.py) as of `commit`, imported from git as a module of its
    own: an earlier version timed against the current one in the same run."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(["git", "show", f"{commit}:{filename}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    name = f"{Path(filename).stem}_then"
    path = os.path.join(tempfile.mkdtemp(), f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainer_args(*extra):
    """The trainer's own defaults (lr, Adam betas/eps/decay, scheduler, max_grad_norm...), plus `extra` flags."""
    return tc.make_parser().parse_args(["--train_shards_path_or_url=pipe:true", "--max_train_steps=100000", *extra])


def tiny_models(model_dir):
    """tools/make_tiny_pipeline.py's model, loaded the trainer's way -> (models tuple, tokenizer)."""
    from make_tiny_pipeline import save_pipeline

    save_pipeline(model_dir)
    args = trainer_args(f"--pretrained_model_name_or_path={model_dir}")
    return tc.load_models(args), tc.load_tokenizer(args)


def shape_models(shape="sd1", text_layers=12, vae_sample_size=256):
    """Randomly initialised real shapes (shapes.py): sd1, miniSD / SD-1.x (UNet2DConditionModel defaults with
    cross_attention_dim 768, the SD VAE, a CLIP-L-shaped text encoder); sdxl, SDXL base 1.0 (its UNet and VAE, CLIP-L
    and OpenCLIP-bigG-shaped encoders in a ModuleList, as the trainer holds them). Each text encoder keeps
    `text_layers` of its layers; in the trainer's load_models order. The tokenizer (SDXL: the same one twice) is the
    tiny pipeline's offline BPE one: its ids fit CLIP's vocabulary; prompts stay 77 tokens."""
    from diffusers import DDPMScheduler
    from make_tiny_pipeline import build_tokenizer
    from shapes import build

    torch.manual_seed(0)
    models = build(shape, text_layers=text_layers, vae_sample_size=vae_sample_size)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False)
    encoders, tokenizer = models["text_encoders"], build_tokenizer()
    if len(encoders) > 1:
        encoders, tokenizer = [torch.nn.ModuleList(encoders)], [tokenizer] * len(encoders)
    return (scheduler, encoders[0], models["vae"], models["unet"], models["controlnet"]), tokenizer


def setup(models, tokenizer, accelerator, args):
    """What train_controlnet.main does between loading the models and the loop (no trackers, no data)."""
    from diffusers.optimization import get_scheduler

    noise_scheduler, text_encoder, vae, unet, controlnet = models
    for frozen in (vae, unet, text_encoder):
        frozen.requires_grad_(False)
    controlnet.train()
    if args.enable_xformers_memory_efficient_attention:
        tc.enable_xformers([unet, controlnet], accelerator.device)
    family = tc.base_family(unet.config)
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        if family == "sdxl":
            unet.enable_gradient_checkpointing()
    if getattr(args, "channels_last", False):
        tc.use_channels_last(unet, vae, controlnet, args)
    if getattr(args, "torch_compile", None):
        for model in (unet, controlnet):
            model.compile(backend=args.torch_compile)
    optimizer = tc.make_optimizer(args, controlnet.parameters())
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for frozen in (unet, text_encoder):
        frozen.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=tc.vae_dtype_for(vae, weight_dtype, family))
    encode_prompts = tc.PromptEncoder(text_encoder, tokenizer, accelerator.device)
    return SimpleNamespace(args=args, accelerator=accelerator, noise_scheduler=noise_scheduler, vae=vae, unet=unet,
                           text_encoder=text_encoder, controlnet=controlnet, optimizer=optimizer,
                           lr_scheduler=lr_scheduler, weight_dtype=weight_dtype, encode_prompts=encode_prompts,
                           meter=tc.IntervalMeter(accelerator.device))


def make_batches(n, batch_size, resolution, tokenizer, seed=0):
    """Fixed host-side batches shaped like each loader's: uint8 images for the project (normalised on the device),
    float ones for the reference (as upstream's collate makes them); pinned when CUDA is there, as loaders do.
    No empty captions: --proportion_empty_prompts is 0 by default. With SDXL's two tokenizers (a list), the second's
    ids and each sample's time ids (a centred square crop of a `resolution` image) as make_tile_pair adds them."""
    tokenizers = tokenizer if isinstance(tokenizer, list) else [tokenizer]
    g = torch.Generator().manual_seed(seed)
    captions = ["a tabby cat looking at the camera", "a red motorcycle parked in a garage", "the moon at night"]
    batches = []
    for i in range(n):
        caps = [captions[(i + j) % len(captions)] for j in range(batch_size)]
        ids = [tc.token_ids(t, caps) for t in tokenizers]
        images = torch.randint(0, 256, (2, batch_size, 3, resolution, resolution), generator=g, dtype=torch.uint8)
        batch = {
            "pixel_values": images[0],
            "conditioning_pixel_values": images[1][..., ::4, ::4].contiguous(),  # shipped small, enlarged on the device
            "reference_pixel_values": images[0].float() / 127.5 - 1,
            "reference_conditioning_pixel_values": images[1].float() / 255,
            "input_ids": ids[0],
        }
        if len(ids) > 1:
            batch["input_ids_2"] = ids[1]
            batch["time_ids"] = tc.sdxl_time_ids((resolution, resolution), (0, 0, resolution), resolution).repeat(
                batch_size, 1)
        if torch.cuda.is_available():
            batch = {k: v.pin_memory() for k, v in batch.items()}
        batches.append(batch)
    return batches


def project_step(s, batch):
    """The trainer's step (train_controlnet.train_step); data wait and logging-step bookkeeping left out."""
    tc.train_step(batch, (s.vae, s.unet, s.controlnet), s.noise_scheduler, s.optimizer, s.lr_scheduler,
                  s.encode_prompts, s.meter, s.accelerator, s.args, s.weight_dtype)


def reference_step(s, batch):
    """One step as diffusers' examples/controlnet/train_controlnet.py writes it (incl. its per-step loss.item())."""
    vae, unet, controlnet, noise_scheduler, accelerator = s.vae, s.unet, s.controlnet, s.noise_scheduler, s.accelerator
    weight_dtype = s.weight_dtype
    batch = {k.removeprefix("reference_"): v.to(accelerator.device, non_blocking=True)  # prepared loader
             for k, v in batch.items() if k.startswith("reference_") or k == "input_ids"}
    with accelerator.accumulate(controlnet):
        latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
        timesteps = timesteps.long()
        noisy_latents = noise_scheduler.add_noise(latents.float(), noise.float(), timesteps).to(dtype=weight_dtype)
        encoder_hidden_states = s.text_encoder(batch["input_ids"], return_dict=False)[0]
        controlnet_image = batch["conditioning_pixel_values"].to(dtype=weight_dtype)
        down_block_res_samples, mid_block_res_sample = controlnet(
            noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_image,
            return_dict=False,
        )
        model_pred = unet(
            noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=[sample.to(dtype=weight_dtype) for sample in down_block_res_samples],
            mid_block_additional_residual=mid_block_res_sample.to(dtype=weight_dtype), return_dict=False,
        )[0]
        target = noise  # epsilon prediction
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(controlnet.parameters(), s.args.max_grad_norm)
        s.optimizer.step()
        s.lr_scheduler.step()
        s.optimizer.zero_grad(set_to_none=s.args.set_grads_to_none)
    logs = {"loss": loss.detach().item(), "lr": s.lr_scheduler.get_last_lr()[0]}  # upstream: every step
    return logs


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds_per_step(step, s, batches, steps):
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(s, batches[i % len(batches)])
    sync()
    return (time.perf_counter() - start) / steps


def compare(steps_fns, s, batches, steps, warmup, rounds):
    """Warm each step function up, then alternate them for `rounds` rounds: best s/step of each."""
    for fn in steps_fns.values():
        seconds_per_step(fn, s, batches, warmup)
    best = {name: float("inf") for name in steps_fns}
    for _ in range(rounds):
        for name, fn in steps_fns.items():
            best[name] = min(best[name], seconds_per_step(fn, s, batches, steps))
    return best
