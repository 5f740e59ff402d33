"""The offline SD-2.x- and SDXL-shaped fixtures of tools/make_tiny_pipeline.py: saved as their hub families' folders,
loaded back with from_pretrained, and run one denoising step with a ControlNet made from their UNet (verify)."""

from conftest import ROOT

TRAINED_SDXL = str(ROOT / "tools" / "tiny-sdxl-trained")


def test_tiny_sdxl_is_an_sdxl_folder_that_loads_and_steps(tiny_sdxl):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
    from make_tiny_pipeline import verify

    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    # Cross-attention over both encoders' states side by side; the added embedding takes 6 time ids and the pooled
    # (projected) embedding of the second encoder.
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == (
        6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    verify(tiny_sdxl)  # ControlNet.from_unet + UNet step with added_cond_kwargs, then the SDXL ControlNet pipeline


def test_tiny_sd2_is_an_sd2_folder_that_loads_and_steps(tiny_sd2):
    from diffusers import DiffusionPipeline
    from make_tiny_pipeline import FAMILIES, verify

    path = tiny_sd2
    pipe = DiffusionPipeline.from_pretrained(path)
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.addition_embed_type is None
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder.config.hidden_act == "gelu" and pipe.tokenizer.pad_token == "!"
    wider = pipe.text_encoder.config.hidden_size
    assert wider > FAMILIES["sd1"]["text_encoders"][0]["hidden_size"] and pipe.unet.config.cross_attention_dim == wider
    verify(path)


def test_sdxl_time_ids_say_what_each_crop_really_is():
    """Original size = the source photo's, crop top-left inside the image the crop was cut from (short side 64-96 px,
    aspect up to 4:3, so offsets up to 64), target = 64 px."""
    import random

    from make_shards import load_sources
    from make_tiny_pipeline import RESOLUTION, photo_crops

    sources = load_sources()
    images, _, time_ids = photo_crops(random.Random(0), sources, 32)
    photo_sizes = {(image.height, image.width) for image, _, _ in sources}
    assert {(int(h), int(w)) for h, w in time_ids[:, :2].tolist()} <= photo_sizes
    assert len({tuple(t) for t in time_ids[:, :4].tolist()}) > 16  # per sample, not constants
    top, left = time_ids[:, 2], time_ids[:, 3]
    assert (top >= 0).all() and (left >= 0).all() and (top <= RESOLUTION).all() and (left <= RESOLUTION).all()
    assert (time_ids[:, 4:] == RESOLUTION).all() and images.shape[-2:] == (RESOLUTION, RESOLUTION)


def test_shipped_sdxl_base_has_learned_to_draw_with_its_added_conditioning(monkeypatch):
    """Its VAE is the SD base's trained one; its UNet denoises the held-out crops, and uses what SDXL adds: with
    another crop's time ids or another caption's pooled embedding its loss is clearly worse."""
    import make_tiny_pipeline as mtp
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(TRAINED_SDXL)
    images, captions, time_ids = mtp.held_out_set()
    own = mtp.held_out_denoising_loss(pipe, images, captions, time_ids)
    other_time_ids = mtp.held_out_denoising_loss(pipe, images, captions, time_ids.roll(1, 0))
    encode = mtp.encode_prompts
    monkeypatch.setattr(mtp, "encode_prompts", lambda *a: (lambda h, pooled: (h, pooled.roll(1, 0)))(*encode(*a)))
    other_pooled = mtp.held_out_denoising_loss(pipe, images, captions, time_ids)
    # Shipped: 21.70 dB; v-prediction loss 0.4211 (its UNet before training: 1.1196; another noise seed: 0.4219),
    # 0.5398 with the time ids rolled, 0.4403 with the pooled embeddings rolled.
    assert mtp.vae_psnr(pipe.vae, images) > 21.0 and own < 0.45, own
    assert other_time_ids > own + 0.05 and other_pooled > own + 0.01, (own, other_time_ids, other_pooled)
