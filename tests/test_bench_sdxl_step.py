"""benchmarks/bench_gpu.py --shape sdxl times the trainer's SDXL step through benchmarks/common.py (setup,
make_batches, project_step). Its GPU run cannot happen here; the same path on the tiny SDXL pipeline on the CPU shows
that what it times is the trainer's SDXL step: both encoders, pooled embeddings and time ids reach the models, the
frozen UNet is checkpointed, and the ControlNet learns."""

import sys

import torch
from accelerate import Accelerator

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from common import make_batches, project_step, setup, tc, trainer_args  # noqa: E402


def test_benchmark_step_is_the_trainers_sdxl_step(tiny_sdxl):
    args = trainer_args(f"--pretrained_model_name_or_path={tiny_sdxl}", "--resolution=64", "--gradient_checkpointing",
                        "--learning_rate=1e-3")
    args.family = "sdxl"
    models, tokenizer = tc.load_models(args), tc.load_tokenizers(args)
    s = setup(models, tokenizer, Accelerator(cpu=True), args)
    assert s.unet.is_gradient_checkpointing and s.controlnet.is_gradient_checkpointing
    batches = make_batches(2, 2, 64, tokenizer)
    assert batches[0]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    received = []
    hook = s.unet.register_forward_pre_hook(lambda m, a, kw: received.append(kw["added_cond_kwargs"]),
                                            with_kwargs=True)
    before = [p.detach().clone() for p in s.controlnet.parameters()]
    try:
        project_step(s, batches[0])
    finally:
        hook.remove()
    assert received[0]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert received[0]["text_embeds"].shape == (2, s.text_encoder[1].config.projection_dim)
    assert any(not torch.equal(a, b) for a, b in zip(before, s.controlnet.parameters()))
