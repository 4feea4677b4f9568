"""PixArt-alpha: a diffusion transformer (DiT blocks with cross-attention to T5 token states in every block).

How a prompt reaches the network, as diffusers' ``PixArtAlphaPipeline`` does it:
- the T5 tokenizer (no start token; ``</s>`` ends the prompt) pads to ``max_sequence_length`` = 120 tokens with
  ``<pad>``, and the encoder runs with the attention mask;
- the transformer's cross-attention gets the same mask (``encoder_attention_mask``, turned into a -10000 bias):
  padding is never attended, the end token ``</s>`` is;
- the unconditional branch encodes ``""`` (one ``</s>``) with its own mask;
- the network predicts epsilon and a variance (``out_channels`` 8 = 2 x 4, "learned sigma"): the first half is
  epsilon (``noise_pred.chunk(2, dim=1)[0]``);
- at 1024 px (``sample_size`` 128) the resolution and aspect ratio are added conditions.

Not reproduced: the pipeline's caption cleaning (``clean_caption``, which needs bs4 and ftfy) and its resolution
binning (be-bench samples at the size asked for).

In be-bench's ``context`` tensor the mask travels in the states themselves: ``encode`` sets the padded rows to
exactly zero and :meth:`PixArtTextToImage.noise_prediction` passes ``mask = any(row != 0)``. A masked key's
probability is exp(-10000) = 0 in float32 whatever its state, so the output equals the pipeline's, and a zero row
gets zero gradient, so Wen's optimisation never revives a padded position.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PixArtTransformer2DModel
from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from benchmark.models.text_to_image import TextToImage, check_pipeline_folder, ddim_from_config, load_error
from benchmark.registry import MODEL_BUILDERS, MODEL_FAMILIES

MAX_SEQUENCE_LENGTH = 120  # PixArtAlphaPipeline.__call__'s max_sequence_length

# PixArt-alpha/PixArt-XL-2-1024-MS, */config.json (the published component configs)
PIXART_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
    attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
    activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    num_embeds_ada_norm=1000,
)
PIXART_TEXT = dict(  # T5 v1.1 XXL's encoder (DeepFloyd/t5-v1_1-xxl)
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False,
)
PIXART_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
    scaling_factor=0.18215,
)
# scheduler/scheduler_config.json (DPM-Solver): DiT's linear schedule, 1000 steps
PIXART_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
REQUIRED = ("transformer", "text_encoder", "tokenizer", "scheduler", "vae")


@dataclass
class PixArtTextToImage(TextToImage):
    """PixArt-alpha: ``unet`` is the ``PixArtTransformer2DModel``, ``text_encoder`` T5's encoder. Cross-attention
    layers are named ``transformer_blocks.<k>``. ``encode`` returns (n, 120, 4096) with padded rows zero (see the
    module docstring); the end token of the BE map is ``</s>``, the prompt's last attended token."""

    family: ClassVar[str] = "PixArt-alpha"  # shadows TextToImage.family, read from the text side
    pipeline_class: ClassVar[str] = "PixArtAlphaPipeline"
    start_tokens: ClassVar[int] = 0  # T5 adds none: Wen's loss keeps no token fixed
    lacks: ClassVar[dict[str, str]] = {
        "start_token": "T5 adds no start token, so there is no attention sink whose share the entropies read",
        "attended_padding": "T5's padding is masked out of cross-attention: the network never sees it",
    }

    @property
    def max_length(self) -> int:
        return MAX_SEQUENCE_LENGTH

    def components(self) -> dict[str, object]:
        parts = super().components()
        return {"transformer": parts.pop("unet"), **parts}  # diffusers' PixArt folders keep it in transformer/

    @torch.no_grad()
    def encode(self, prompts: list[str], pad_token_id: int | None = None) -> torch.Tensor:
        """(n, 120, d): T5's states under the attention mask, padded rows set to zero. Raises ValueError for a
        ``pad_token_id``: the padding is masked, there is no attended padding to replace."""
        if pad_token_id is not None:
            raise ValueError(f"{self.model_id}: {self.lacks['attended_padding']}; no padding token to replace")
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        states = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]
        return (states * mask[..., None].to(states.dtype)).to(self.dtype)

    def network_inputs(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **conditions) -> dict:
        """The transformer's keyword arguments: the states, their mask (rows not all zero), the timestep per
        image, and at ``use_additional_conditions`` the image's resolution and aspect ratio in pixels."""
        if conditions:
            raise TypeError(f"PixArt takes its mask from the context, got {', '.join(sorted(conditions))}")
        m = len(latents)
        resolution = aspect = None
        if self.unet.use_additional_conditions:
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            h, w = (s * scale for s in latents.shape[-2:])
            resolution = torch.tensor([h, w], dtype=context.dtype, device=context.device).expand(m, -1)
            aspect = torch.tensor([h / w], dtype=context.dtype, device=context.device).expand(m, -1)
        return {"encoder_hidden_states": context, "encoder_attention_mask": (context != 0).any(-1).to(context.dtype),
                "timestep": torch.as_tensor(t, device=latents.device).reshape(-1).expand(m),
                "added_cond_kwargs": {"resolution": resolution, "aspect_ratio": aspect}}

    def noise_prediction(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                         **conditions) -> torch.Tensor:
        """Epsilon (m, c, h, w): the transformer takes the timestep as a keyword (its second positional argument
        is the text), and with learned sigma the first ``c`` output channels are epsilon."""
        out = self.unet(latents, **self.network_inputs(latents, t, context, **conditions)).sample
        if out.shape[1] == 2 * latents.shape[1]:
            out = out[:, :latents.shape[1]]
        return self.epsilon_from_output(out, latents, t)


@MODEL_FAMILIES.register("pixart-alpha", label="PixArt-alpha", pipelines=("PixArtAlphaPipeline",))
def load_pixart(source: str, use_safetensors: bool = True) -> PixArtTextToImage:
    """A PixArt-alpha pipeline folder or hub id, component by component (float32, CPU); the scheduler becomes
    DDIM (``ddim_from_config``). Raises ModelLoadError naming the folder or the component that fails."""
    path = check_pipeline_folder(source, REQUIRED, use_safetensors, "PixArt model", network="transformer")
    location = str(path) if path else source
    try:
        transformer = PixArtTransformer2DModel.from_pretrained(location, subfolder="transformer",
                                                               use_safetensors=use_safetensors)
        text_encoder = T5EncoderModel.from_pretrained(location, subfolder="text_encoder",
                                                      use_safetensors=use_safetensors)
        tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        scheduler = ddim_from_config(DDIMScheduler.load_config(location, subfolder="scheduler"))
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", use_safetensors=use_safetensors)
    except (OSError, ValueError) as err:
        raise load_error("PixArt model", source, err) from err
    return PixArtTextToImage(source, transformer.eval(), text_encoder.eval(), tokenizer, scheduler, vae.eval())


TINY_WORDS = ("a", "an", "the", "of", "photo", "painting", "portrait", "with", "and", "in", "on", "by", "art")


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5-style unigram tokenizer built in process (no download): T5's special tokens at T5's ids (``<pad>`` 0,
    ``</s>`` 1, ``<unk>`` 2), no start token, ``</s>`` appended, padding with ``<pad>``; pieces are single
    characters (word-initial and inner) and a few whole words, so any ASCII prompt tokenizes."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    chars = string.ascii_letters + string.digits
    pieces += [(c, -5.0) for c in chars + string.punctuation]
    pieces += [("\u2581" + c, -4.0) for c in chars]
    pieces += [("\u2581" + w, -1.0) for w in TINY_WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


@MODEL_BUILDERS.register("tiny-pixart", label="tiny random PixArt-alpha-like model", in_process=True,
                         scheduler=PIXART_SCHEDULER)
def tiny_pixart(seed: int = 0) -> PixArtTextToImage:
    """A seconds-fast random twin of PixArt-alpha's layout: patch-2 DiT blocks, each with cross-attention to a
    2-layer T5 encoder's states under the mask, learned sigma (8 output channels), a tiny T5 tokenizer."""
    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=4, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, caption_channels=32, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
    )
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                           relative_attention_num_buckets=8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    return PixArtTextToImage("tiny-pixart", transformer.eval(), text_encoder.eval(), tokenizer,
                             ddim_from_config(PIXART_SCHEDULER), vae.eval())


@MODEL_BUILDERS.register("pixart-architecture", label="PixArt-alpha 1024 architecture, random weights",
                         in_process=True, scheduler=PIXART_SCHEDULER)
def pixart_architecture(seed: int = 0) -> PixArtTextToImage:
    """PixArt-XL-2-1024-MS's full architecture with random weights (T5-XXL's 4.8 G parameters included), for
    speed and memory only."""
    torch.manual_seed(seed)
    return PixArtTextToImage("pixart-architecture-random", PixArtTransformer2DModel(**PIXART_TRANSFORMER).eval(),
                             T5EncoderModel(T5Config(**PIXART_TEXT)).eval(), tiny_t5_tokenizer(),
                             ddim_from_config(PIXART_SCHEDULER), AutoencoderKL(**PIXART_VAE).eval())
