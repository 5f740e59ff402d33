"""The training step's options: cached empty-prompt states, channels_last and torch.compile."""

import torch

import train_controlnet as tc
from conftest import assert_ok, run_cli
from test_data import tile_args
from test_train import base_args, logged_steps


def test_empty_prompt_states_are_cached_but_identical(tiny_model):
    from transformers import CLIPTextModel

    tokenizer = tc.load_tokenizer(tile_args(pretrained_model_name_or_path=tiny_model))
    text_encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    encode = tc.PromptEncoder(text_encoder, tokenizer, torch.device("cpu"))
    ids = tokenizer(["a cat", "", "a rocket at night", ""], max_length=tokenizer.model_max_length,
                    padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = text_encoder(ids, return_dict=False)[0]
        for batch in (ids, ids[[1, 3]], ids[[0, 2]]):
            expected = text_encoder(batch, return_dict=False)[0]
            assert torch.allclose(encode(batch), expected, atol=1e-6)
    assert torch.allclose(encode(ids), reference, atol=1e-6)


def test_channels_last_and_torch_compile_train(tiny_model, shards, tmp_path):
    """Both off by default; on, they train. (The eager backend exercises graph capture without a C++ compiler run.)"""
    out = str(tmp_path / "out")
    proc = run_cli(base_args(tiny_model, shards, out, max_train_steps=3, num_holdout_samples=0,
                             proportion_empty_prompts=0.5, torch_compile="eager") + ["--channels_last"], cwd=tmp_path)
    assert_ok(proc)
    assert logged_steps(out) == [1, 2, 3]
    import safetensors.torch

    assert safetensors.torch.load_file(f"{out}/diffusion_pytorch_model.safetensors")  # plain keys: no _orig_mod
