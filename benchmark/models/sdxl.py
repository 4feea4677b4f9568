"""SDXL base (1024 px): two CLIP text encoders whose penultimate states are concatenated, and the second encoder's
pooled embedding with the size and crop "time ids" as added conditions of a ``text_time`` UNet.

How a prompt reaches the UNet, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and ``__call__`` do it:
- each tokenizer pads to 77 tokens (``tokenizer``: CLIP ViT-L's, padding with the end token; ``tokenizer_2``:
  OpenCLIP ViT-bigG's, padding with ``!``); both share CLIP's BPE vocabulary, so a prompt's tokens and its first
  end token sit at the same positions in both;
- the context is ``cat(h1[-2], h2[-2])`` on the feature axis (768 + 1280 = 2048): the penultimate layer of each
  encoder (``hidden_states[-2]``);
- the pooled embedding is the second encoder's projected end-token state (``text_embeds``, 1280);
- the time ids are ``original_size + crop_top_left + target_size`` = (H, W, 0, 0, H, W) in pixels;
- the unconditional branch is all zeros (context and pooled) when ``force_zeros_for_empty_prompt`` (SDXL base's
  ``model_index.json``: true) and no negative prompt is given, which is how be-bench samples.

In be-bench's ``context`` tensor the pooled embedding travels as one extra row after the 77 token rows (zero-padded
to the context width), so that every caller that batches, expands or optimises the prompt embedding handles it
unchanged; :meth:`SDXLTextToImage.network_inputs` splits it off before the UNet call, so the recorder and every
trace see exactly the 77 token states.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from benchmark.models.text_to_image import (
    SD2_PAD_TOKEN,
    SD14_SCHEDULER,
    TextToImage,
    check_pipeline_folder,
    clip_tokenizer,
    ddim_from_config,
    load_error,
)
from benchmark.registry import MODEL_BUILDERS, MODEL_FAMILIES

# stabilityai/stable-diffusion-xl-base-1.0, */config.json (the published component configs)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280 pooled embedding
)
SDXL_TEXT = dict(  # text_encoder: CLIP ViT-L/14, as SD v1's
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
SDXL_TEXT_2 = dict(  # text_encoder_2: OpenCLIP ViT-bigG/14 with its projection
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
    scaling_factor=0.13025, force_upcast=True,
)
# scheduler/scheduler_config.json (EulerDiscrete): SD v1's training schedule, with "leading" spacing
SDXL_SCHEDULER = dict(SD14_SCHEDULER, timestep_spacing="leading")
REQUIRED = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "vae")


@dataclass
class SDXLTextToImage(TextToImage):
    """SDXL: ``text_encoder``/``tokenizer`` are CLIP ViT-L's, ``text_encoder_2``/``tokenizer_2`` OpenCLIP
    bigG's (with projection). ``encode`` returns (n, 77 + 1, 2048): the concatenated token states, then the pooled
    embedding as a row (see the module docstring). The end token of the BE map is the first end token, at the same
    position in both tokenizers (``end_token_index`` reads ``tokenizer``)."""

    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: object = None
    force_zeros_for_empty_prompt: bool = True

    family: ClassVar[str] = "SDXL"  # shadows TextToImage.family, read from the text side
    pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"

    def __post_init__(self):
        super().__post_init__()
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            raise ValueError(f"SDXL model {self.model_id} needs text_encoder_2 and tokenizer_2")
        width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        if self.pooled_dim > width:
            raise ValueError(f"SDXL model {self.model_id}: pooled embedding ({self.pooled_dim}) wider than the "
                             f"context ({width})")

    @property
    def pooled_dim(self) -> int:
        return self.text_encoder_2.config.projection_dim

    def components(self) -> dict[str, object]:
        return {**super().components(), "text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2}

    def pipeline_config(self) -> dict:
        return {"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}

    @torch.no_grad()
    def encode(self, prompts: list[str], pad_token_id: int | None = None) -> torch.Tensor:
        """(n, 78, d1 + d2): rows 0..76 the token states ``cat(h1[-2], h2[-2])``, row 77 the pooled embedding
        (zero-padded). The empty prompt is all zeros when ``force_zeros_for_empty_prompt`` (SDXL's unconditional
        branch). ``pad_token_id`` pads both tokenizers' padding with that token (Kim & No's ``pad_replace``;
        ``tokenizer_2`` already pads with ``!``)."""
        states, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                            return_tensors="pt")
            ids = tok.input_ids
            if pad_token_id is not None:
                ids = ids.masked_fill(tok.attention_mask == 0, pad_token_id)
            out = encoder(ids.to(self.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected end-token state (text_embeds)
        context = torch.cat(states, dim=-1)
        pooled = F.pad(pooled, (0, context.shape[-1] - pooled.shape[-1]))
        context = torch.cat([context, pooled[:, None]], dim=1)
        if self.force_zeros_for_empty_prompt:
            context[torch.tensor([p == "" for p in prompts], device=context.device)] = 0
        return context.to(self.dtype)

    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def network_inputs(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **conditions) -> dict:
        """The UNet's arguments from ``context`` (m, 78, d): the 77 token states, the pooled embedding (its last
        row) and the time ids (H, W, 0, 0, H, W) of an image of the latents' size (``_get_add_time_ids``)."""
        if conditions:
            raise TypeError(f"SDXL takes its added conditions from the context, got {', '.join(sorted(conditions))}")
        h, w = (s * self.vae_scale() for s in latents.shape[-2:])
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=context.dtype, device=context.device)
        return {"encoder_hidden_states": context[:, :-1],
                "added_cond_kwargs": {"text_embeds": context[:, -1, :self.pooled_dim],
                                      "time_ids": time_ids.expand(len(context), -1)}}

    @torch.no_grad()
    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """As SD's, but SDXL's VAE overflows in float16 (``force_upcast``): it decodes in float32, as the
        pipeline does."""
        if self.vae is None or not self.vae.config.get("force_upcast", False) or self.vae.dtype == torch.float32:
            return super().to_images(latents)
        dtype = self.vae.dtype
        self.vae.to(torch.float32)
        try:
            return super().to_images(latents.float())
        finally:
            self.vae.to(dtype)


@MODEL_FAMILIES.register("sdxl", label="SDXL", pipelines=("StableDiffusionXLPipeline",))
def load_sdxl(source: str, use_safetensors: bool = True) -> SDXLTextToImage:
    """An SDXL pipeline folder or hub id, component by component (float32, CPU); the scheduler becomes DDIM
    (``ddim_from_config``). Raises ModelLoadError naming the folder or the component that fails."""
    path = check_pipeline_folder(source, REQUIRED, use_safetensors, "SDXL model")
    location = str(path) if path else source
    try:
        index = UNet2DConditionModel.load_config(location, subfolder="unet")
        if index.get("addition_embed_type") != "text_time":
            raise ValueError(f"unet has addition_embed_type={index.get('addition_embed_type')!r}, SDXL's is "
                             "'text_time'")
        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", use_safetensors=use_safetensors)
        text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder",
                                                     use_safetensors=use_safetensors)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(location, subfolder="text_encoder_2",
                                                                     use_safetensors=use_safetensors)
        tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        tokenizer_2 = AutoTokenizer.from_pretrained(location, subfolder="tokenizer_2")
        scheduler = ddim_from_config(DDIMScheduler.load_config(location, subfolder="scheduler"))
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", use_safetensors=use_safetensors)
        pipeline = DiffusionPipeline.load_config(location)
    except (OSError, ValueError) as err:
        raise load_error("SDXL model", source, err) from err
    return SDXLTextToImage(source, unet, text_encoder.eval(), tokenizer, scheduler, vae.eval(),
                           text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2,
                           force_zeros_for_empty_prompt=bool(pipeline.get("force_zeros_for_empty_prompt", True)))


def sdxl_tokenizers() -> tuple[object, object]:
    """SDXL's two tokenizers, built offline: CLIP's BPE both, the first padding with its end token, the second
    with ``!`` (OpenCLIP's convention, as SDXL's ``tokenizer_2/special_tokens_map.json``)."""
    return clip_tokenizer(), clip_tokenizer(SD2_PAD_TOKEN)  # OpenCLIP pads with "!", in SD 2 as in SDXL


@MODEL_BUILDERS.register("tiny-sdxl", label="tiny random SDXL-like model", in_process=True,
                         scheduler=SDXL_SCHEDULER)
def tiny_sdxl(seed: int = 0) -> SDXLTextToImage:
    """A seconds-fast random twin of SDXL's layout: no cross-attention in the highest-resolution blocks
    (``down_blocks.0``, ``up_blocks.2``), two transformer blocks per attention in ``down_blocks.1`` as SDXL has,
    two text encoders (16 + 32 wide, the second with a 32-wide projection), text-time added conditions, SDXL's
    real tokenizers."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=SDXL_UNET["down_block_types"], up_block_types=SDXL_UNET["up_block_types"],
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=48,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
    )
    common = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, num_attention_heads=2, projection_dim=16, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, num_attention_heads=4,
                                                                projection_dim=32, hidden_act="gelu", **common))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32, scaling_factor=SDXL_VAE["scaling_factor"])
    tokenizer, tokenizer_2 = sdxl_tokenizers()
    return SDXLTextToImage("tiny-sdxl", unet.eval(), text_encoder.eval(), tokenizer,
                           ddim_from_config(SDXL_SCHEDULER), vae.eval(), text_encoder_2=text_encoder_2.eval(),
                           tokenizer_2=tokenizer_2)


@MODEL_BUILDERS.register("sdxl-architecture", label="SDXL base architecture, random weights", in_process=True,
                         scheduler=SDXL_SCHEDULER)
def sdxl_architecture(seed: int = 0) -> SDXLTextToImage:
    """SDXL base's full architecture with random weights (about 3.5 G parameters), for speed and memory only."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = sdxl_tokenizers()
    return SDXLTextToImage("sdxl-architecture-random", UNet2DConditionModel(**SDXL_UNET).eval(),
                           CLIPTextModel(CLIPTextConfig(**SDXL_TEXT)).eval(), tokenizer,
                           ddim_from_config(SDXL_SCHEDULER), AutoencoderKL(**SDXL_VAE).eval(),
                           text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)).eval(),
                           tokenizer_2=tokenizer_2)
