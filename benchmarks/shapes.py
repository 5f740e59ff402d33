"""The real model shapes the GPU benchmark and the memory table use, as constructor arguments (no hub access).

sd1: miniSD / SD 1.x (UNet2DConditionModel's defaults with cross_attention_dim 768, the SD VAE, CLIP ViT-L/14's
text model). sdxl: stabilityai/stable-diffusion-xl-base-1.0's unet, vae, text_encoder (CLIP ViT-L/14) and
text_encoder_2 (OpenCLIP ViT-bigG/14 with its projection), as their config.json files on the hub say.
"""

import torch

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPEN_CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                       num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SD_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)

SHAPES = {
    "sd1": dict(
        unet=dict(sample_size=32, cross_attention_dim=768),  # (320, 640, 1280, 1280), 8 heads
        vae=dict(SD_VAE, scaling_factor=0.18215),
        text_encoders=[CLIP_L],
    ),
    "sdxl": dict(
        unet=dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,  # 768 + 1280: both encoders' hidden states side by side
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280-wide pooled text embedding
        ),
        # force_upcast: the stock SDXL VAE overflows in fp16; madebyollin/sdxl-vae-fp16-fix (same shape) does not.
        vae=dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoders=[CLIP_L, dict(OPEN_CLIP_BIG_G, with_projection=True)],
    ),
}


def build(shape, device=None, text_layers=None, vae_sample_size=None):
    """-> dict of unet, vae, text_encoders (list), controlnet (ControlNetModel.from_unet), randomly initialised.
    On device="meta" nothing is allocated: the parameter count and dtypes are exact, the values absent.
    `text_layers` keeps only that many of each text encoder's layers (a faster stand-in); `vae_sample_size`
    overrides the VAE's tiling hint."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = SHAPES[shape]
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**{**spec["vae"], **({"sample_size": vae_sample_size} if vae_sample_size else {})})
        text_encoders = []
        for config in spec["text_encoders"]:
            config = dict(config)
            model_class = CLIPTextModelWithProjection if config.pop("with_projection", False) else CLIPTextModel
            if text_layers:
                config["num_hidden_layers"] = text_layers
            text_encoders.append(model_class(CLIPTextConfig(**config)).eval())
        controlnet = ControlNetModel.from_unet(unet)
    return dict(unet=unet, vae=vae, text_encoders=text_encoders, controlnet=controlnet)
