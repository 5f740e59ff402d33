"""SDXL- and SD-2.x-shaped bases through the same trainer: the family read from the base's UNet config, SDXL's two
text encoders, pooled embeddings and per-sample time ids reaching the ControlNet and the UNet, exact resume, two
ranks, validation through StableDiffusionXLControlNetPipeline, and learning on the shipped tiny SDXL base."""

import io
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_controlnet as tc
from conftest import ROOT, assert_ok, run_cli
from test_train import base_args
from test_upscale import write_image

TRAINED_SDXL = str(ROOT / "tools" / "tiny-sdxl-trained")
VALIDATION = ["--validation_image", str(ROOT / "conditioning_image_1.png"), "--validation_prompt", "a dog",
              "--num_validation_images=1"]


def weights(path):
    return load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def straight_and_resumed(model, shards, tmp_path, extra=(), steps=4, **flags):
    """`steps` steps in one run, and the same in two runs (the second resuming from the first's checkpoint)."""
    def run(out, until, more=()):
        args = base_args(model, shards, str(out), max_train_steps=until, checkpointing_steps=steps // 2,
                         resume_from_checkpoint="latest", learning_rate=1e-3, **flags)
        proc = run_cli(args + list(extra) + list(more), cwd=tmp_path)
        assert_ok(proc)
        return proc

    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight, steps, VALIDATION + ["--validation_steps", str(steps // 2)])  # validation draws nothing of training's
    run(split, steps // 2)
    resumed = run(split, steps)
    assert "Resuming from checkpoint" in resumed.log
    return straight, split


def upscales(base, controlnet_dir, tmp_path):
    """upscale.py's command on what the trainer wrote: several tiles, a start image and a stochastic sampler."""
    import upscale as up

    low_res, start, output = tmp_path / "low.png", tmp_path / "start.png", tmp_path / "x4.png"
    write_image(low_res, 20, 24)
    write_image(start, 80, 96, seed=1)
    up.main(up.parse_args(["--pretrained_model_name_or_path", base, "--controlnet_model_name_or_path",
                           str(controlnet_dir), "--input", str(low_res), "--output", str(output), "--init_image",
                           str(start), "--strength", "0.5", "--scheduler", "euler_ancestral",
                           "--num_inference_steps", "2", "--device", "cpu"]))
    result = np.asarray(Image.open(output))
    assert result.shape == (96, 80, 3) and result.std() > 1


def test_sdxl_trains_validates_resumes_exactly_and_upscales(tiny_sdxl, shards, tmp_path):
    """With half the captions empty and gradient checkpointing (the UNet's too): a checkpoint, validation images from
    the SDXL ControlNet pipeline, the family in tile_config.json and the model card; 4 steps straight = 2 + 2; the
    trained model upscales."""
    straight, split = straight_and_resumed(tiny_sdxl, shards, tmp_path, ["--gradient_checkpointing"],
                                           proportion_empty_prompts=0.5)
    assert sorted(os.listdir(straight / "validation")) == ["final-000004.png", "step-000002.png"]
    assert (straight / "checkpoint-2" / "controlnet" / "config.json").is_file()
    with open(straight / "tile_config.json") as f:
        assert json.load(f)["family"] == "sdxl"
    card = (straight / "README.md").read_text()
    assert "Stable Diffusion XL" in card and "stable-diffusion-xl" in card
    a, b = weights(straight), weights(split)
    assert max_difference(a, b) == 0.0  # bit for bit: data, noise, timesteps, time ids and moments alike
    assert max_difference(a, weights(split / "checkpoint-2" / "controlnet")) > 0
    upscales(tiny_sdxl, straight, tmp_path)


def test_sd2_trains_resumes_exactly_and_upscales(tiny_sd2, shards, tmp_path):
    """SD-2.x shape (linear projections, per-block heads, v-prediction, a wider OpenCLIP-style encoder): the SD path."""
    straight, split = straight_and_resumed(tiny_sd2, shards, tmp_path)
    with open(straight / "tile_config.json") as f:
        assert json.load(f)["family"] == "sd"
    assert max_difference(weights(straight), weights(split)) == 0.0
    assert max_difference(weights(split), weights(split / "checkpoint-2" / "controlnet")) > 0
    upscales(tiny_sd2, split / "checkpoint-2", tmp_path)  # a checkpoint folder upscales too


def test_sdxl_two_gloo_ranks(tiny_sdxl, shards, tmp_path):
    out = str(tmp_path / "out")
    proc = run_cli(base_args(tiny_sdxl, shards, out, max_train_steps=2, checkpointing_steps=2, logging_steps=2),
                   cwd=tmp_path, num_processes=2, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert_ok(proc)
    assert "Num processes: 2" in proc.log
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "random_states_1.pkl"))
    assert os.path.isfile(os.path.join(out, "diffusion_pytorch_model.safetensors"))


def jpeg_sample(width, height, meta=None, key="k"):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="JPEG")
    sample = {"__key__": key, "jpg": buffer.getvalue(), "txt": b"a photo"}
    if meta is not None:
        sample["json"] = json.dumps(meta).encode()
    return sample


def test_time_ids_are_the_samples_original_size_crop_and_target(tiny_sdxl):
    """(original h, w, crop top, left, target h, w): the json's original size, else the stored file's (not the
    smaller size a JPEG draft decodes), and the crop's top-left in the image resized to a 64 px short side."""
    args = tc.make_parser().parse_args(["--resolution=64", "--condition_resolution=16"])
    tokenizers = [tc.load_tokenizer(tc.make_parser().parse_args([f"--pretrained_model_name_or_path={tiny_sdxl}"]), t)
                  for t in ("tokenizer", "tokenizer_2")]
    # 512x256 stored, decoded at 1/4 (128x64) by the draft: the square is 64 px of 128, at a drawn left offset.
    for meta, original in (({"original_width": 2048, "original_height": 1024}, (1024, 2048)), (None, (256, 512))):
        lefts = set()
        for seed in range(6):
            rng = random.Random(seed)
            pair = tc.make_tile_pair(jpeg_sample(512, 256, meta), tokenizers, args, rng=rng)
            replay = random.Random(seed)
            replay.random()  # the caption drop's draw comes first
            left = replay.randint(0, 128 - 64)
            assert pair["time_ids"].tolist() == [*original, 0, left, 64, 64]
            lefts.add(left)
            assert pair["input_ids"].shape == pair["input_ids_2"].shape == (77,)
        assert len(lefts) > 1
    # Portrait, 300x600 stored (decoded 75x150), held-out (centred): top = (600 - 300) / 2 x 64 / 300 = 32.
    pair = tc.make_tile_pair(jpeg_sample(300, 600), tokenizers, args)
    assert pair["time_ids"].tolist() == [600, 300, 32, 0, 64, 64]


def test_the_controlnet_and_unet_receive_the_batchs_time_ids_and_pooled_embeddings(tiny_sdxl):
    """What train_step hands the models: each sample's own time ids and the second encoder's pooled embedding of its
    caption; the empty captions' cached states and pooled embeddings equal a fresh encoding of ''."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parse = tc.make_parser().parse_args
    args = parse([f"--pretrained_model_name_or_path={tiny_sdxl}", "--resolution=64", "--condition_resolution=16",
                  "--train_shards_path_or_url=x", "--max_train_steps=1"])
    args.family = "sdxl"
    tokenizers = tc.load_tokenizers(args)
    encoders = torch.nn.ModuleList([CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
                                    CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")])
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet)
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(tiny_sdxl, subfolder="scheduler")
    captions = ["a cat", "", "a rocket at night", ""]
    samples = [jpeg_sample(96 + 16 * i, 80, {"original_width": 1000 + i, "original_height": 700 - i}, f"k{i}")
               for i in range(4)]
    pairs = []
    for sample, caption in zip(samples, captions):
        sample["txt"] = caption.encode()
        pairs.append(tc.make_tile_pair(sample, tokenizers, args, rng=random.Random(len(pairs))))
    batch = tc.collate_fn(pairs)
    assert batch["time_ids"][:, :2].tolist() == [[700 - i, 1000 + i] for i in range(4)]  # (h, w) from each json
    assert len(set(batch["time_ids"][:, 3].tolist())) > 1  # each crop's own left offset

    seen = {}
    for name, model in (("unet", unet), ("controlnet", controlnet)):
        model.register_forward_pre_hook(lambda m, a, kw, name=name: seen.__setitem__(name, kw["added_cond_kwargs"]),
                                        with_kwargs=True)
    encode = tc.PromptEncoder(encoders, tokenizers, torch.device("cpu"))
    with torch.no_grad():
        pixel_values, conditions = tc.model_inputs(batch, args, torch.device("cpu"))
        states, added = tc.prompt_conditioning(batch, encode, torch.device("cpu"))
        tc.controlnet_loss(vae, unet, controlnet, scheduler, pixel_values, conditions, states, torch.float32,
                           added_cond_kwargs=added)
        fresh = [e(tc.token_ids(t, captions), output_hidden_states=True) for e, t in zip(encoders, tokenizers)]
    for name in ("unet", "controlnet"):
        assert torch.equal(seen[name]["time_ids"], batch["time_ids"]), name
        assert torch.allclose(seen[name]["text_embeds"], fresh[1].text_embeds, atol=1e-6), name
    assert torch.allclose(states, torch.cat([f.hidden_states[-2] for f in fresh], -1), atol=1e-6)
    assert encode.empty_states[0].shape[-1] == unet.config.cross_attention_dim


def test_controlnet_of_another_family_is_refused(tiny_sdxl, tiny_model):
    read = tc.read_model_config
    sdxl_unet, sd_unet = read(tiny_sdxl, "unet"), read(tiny_model, "unet")
    sdxl_controlnet = {**sdxl_unet, "_class_name": "ControlNetModel"}
    assert tc.controlnet_mismatch(sdxl_controlnet, sdxl_unet) is None
    assert "Stable Diffusion XL ControlNet" in tc.controlnet_mismatch(sdxl_controlnet, sd_unet)
    assert "is Stable Diffusion XL" in tc.controlnet_mismatch({**sd_unet, "_class_name": "ControlNetModel"}, sdxl_unet)


STEPS = 120


def test_controlnet_learns_on_the_trained_tiny_sdxl_base(shards, tmp_path):
    """The shipped tiny SDXL base, which was trained on its crops' own time ids and pooled embeddings: a short run
    comes to use its condition, the held-out gap growing from exactly 0."""
    out = str(tmp_path / "out")
    proc = run_cli(base_args(TRAINED_SDXL, shards, out, max_train_steps=STEPS, train_batch_size=8, learning_rate=1e-3,
                             lr_warmup_steps=0, logging_steps=STEPS // 2, validation_steps=STEPS // 2,
                             checkpointing_steps=1000, num_holdout_samples=8, dataloader_num_workers=1), cwd=tmp_path,
                   timeout=900)
    assert_ok(proc)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    held = [r for r in rows if "holdout/condition_gap" in r]
    gaps = [r["holdout/condition_gap"] for r in held]
    assert [r["step"] for r in held] == [0, STEPS // 2, STEPS], held
    # Measured here: gap +0.000 -> +0.34 (step 60) -> +0.71 (step 120); condition PSNR 16.57 -> 17.61 dB against a
    # rolled control of 13.16 dB.
    assert gaps[0] == 0.0 and 0.1 < gaps[1] < gaps[2] and gaps[2] > 0.3, gaps
    start, end = held[0], held[-1]
    assert end["holdout/condition_psnr"] > end["holdout/condition_psnr_rolled"] + 2.0, end
    assert end["holdout/condition_psnr"] > start["holdout/condition_psnr"], held
