"""Build a tiny Stable-Diffusion pipeline offline: SD-1.x-shaped (default), SD-2.x-shaped or SDXL-shaped.

The saved folder has the same layout as a hub repo of that family, so the trainer can be pointed at it with
--pretrained_model_name_or_path for fast CPU tests.

    python tools/make_tiny_pipeline.py --output_dir /tmp/tiny-sd [--seed 0] [--family sd1|sd2|sdxl]

--family (FAMILIES below; the same builder for all three, only the differences are per family):
  sd1   CLIP-L-style text encoder, conv projections, epsilon (StableDiffusionPipeline folder).
  sd2   one wider OpenCLIP-style encoder (gelu, "!" padding), linear projections, per-block head counts,
        v-prediction (StableDiffusionPipeline folder).
  sdxl  two encoders (CLIPTextModel + CLIPTextModelWithProjection, tokenizer and tokenizer_2), cross-attention over
        both penultimate states side by side, addition_embed_type "text_time" (6 time ids + the pooled embedding
        into the time embedding), 1 and 2 transformer layers per block, epsilon (StableDiffusionXLPipeline folder).

By default the weights are random: enough to prove plumbing, never learning. With
--trained the VAE and then the UNet are trained for a few CPU-minutes on crops of the
scikit-image photos, so that a ControlNet trained on top visibly follows its condition:

    python tools/make_tiny_pipeline.py --output_dir /tmp/tiny-sd --trained [--vae_steps N --unet_steps M]
        [--vae_minutes 4 --unet_minutes 4] [--prediction_type v_prediction] [--family F] [--vae_from DIR]

The random pipeline predicts the family's objective; the trained one predicts v (SD 2.x's objective) unless told
otherwise, because at 8x8 latents epsilon-prediction leaves the low frequencies, which are what a tile condition
carries, almost unweighted at the high noise levels where sampling decides them (docs/quickstart-evidence.md,
"Why its UNet predicts v, not epsilon").

The two shipped trained bases, remade exactly (step budgets, one thread; the machine's load changes only the time),
and compared with the shipped ones:

    OMP_NUM_THREADS=1 python tools/make_tiny_pipeline.py --output_dir /tmp/remade --trained --vae_steps 900 --unet_steps 1000
    OMP_NUM_THREADS=1 python tools/make_tiny_pipeline.py --output_dir /tmp/remade-xl --family sdxl --trained \
        --vae_from tools/tiny-sd-trained --unet_steps 1000
    python tools/make_tiny_pipeline.py --score /tmp/remade tools/tiny-sd-trained /tmp/remade-xl tools/tiny-sdxl-trained

tools/tiny-sdxl-trained reuses tools/tiny-sd-trained's trained VAE (--vae_from) and trains only its UNet, with
SDXL's added conditioning: each crop's own time ids (source photo size, crop top-left, target size; photo_crops) and
the pooled embedding of its caption from the second text encoder.
"""

import argparse
import collections
import json
import math
import os
import random
import re
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Small built-in caption corpus: the BPE merges are learned from it so that common
# caption words become single tokens, like in the real CLIP vocabulary.
CORPUS = """
a dog sitting on the grass
a tabby cat looking at the camera
a cup of coffee on a wooden table
home office with a desk, a chair and a computer
a smiling astronaut in an orange spacesuit next to a flag
a rocket on a launch pad at night
a man filming with a camera on a tripod in a park
a red motorcycle parked in a garage
old silver coins on a black background
the surface of the moon with craters
a close up photo of green grass
a pile of gray gravel
a brick wall seen from an angle
thousands of colorful galaxies in deep space
a microscope image of stained tissue
a photograph of the retina of an eye
a scanned page of a book with printed text
handwritten equations on a stone floor
a blurry photo of a clock on the wall
a black and white photo of a city street
a beautiful landscape with mountains and a lake at sunset
a portrait of a young woman with long hair
an old man reading a newspaper in the kitchen
two children playing with a ball in the garden
a bowl of fresh fruit on the kitchen table
a small house in the forest covered with snow
a bird sitting on a branch of a tree
a white horse running on the beach
a bicycle leaning against a yellow wall
a plate of pasta with tomato sauce and cheese
a modern living room with a sofa and a lamp
a street at night with cars and lights
a boat on the river under a blue sky
a painting of flowers in a vase
a close up of a dog with brown eyes
a cat sleeping on a bed next to the window
a laptop and a cup of tea on a desk
a city skyline with tall buildings
an aerial view of a green field and a road
a person walking in the rain with an umbrella
a high resolution photo, sharp details, best quality
a low resolution, blurry, noisy picture
a photo of a dog playing in the snow
the interior of a bright office with plants
a wooden chair in an empty room
a train crossing a bridge over the valley
a group of people standing in front of a building
a sandwich on a white plate
a glass of water on the table
a sunset over the ocean with waves
"""

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Same word split as CLIP's pre-tokenizer, restricted to the ASCII corpus above.
WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def bytes_to_unicode():
    """GPT-2/CLIP map from the 256 bytes to printable unicode symbols."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(text, num_merges):
    byte_map = bytes_to_unicode()
    words = collections.Counter()
    for w in WORD_RE.findall(text.lower()):
        sym = [byte_map[b] for b in w.encode("utf-8")]
        sym[-1] += "</w>"
        words[tuple(sym)] += 1

    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        # Ties broken lexicographically so the vocabulary is reproducible. Pairs seen once
        # are merged too (whole rare words become tokens) to reach a few hundred merges.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged

    symbols = list(byte_map.values())
    # CLIP's id order: bytes, bytes+</w>, merges, then the two special tokens last
    # (CLIPTextModel's legacy pooling takes argmax(input_ids) as the EOS position).
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_bpe_files(directory, num_merges=400):
    vocab, merges = learn_bpe(CORPUS, num_merges)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_tokenizer(pad_token=None):
    """The offline CLIP BPE tokenizer. `pad_token="!"` is OpenCLIP's (SD 2.x's tokenizer, SDXL's tokenizer_2); the
    default pads with the end token, as CLIP-L's tokenizer does."""
    from transformers import CLIPTokenizer

    tmp = tempfile.mkdtemp()
    try:
        write_bpe_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, **({"pad_token": pad_token} if pad_token else {}))
    finally:
        shutil.rmtree(tmp)


# The three families' structures at tiny widths. Each text encoder: its CLIPTextConfig widths, whether it is
# CLIPTextModelWithProjection (SDXL's second, whose projected pooled output feeds the UNet) and its pad token.
# The UNet's cross-attention width is the sum of the encoders' hidden sizes (SDXL concatenates them: 768 + 1280).
CLIP_L = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
OPEN_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                 hidden_act="gelu")
FAMILIES = {
    # SD 1.x: CLIP-L, conv projections in the transformers, epsilon.
    "sd1": dict(text_encoders=[dict(CLIP_L)], unet={}, prediction_type="epsilon"),
    # SD 2.x: one wider OpenCLIP-style encoder, linear projections, v-prediction (the 768-v models).
    "sd2": dict(text_encoders=[dict(OPEN_CLIP, pad_token="!")], unet=dict(use_linear_projection=True),
                prediction_type="v_prediction"),
    # SDXL: CLIP-L + OpenCLIP with projection; time ids (original size, crop top-left, target size: 6 numbers,
    # each embedded in addition_time_embed_dim) and the pooled text embedding are added to the time embedding;
    # more transformer layers in the deeper block.
    "sdxl": dict(text_encoders=[dict(CLIP_L), dict(OPEN_CLIP, pad_token="!", with_projection=True)],
                 unet=dict(use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                           transformer_layers_per_block=(1, 2)),
                 prediction_type="epsilon"),
}
SDXL_TIME_IDS = 6  # original (h, w) + crop top-left (top, left) + target (h, w)


def is_sdxl(unet_config):
    return unet_config.get("addition_embed_type") == "text_time"


def build_text_encoder(spec, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = dict(spec)
    spec.pop("pad_token", None)
    model_class = CLIPTextModelWithProjection if spec.pop("with_projection", False) else CLIPTextModel
    return model_class(
        CLIPTextConfig(
            **spec,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()


def build_pipeline(seed=0, prediction_type=None, family="sd1"):
    """A random tiny pipeline of `family` (FAMILIES); `prediction_type` defaults to the family's."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel

    spec = FAMILIES[family]
    tokenizers = [build_tokenizer(enc.get("pad_token")) for enc in spec["text_encoders"]]

    # Each component is seeded on its own so changing one leaves the others unchanged; SDXL's second text encoder
    # comes last so the components the families share are the same weights.
    text_encoders = []
    for i, (enc, tokenizer) in enumerate(zip(spec["text_encoders"], tokenizers)):
        torch.manual_seed(seed if i == 0 else seed + 3)
        text_encoders.append(build_text_encoder(enc, tokenizer))

    torch.manual_seed(seed + 1)
    # Four levels -> three downsamplers -> 8x, like the SD VAE.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )

    unet_extra = dict(spec["unet"])
    if "addition_time_embed_dim" in unet_extra:  # as StableDiffusionXLPipeline._get_add_time_ids checks it
        unet_extra["projection_class_embeddings_input_dim"] = (
            SDXL_TIME_IDS * unet_extra["addition_time_embed_dim"] + text_encoders[-1].config.projection_dim
        )
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(enc.config.hidden_size for enc in text_encoders),
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        **unet_extra,
    )

    # from_config keeps set_alpha_to_one (not a DDPM argument) in the saved config, as in
    # hub SD-1.x repos, so DDIM/PNDM built from it behave like the real thing.
    scheduler = DDPMScheduler.from_config(
        dict(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type=prediction_type or spec["prediction_type"],
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
    )

    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tokenizers[0],
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tokenizer_folders(model_dir):
    return [name for name in ("tokenizer", "tokenizer_2") if os.path.isdir(os.path.join(model_dir, name))]


def write_pipeline(pipe, output_dir):
    pipe.save_pretrained(output_dir)
    # transformers 5 saves only tokenizer.json; the raw BPE files let transformers 4.x
    # build its slow CLIPTokenizer (use_fast=False) from the same folder.
    for folder in tokenizer_folders(output_dir):
        write_bpe_files(os.path.join(output_dir, folder))
    return output_dir


def save_pipeline(output_dir, seed=0, prediction_type=None, family="sd1"):
    return write_pipeline(build_pipeline(seed, prediction_type, family), output_dir)


# ----------------------------------------------------------------------------------------------------------------
# Trained mode. A random VAE's latents are ~95% posterior noise that no condition can predict, so a ControlNet
# trained on a random base cannot show learning. A VAE trained to reconstruct, then a UNet trained to denoise its
# latents, give a base on which a ControlNet tile learns within a few hundred CPU steps.

RESOLUTION = 64  # the tests' and Quickstart's training resolution: 64 px images -> 4x8x8 latents
HELD_OUT = 256  # fixed crops for the held-out figures and the latent scale


def photo_crops(rng, sources, n):
    """n random RESOLUTION-px square crops -> (images in [-1, 1], captions, SDXL time ids).

    Drawn like a shard sample seen through the trainer's square crop (make_shards' random area, aspect and flip,
    short side RESOLUTION), with up to 1.5x zoom on top so the VAE also sees finer detail.
    The time ids are SDXL's micro-conditioning of what each crop really is, in its pipeline's order: the source
    photo's (height, width) (what an img2dataset json says as original_height/width), the crop's (top, left) in the
    image it was cut from, and the target (height, width). They cost no random draws: the crops stay the same.
    """
    from make_shards import random_sample

    images, captions, time_ids = [], [], []
    for _ in range(n):
        image, caption, _, (original_w, original_h) = random_sample(
            rng, rng.choice(sources), RESOLUTION, RESOLUTION * 3 // 2
        )
        left, top = rng.randint(0, image.width - RESOLUTION), rng.randint(0, image.height - RESOLUTION)
        images.append(np.asarray(image.crop((left, top, left + RESOLUTION, top + RESOLUTION))))
        captions.append(caption)
        time_ids.append((original_h, original_w, top, left, RESOLUTION, RESOLUTION))
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, captions, torch.tensor(time_ids, dtype=torch.float32)


def budget(desc, steps=None, minutes=None):
    """Yield (step, fraction of the budget spent) until `steps` are done or `minutes` have passed, whichever is
    first. A step budget alone makes the build reproducible; minutes cap the wall time on a slow machine."""
    if not steps and not minutes:
        raise ValueError(f"{desc}: give a step or a time budget")
    start, step = time.monotonic(), 0
    with tqdm(total=steps or round(minutes * 60), desc=desc, unit="step" if steps else "s") as bar:
        while True:
            elapsed = time.monotonic() - start
            done = max(step / steps if steps else 0.0, elapsed / (minutes * 60) if minutes else 0.0)
            if done >= 1:
                return
            yield step, done
            step += 1
            if steps:
                bar.update(1)
            else:
                bar.update(min(bar.total, round(elapsed)) - bar.n)


def set_lr(optimizer, base_lr, step, done, warmup=20):
    """Short warm-up, then cosine decay to zero at the end of the budget: the decay buys much in a short run."""
    lr = base_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * done))
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimise(model, optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def train_vae(vae, sources, rng, steps=None, minutes=None, batch_size=16, lr=1e-3, kl_weight=1e-4):
    """Reconstruct through sampled latents (the trainer encodes with latent_dist.sample()). L1 keeps edges, L2
    the overall tone; the small KL keeps the posterior noise well below the signal without blurring."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    vae.train()
    for step, done in budget("VAE", steps, minutes):
        set_lr(optimizer, lr, step, done)
        images, _, _ = photo_crops(rng, sources, batch_size)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element, so the weight is size-free
        optimise(vae, optimizer, F.l1_loss(recon, images) + F.mse_loss(recon, images) + kl_weight * kl)
    vae.eval()
    return step + 1


@torch.no_grad()
def vae_psnr(vae, images):
    """Mean PSNR (dB, on [0, 1] pixels) of the reconstructions from the posterior means."""
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    mse = ((recon - images) / 2).pow(2).mean(dim=(1, 2, 3))
    return (-10 * torch.log10(mse)).mean().item()


@torch.no_grad()
def latent_scale(vae, images):
    """SD's convention: scaling_factor = 1 / std of the latents, so the UNet sees unit-variance inputs."""
    return 1.0 / vae.encode(images).latent_dist.mode().std().item()


def token_ids(tokenizer, captions):
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(pipe, captions):
    """-> (encoder hidden states, pooled text embeddings or None). SD: the encoder's last hidden states. SDXL, as
    its pipeline's encode_prompt does: both encoders' penultimate hidden states side by side, and the second's
    projected pooled output."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return pipe.text_encoder(token_ids(pipe.tokenizer, captions))[0], None
    first = pipe.text_encoder(token_ids(pipe.tokenizer, captions), output_hidden_states=True)
    second = pipe.text_encoder_2(token_ids(pipe.tokenizer_2, captions), output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def added_conditions(pooled, time_ids):
    """SDXL's added_cond_kwargs for the UNet and its ControlNet; None for SD, whose UNet takes none."""
    return None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}


def denoising_loss(pipe, images, captions, time_ids, noise=None, timesteps=None):
    """The trainer's objective for the bare UNet: predict the noise (or v) of the noised scaled latents."""
    with torch.no_grad():
        posterior = pipe.vae.encode(images).latent_dist
        latents = (posterior.mode() if noise is not None else posterior.sample()) * pipe.vae.config.scaling_factor
        hidden, pooled = encode_prompts(pipe, captions)
    if noise is None:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(images),))
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    if pipe.scheduler.config.prediction_type == "v_prediction":
        target = pipe.scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = pipe.unet(noisy, timesteps, hidden, added_cond_kwargs=added_conditions(pooled, time_ids)).sample
    return F.mse_loss(pred, target)


@torch.no_grad()
def held_out_denoising_loss(pipe, images, captions, time_ids, seed=0):
    """Fixed noise and a fixed spread of timesteps over [0, T): comparable between runs and steps."""
    shape = (len(images), pipe.unet.config.in_channels, RESOLUTION // 8, RESOLUTION // 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    timesteps = torch.linspace(0, pipe.scheduler.config.num_train_timesteps - 1, len(images)).round().long()
    return denoising_loss(pipe, images, captions, time_ids, noise, timesteps).item()


def train_unet(pipe, sources, rng, steps=None, minutes=None, batch_size=32, lr=1e-3, proportion_empty=0.1):
    """Denoiser on the VAE's latents, conditioned on the real captions (10% empty, as for CFG training) and, for
    SDXL, on each crop's own time ids and pooled caption embedding. The random text encoders stay frozen, as in the
    trainer: they still give each caption its own embedding."""
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=lr)
    pipe.unet.train()
    for step, done in budget("UNet", steps, minutes):
        set_lr(optimizer, lr, step, done)
        images, captions, time_ids = photo_crops(rng, sources, batch_size)
        captions = ["" if rng.random() < proportion_empty else c for c in captions]
        optimise(pipe.unet, optimizer, denoising_loss(pipe, images, captions, time_ids))
    pipe.unet.eval()
    return step + 1


def train_base(output_dir, vae_minutes=4, unet_minutes=4, seed=0, vae_steps=None, unet_steps=None,
               prediction_type="v_prediction", family="sd1", vae_from=None):
    """Build the random pipeline, train its VAE (or take `vae_from`'s, a saved pipeline's) then its UNet within
    their budgets, save it like the random one."""
    from diffusers import AutoencoderKL
    from make_shards import load_sources

    pipe = build_pipeline(seed, prediction_type, family)
    sources = load_sources()
    # The held-out crops come from their own stream; they are other crops of the same 18 photos.
    held_out, held_out_captions, held_out_time_ids = held_out_set(seed)
    rng = random.Random(seed)

    torch.manual_seed(seed)
    start = time.monotonic()
    if vae_from:
        # Into this pipeline's own VAE (same builder, so the same shape): the saved config stays this builder's.
        trained_vae = AutoencoderKL.from_pretrained(vae_from, subfolder="vae")
        pipe.vae.load_state_dict(trained_vae.state_dict())
        pipe.vae.register_to_config(scaling_factor=trained_vae.config.scaling_factor)
        pipe.vae.eval()
        print(f"VAE: {vae_from}'s, held-out PSNR {vae_psnr(pipe.vae, held_out):.2f} dB, "
              f"scaling_factor {pipe.vae.config.scaling_factor}")
    else:
        steps = train_vae(pipe.vae, sources, rng, vae_steps, vae_minutes)
        scale = latent_scale(pipe.vae, held_out)
        pipe.vae.register_to_config(scaling_factor=round(scale, 4))
        print(f"VAE: {steps} steps in {time.monotonic() - start:.0f} s, held-out PSNR "
              f"{vae_psnr(pipe.vae, held_out):.2f} dB, scaling_factor {pipe.vae.config.scaling_factor}")

    torch.manual_seed(seed + 1)
    start = time.monotonic()
    before = held_out_denoising_loss(pipe, held_out, held_out_captions, held_out_time_ids)
    steps = train_unet(pipe, sources, rng, unet_steps, unet_minutes)
    after = held_out_denoising_loss(pipe, held_out, held_out_captions, held_out_time_ids)
    print(f"UNet: {steps} steps in {time.monotonic() - start:.0f} s, "
          f"held-out denoising loss {before:.4f} -> {after:.4f}")
    return write_pipeline(pipe, output_dir)


def held_out_set(seed=0):
    """The fixed held-out crops, captions and time ids that train_base reports on."""
    from make_shards import load_sources

    return photo_crops(random.Random(f"held-out-{seed}"), load_sources(), HELD_OUT)


@torch.no_grad()
def score(model_dir, seed=0):
    """Held-out VAE PSNR (dB) and UNet denoising loss of a saved pipeline: compares a remade base with a shipped one."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)  # the class its model_index.json names: SD or SDXL
    images, captions, time_ids = held_out_set(seed)
    return {"vae_psnr_db": vae_psnr(pipe.vae, images),
            "unet_loss": held_out_denoising_loss(pipe, images, captions, time_ids)}


def verify(model_dir):
    """Load every part the way the trainer does and run the shapes it relies on: one denoising step of the UNet
    with a ControlNetModel.from_unet of it (SDXL: with its added conditioning), then the family's ControlNet
    pipeline for two steps."""
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        DDPMScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
        UNet2DConditionModel,
    )
    from PIL import Image
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    assert scheduler.config.prediction_type in ("epsilon", "v_prediction")
    sdxl = is_sdxl(unet.config)
    encoder_classes = [CLIPTextModel, CLIPTextModelWithProjection] if sdxl else [CLIPTextModel]
    assert tokenizer_folders(model_dir) == ["tokenizer", "tokenizer_2"][: len(encoder_classes)]

    texts = ["", "a dog sitting on the grass", "Ünïcödé café — 猫 🐶 ", "home office " * 60]
    hidden_states, pooled = [], None
    for i, encoder_class in enumerate(encoder_classes):
        suffix = f"_{i + 1}" if i else ""
        tok_auto = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer" + suffix, use_fast=False)
        tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer" + suffix)
        text_encoder = encoder_class.from_pretrained(model_dir, subfolder="text_encoder" + suffix)
        assert text_encoder.config.architectures == [encoder_class.__name__]
        for tok in (tok_auto, tokenizer):
            ids = token_ids(tok, texts)
            assert ids.shape == (len(texts), 77) and int(ids.max()) < text_encoder.config.vocab_size, ids.shape
            assert torch.equal(ids, token_ids(tokenizer, texts))
        with torch.no_grad():
            out = text_encoder(ids[:2], output_hidden_states=True)
        hidden_states.append(out.hidden_states[-2] if sdxl else out.last_hidden_state)
        pooled = out.text_embeds if encoder_class is CLIPTextModelWithProjection else None
    hidden = torch.cat(hidden_states, dim=-1)
    assert hidden.shape[-1] == unet.config.cross_attention_dim, hidden.shape

    with torch.no_grad():
        latents = vae.encode(torch.randn(2, 3, 64, 64)).latent_dist.sample()
        assert latents.shape == (2, 4, 8, 8), latents.shape
        assert vae.decode(latents).sample.shape == (2, 3, 64, 64)

        controlnet = ControlNetModel.from_unet(unet)
        t = torch.tensor([10, 500])
        # Two samples with different real sizes and crops, as a batch of a shard's images has.
        time_ids = torch.tensor([[512.0, 384, 0, 0, 64, 64], [300, 451, 17, 5, 64, 64]])
        added = added_conditions(pooled, time_ids)
        down, mid = controlnet(latents, t, encoder_hidden_states=hidden, controlnet_cond=torch.rand(2, 3, 64, 64),
                               added_cond_kwargs=added, return_dict=False)
        pred = unet(latents, t, encoder_hidden_states=hidden, added_cond_kwargs=added,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        assert pred.shape == latents.shape
        if sdxl:  # the time ids reach the prediction
            other = unet(latents, t, encoder_hidden_states=hidden, added_cond_kwargs=added_conditions(pooled, time_ids.flip(0)),
                         down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
            assert not torch.allclose(pred, other)

    pipeline_class = StableDiffusionXLControlNetPipeline if sdxl else StableDiffusionControlNetPipeline
    pipe = pipeline_class.from_pretrained(model_dir, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a dog sitting on the grass",
        image=Image.new("RGB", (64, 64), (90, 140, 60)),
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
    return type(tok_auto).__name__, tok_auto.is_fast


def dir_size(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help="where to save the pipeline")
    parser.add_argument("--score", metavar="MODEL_DIR", nargs="+",
                        help="print the held-out VAE PSNR and UNet loss of saved pipelines (e.g. remade vs shipped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd1",
                        help="the base's shape: SD 1.x (default), SD 2.x or SDXL (see FAMILIES)")
    parser.add_argument("--skip_verify", action="store_true", help="do not reload and run the saved pipeline")
    parser.add_argument("--trained", action="store_true", help="train the VAE and UNet instead of leaving them random")
    parser.add_argument("--vae_steps", type=int, default=None, help="VAE steps (a reproducible budget)")
    parser.add_argument("--vae_from", metavar="MODEL_DIR", default=None,
                        help="with --trained: take this saved pipeline's VAE (e.g. tools/tiny-sd-trained) instead of "
                             "training one")
    parser.add_argument("--unet_steps", type=int, default=None, help="UNet steps (a reproducible budget)")
    parser.add_argument("--vae_minutes", type=float, default=None, help="time cap (default 4 without --vae_steps)")
    parser.add_argument("--unet_minutes", type=float, default=None, help="time cap (default 4 without --unet_steps)")
    parser.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default=None,
                        help="the UNet's objective (default: v_prediction with --trained, else the family's: "
                             "epsilon for SD 1.x and SDXL, v_prediction for SD 2.x)")
    args = parser.parse_args()
    if args.vae_from and not args.trained:
        parser.error("--vae_from needs --trained")
    if args.vae_from and not os.path.isfile(os.path.join(args.vae_from, "vae", "config.json")):
        parser.error(f"--vae_from {args.vae_from}: no vae/config.json there")
    if args.vae_from and (args.vae_steps or args.vae_minutes):
        parser.error("--vae_from takes a trained VAE: --vae_steps/--vae_minutes do not apply")
    if args.score:
        for model_dir in args.score:
            scores = score(model_dir, args.seed)
            print(f"{model_dir}: VAE held-out PSNR {scores['vae_psnr_db']:.2f} dB, UNet held-out loss {scores['unet_loss']:.4f}")
        return
    if not args.output_dir:
        parser.error("--output_dir is required (or --score)")

    if args.trained:
        vae_minutes = args.vae_minutes if args.vae_minutes or args.vae_steps else 4
        unet_minutes = args.unet_minutes if args.unet_minutes or args.unet_steps else 4
        train_base(args.output_dir, vae_minutes, unet_minutes, args.seed, args.vae_steps, args.unet_steps,
                   args.prediction_type or "v_prediction", args.family, args.vae_from)
    else:
        save_pipeline(args.output_dir, args.seed, args.prediction_type, args.family)
    if not args.skip_verify:
        name, fast = verify(args.output_dir)
        print(f"verified ({args.family}): tokenizer {name} (is_fast={fast}), 64x64 image -> 4x8x8 latents, "
              "ControlNet+UNet, 2-step ControlNet pipeline")
    print(f"{os.path.abspath(args.output_dir)}: {dir_size(args.output_dir) / 2**20:.2f} MB")


if __name__ == "__main__":
    main()
