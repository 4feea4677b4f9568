"""Text-to-image models: load SD-style pipelines from a folder or hub id, or build tiny ones in-process.

Every model reaches the sampler as a :class:`TextToImage`: a UNet, a text encoder with its tokenizer, a DDIM
scheduler and, for latent models, a VAE. SD v1-4, SD 2.x (epsilon at 512 px, v-prediction at 768 px) and the
planted-memorization testbed load through the same path; every network call is :meth:`TextToImage.noise_prediction`
(epsilon whatever the network predicts). Families: docs/models.md.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from benchmark.registry import MODEL_BUILDERS, MODEL_FAMILIES

# Stable Diffusion v1-4's published component configs (CompVis/stable-diffusion-v1-4, */config.json).
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
SD14_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
SD14_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
)

# Stable Diffusion 2.x's published component configs (stabilityai/stable-diffusion-2-1-base and
# stabilityai/stable-diffusion-2-1, */config.json). The UNet's layout is SD v1's; its attention_head_dim is, in
# diffusers' naming, the number of heads per block (5, 10, 20, 20: 64 channels each, where SD v1 has 8 heads
# everywhere), its transformers project in and out with linear layers, and it cross-attends to 1024-dim states.
SD2_UNET = {**SD14_UNET, "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
            "use_linear_projection": True}
SD2_768_UNET = {**SD2_UNET, "sample_size": 96, "upcast_attention": True}  # 2.1 at 768 px: fp32 attention scores
# OpenCLIP ViT-H/14's text tower as diffusers loads it: a transformers CLIPTextModel with 23 of its 24 layers (SD 2
# conditions on the penultimate layer, then the final layer norm). bos/eos/pad ids are the converted checkpoint's
# (0, 2, 1; only the pooled output would read eos_token_id, and SD 2 uses the token states); the tokenizer's ids
# (49406, 49407, pad "!" = 0) are what the prompts get.
SD2_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)
SD2_VAE = SD14_VAE  # SD v1's autoencoder (scaling factor 0.18215); the 768 checkpoint's config says sample_size 768
SD2_SCHEDULER = SD14_SCHEDULER  # 2.x base: epsilon
SD2_V_SCHEDULER = {**SD14_SCHEDULER, "prediction_type": "v_prediction"}  # 2.x at 768 px
SD2_PAD_TOKEN = "!"  # SD 2's tokenizer (tokenizer/special_tokens_map.json) pads with "!", id 0, not the end token


class ModelLoadError(RuntimeError):
    """A model folder or hub id that cannot be loaded; the message names the culprit."""


PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class TextToImage:
    """The parts of a text-to-image diffusion model that sampling and capture need.

    ``prediction_type``: what the network outputs, ``epsilon`` (SD v1, SD 2 base) or ``v_prediction`` (SD 2.1 at
    768 px); None takes it from the scheduler's config. Whatever the network predicts, the library sees epsilon:
    :meth:`noise_prediction` converts, and ``scheduler`` is kept configured for epsilon so that DDIM's update reads
    what every caller hands it. Raises ValueError for another prediction type (``sample``).

    A model family (SD v1, SDXL, PixArt-alpha: ``benchmark/models/``, docs/models.md) is a subclass: it says how
    prompts become the ``context`` the network reads, how the network is called, and which premises of the
    detectors and mitigations it lacks (``lacks``: premise -> why; a registry entry's ``needs`` names the premises
    it rests on, and an entry needing one the family lacks is "not defined" on it, never computed). ``unet`` is the
    denoising network, a UNet or a transformer."""

    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"  # model_index.json's _class_name when saved
    start_tokens: ClassVar[int] = 1  # CLIP's <|startoftext|> (BERT's [CLS]): Wen's loss leaves it unchanged
    lacks: ClassVar[dict[str, str]] = {}

    model_id: str
    unet: UNet2DConditionModel
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: DDIMScheduler
    vae: AutoencoderKL | None = None  # None: the UNet works in pixel space (the testbed)
    prediction_type: str | None = None
    # alpha-bar tables by device and dtype, made once: a host-to-device copy at every call would wait for the queue
    _alphas_cumprod: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def family(self) -> str:
        """The model family as its text side tells it, for reports: ``SD v1`` (a CLIP text encoder whose tokenizer
        pads with its end token), ``SD 2.x`` (a CLIP text encoder padding with another token, SD 2's ``!``), else
        the text encoder's class name (the testbed's MiniLM: ``BertModel``). A family subclass names itself."""
        if isinstance(self.text_encoder, CLIPTextModel):
            return "SD v1" if pads_with_end_token(self.tokenizer) else "SD 2.x"
        return type(self.text_encoder).__name__

    def __post_init__(self):
        kind = self.prediction_type or self.scheduler.config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"model {self.model_id}: prediction_type={kind!r} is not supported (one of "
                             f"{', '.join(PREDICTION_TYPES)})")
        self.prediction_type = kind
        if self.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            # the sampler steps on epsilon (noise_prediction's output); the network's own type stays on the model
            self.scheduler = type(self.scheduler).from_config(self.scheduler.config, prediction_type="epsilon")

    def network_inputs(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                       **conditions) -> dict:
        """The network's keyword arguments besides ``(latents, t)``: the family's hook for added conditions.

        SD v1 and SD 2.x cross-attend to ``context`` alone and take no conditions (TypeError naming any given). A
        family with added conditions (SDXL's pooled text embedding and time ids, a transformer's text attention
        mask) overrides this in its TextToImage subclass, mapping ``conditions`` (batched like ``context``, the
        unconditional half first in a CFG batch) to its network's arguments."""
        if conditions:
            raise TypeError(f"{type(self).__name__} ({self.model_id}) takes no added conditions, got "
                            f"{', '.join(sorted(conditions))}")
        return {"encoder_hidden_states": context}

    def noise_prediction(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                         **conditions) -> torch.Tensor:
        """Epsilon (m, c, h, w) for noisy latents ``latents`` (m, c, h, w) at timestep ``t`` (a scalar or (m,)
        tensor, or an int) under the token states ``context`` (m, tokens, dim): the one place the network is
        called (sampling, capture, the Jacobian passes, mitigation losses). ``conditions``: the family's added
        conditions (:meth:`network_inputs`). Differentiable in ``latents`` and ``context``, so autograd and
        forward-mode users (SAIL, curvature, Wen's and BE's mitigation losses) differentiate epsilon itself."""
        out = self.unet(latents, t, **self.network_inputs(latents, t, context, **conditions)).sample
        return self.epsilon_from_output(out, latents, t)

    def epsilon_from_output(self, out: torch.Tensor, latents: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The network's output as epsilon. ``v_prediction``: ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``
        with ``abar_t`` the scheduler's ``alphas_cumprod[t]`` (Salimans & Ho 2022, Sec. 4 / App. D; the
        conversion of diffusers' DDIMScheduler.step, ``pred_epsilon`` under ``v_prediction``, and of SD 2's
        ``ldm/models/diffusion/ddpm.py`` ``predict_eps_from_z_and_v``). ``epsilon``: ``out`` unchanged."""
        if self.prediction_type == "epsilon":
            return out
        source = self.scheduler.alphas_cumprod
        key = (out.device, out.dtype, id(source))  # a replaced scheduler gets its own tables
        if key not in self._alphas_cumprod:
            abar = source.double()
            self._alphas_cumprod[key] = torch.stack([abar.sqrt(), (1 - abar).sqrt()]).to(out.device, out.dtype)
        table = self._alphas_cumprod[key]  # (2, train timesteps): sqrt(abar), sqrt(1 - abar)
        # a Python int indexes without a copy; a timestep tensor is the sampler's own, already on the device
        if isinstance(t, int):
            coef = table[:, t]
        else:
            t = torch.as_tensor(t)
            # index_select, not table[:, t]: a 0-dim index would be read back as a Python int (a device sync, and
            # impossible on the meta device where runners.bench counts FLOPs)
            coef = table.index_select(1, (t if t.device == table.device else t.to(table.device)).reshape(-1).long())
        coef = coef.reshape(2, -1, *[1] * (out.ndim - 1))
        return coef[0] * out + coef[1] * latents

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def max_length(self) -> int:
        return min(self.tokenizer.model_max_length, 512)

    @property
    def context_tokens(self) -> int:
        """How many token states the network cross-attends to (77 on SD); ``encode`` may add condition rows."""
        return self.max_length

    def components(self) -> dict[str, object]:
        """The pipeline folder's parts by subfolder name (None: absent), as ``save_text_to_image`` writes them."""
        return {"unet": self.unet, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "scheduler": self.scheduler, "vae": self.vae}

    def pipeline_config(self) -> dict:
        """The family's pipeline settings that ``model_index.json`` holds beside its components (SDXL's
        ``force_zeros_for_empty_prompt``); read back by the family's loader."""
        return {}

    def not_defined(self, needs: tuple[str, ...]) -> str | None:
        """Why a detector or mitigation resting on the premises ``needs`` is not defined on this family, or None."""
        reasons = [self.lacks[n] for n in needs if n in self.lacks]
        return "; ".join(reasons) if reasons else None

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> TextToImage:
        for module in self.components().values():
            if isinstance(module, torch.nn.Module):
                # a dtype equal to the current one is left out, and so is the keyword: diffusers warns whenever
                # `dtype` is passed, even as None
                cast = {"dtype": dtype} if dtype not in (None, module.dtype) else {}
                module.to(device=device, **cast)
        return self

    def end_token_index(self, prompts: list[str]) -> torch.Tensor:
        """Index of each prompt's first end token: token ids incl. BOS and EOS minus one, capped at the last slot.

        This is the token whose final-step cross-attention map is the bright ending; the padding after it is not.
        """
        ids = self.tokenizer(prompts, truncation=True, max_length=self.max_length).input_ids
        return torch.tensor([min(len(x), self.max_length) - 1 for x in ids], dtype=torch.long)

    @torch.no_grad()
    def encode(self, prompts: list[str], pad_token_id: int | None = None) -> torch.Tensor:
        """Token states padded to the full context, as the UNet cross-attends to them (padding included).

        ``pad_token_id`` pads with that token instead of the tokenizer's (Kim & No's mitigation,
        benchmark/mitigation/padding.py); whether the encoder gets a mask stays the model's rule below."""
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        if pad_token_id is not None:
            tok["input_ids"] = tok.input_ids.masked_fill(tok.attention_mask == 0, pad_token_id)
        kwargs = {}
        # SD's CLIP encoder is run without a mask (its padding states are real end tokens), and so is any encoder
        # whose tokenizer pads with its end token; BERT-style encoders padding with [PAD] need the mask so that
        # padding positions are well defined.
        if "attention_mask" in tok and not (isinstance(self.text_encoder, CLIPTextModel)
                                            or pads_with_end_token(self.tokenizer)):
            kwargs["attention_mask"] = tok.attention_mask.to(self.device)
        out = self.text_encoder(tok.input_ids.to(self.device), **kwargs)
        return out[0].to(self.dtype)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        if self.vae is None:
            return (self.unet.config.in_channels, height, width)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.unet.config.in_channels, height // factor, width // factor)

    @torch.no_grad()
    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> images in [0, 1], (N, 3, H, W) float32 on the CPU."""
        if self.vae is None:
            x = latents
        else:
            x = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1).cpu()


def pads_with_end_token(tokenizer) -> bool:
    """Whether the tokenizer pads with its own end token (CLIP's <|endoftext|>, BERT's [SEP] when so set), as
    SD v1-4's tokenizer does: the padding copies are then real end-token states, encoded without a mask."""
    pad = tokenizer.pad_token_id
    return pad is not None and pad in {i for i in (tokenizer.sep_token_id, tokenizer.eos_token_id) if i is not None}


# ----------------------------------------------------------------------------------------------- loading

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_folder(source: str, required: tuple[str, ...], use_safetensors: bool, what: str,
                          network: str = "unet") -> Path | None:
    """A local pipeline folder, checked before any loader runs (one-line errors naming it); None for a hub id.
    ``network``: the subfolder of the denoising network, whose weights ``use_safetensors`` asks for."""
    path = Path(source).expanduser()
    if not (path.is_absolute() or source.startswith((".", "~")) or path.exists()):
        return None
    if not path.is_dir():
        raise ModelLoadError(f"{what} folder not found: {source}")
    missing = [c for c in required if not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{what} folder {source} is incomplete: missing {', '.join(missing)}/")
    if use_safetensors and not any((path / network).glob("*.safetensors")):
        raise ModelLoadError(f"{what} folder {source}: no {network}/*.safetensors (set use_safetensors=false to "
                             "allow pickle weights you trust)")
    return path


def load_error(what: str, source: str, err: Exception) -> ModelLoadError:
    """A loader's exception as one line (libraries' messages run to many)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(f"cannot load {what} {source}: {first}")


def pipeline_index(source: str) -> dict:
    """A pipeline's ``model_index.json`` (local folder or hub id); empty for a folder without one (folders written
    before the index was, e.g. by hand). Raises ModelLoadError for a missing folder or an unreachable hub id."""
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith((".", "~")) or path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model folder not found: {source}")
        index = path / "model_index.json"
        return json.loads(index.read_text()) if index.is_file() else {}
    try:
        return dict(DiffusionPipeline.load_config(source))
    except (OSError, ValueError) as err:
        raise load_error("model", source, err) from err


def load_text_to_image(source: str, *, use_safetensors: bool = True, device: str = "cpu",
                       dtype: torch.dtype = torch.float32) -> TextToImage:
    """Load a diffusers pipeline folder (local path or hub id) with the loader of its model family: the family
    (``registry.MODEL_FAMILIES``) whose ``pipelines`` name the index's ``_class_name``; SD's for any other.
    Raises ModelLoadError naming the folder or component that cannot be loaded."""
    name = pipeline_index(source).get("_class_name")
    family = next((f for f in MODEL_FAMILIES.entries() if name in f.pipelines), MODEL_FAMILIES["sd"])
    return family(source, use_safetensors).to(device, dtype)


def ddim_from_config(config: dict) -> DDIMScheduler:
    """DDIM with the noise schedule of a pipeline's scheduler config. Settings DDIM has and the config lacks (a
    DPM-Solver or Euler config: PixArt-alpha's, SDXL's) take SD's latent-model values, not DDIM's defaults:
    ``clip_sample`` False (clipping x0 to [-1, 1] is for pixel models) and ``set_alpha_to_one`` False."""
    return DDIMScheduler.from_config({"clip_sample": False, "set_alpha_to_one": False, **dict(config)})


@MODEL_FAMILIES.register("sd", label="Stable Diffusion (v1, v2)", pipelines=("StableDiffusionPipeline",))
def load_sd_pipeline(source: str, use_safetensors: bool = True) -> TextToImage:
    """An SD-style pipeline component by component (float32, CPU).

    Loading components rather than ``StableDiffusionPipeline`` lets a pixel-space model (no VAE) or any
    transformers text encoder use the same path as SD v1-4. The scheduler is always turned into DDIM.
    """
    path = check_pipeline_folder(source, REQUIRED, use_safetensors, "model")
    # hub SD checkpoints always ship a VAE; a missing one fails below with the hub's message
    has_vae = path is None or (path / "vae").is_dir()
    location = str(path) if path else source
    try:
        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", use_safetensors=use_safetensors)
        text_encoder = AutoModel.from_pretrained(location, subfolder="text_encoder", use_safetensors=use_safetensors)
        tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(location, subfolder="scheduler")
        vae = (AutoencoderKL.from_pretrained(location, subfolder="vae", use_safetensors=use_safetensors)
               if has_vae else None)
    except (OSError, ValueError) as err:
        raise load_error("model", source, err) from err
    return TextToImage(source, unet, text_encoder.eval(), tokenizer, scheduler, vae.eval() if vae else None)


NETWORK_FOLDERS = ("unet", "transformer")  # where a pipeline keeps its denoising network


def weights_fingerprint(source: str | Path) -> str:
    """A short hash of a local folder's denoising network (``unet/``, or a transformer's ``transformer/``: config,
    weight file sizes and first MiB): traces of different weights under one model name must not mix. Empty for a
    hub id or a model built in-process."""
    unet = next((Path(source).expanduser() / name for name in NETWORK_FOLDERS
                 if (Path(source).expanduser() / name).is_dir()), None)
    if unet is None:
        return ""
    digest = hashlib.sha1()
    for path in sorted(unet.iterdir()):
        if path.suffix in (".json", ".safetensors", ".bin"):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
            with path.open("rb") as f:
                digest.update(f.read(1 << 20))
    return digest.hexdigest()[:10]


# ------------------------------------------------------------------------------------------ tokenizers

CLIP_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def clip_vocabulary_file() -> Path:
    """CLIP's BPE vocabulary, shipped with be-bench (``benchmark/models/clip_vocab/``: OpenAI CLIP's file, MIT
    License)."""
    return Path(__file__).parent / "clip_vocab" / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and BPE merges (SD v1-4's tokenizer), rebuilt from the BPE file the way CLIP does."""
    lines = gzip.open(clip_vocabulary_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    byte_chars = _bytes_to_unicode()
    vocab = list(byte_chars) + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP's reversible byte -> printable character table, in CLIP's order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's BPE tokenizer (77 tokens), built offline: SD v1-4's, padding with the end token, by default; SD 2's
    (OpenCLIP ViT-H/14 uses the same vocabulary) with ``pad_token=SD2_PAD_TOKEN``."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token=pad_token)


# -------------------------------------------------------------------------------------- in-process models

@MODEL_BUILDERS.register("tiny", label="tiny random SD-like model", in_process=True,
                         scheduler=SD14_SCHEDULER)
def tiny_text_to_image(seed: int = 0, latent: bool = True) -> TextToImage:
    """A seconds-fast random model with SD v1-4's block and attention naming (cross-attention in down_blocks.0).

    Uses the real CLIP tokenizer so end-token positions match SD v1-4's.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4 if latent else 3, out_channels=4 if latent else 3, layers_per_block=1,
        block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    vae = None
    if latent:
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=8, sample_size=16)
    scheduler = DDIMScheduler(**SD14_SCHEDULER)
    return TextToImage("tiny", unet.eval(), text_encoder.eval(), clip_tokenizer(), scheduler,
                       vae.eval() if vae else None)


@MODEL_BUILDERS.register("sd14-architecture", label="SD v1-4 architecture, random weights", in_process=True,
                         scheduler=SD14_SCHEDULER)
def sd14_architecture(seed: int = 0, with_vae: bool = True) -> TextToImage:
    """SD v1-4's full architecture with random weights, for speed and memory measurements only."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD14_UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
    vae = AutoencoderKL(**SD14_VAE, scaling_factor=0.18215) if with_vae else None
    return TextToImage("sd14-architecture-random", unet.eval(), text_encoder.eval(), clip_tokenizer(),
                       DDIMScheduler(**SD14_SCHEDULER), vae.eval() if vae else None)


def _sd2_twin(model_id: str, scheduler: dict, seed: int) -> TextToImage:
    torch.manual_seed(seed)
    # SD 2's layout in miniature: four levels, two layers per block (16 cross-attention layers, the same names as
    # SD 2's), heads per block doubling as SD 2's 5-10-20-20 do (8 channels each), linear projections
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 64, 64),
        cross_attention_dim=32, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True, norm_num_groups=8,
        down_block_types=SD2_UNET["down_block_types"], up_block_types=SD2_UNET["up_block_types"],
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**SD2_TEXT, "hidden_size": 32, "intermediate_size": 64,
                                                   "num_hidden_layers": 2, "num_attention_heads": 4,
                                                   "projection_dim": 16}))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    return TextToImage(model_id, unet.eval(), text_encoder.eval(), clip_tokenizer(SD2_PAD_TOKEN),
                       DDIMScheduler(**scheduler), vae.eval())


@MODEL_BUILDERS.register("tiny-sd2", label="tiny random SD 2 twin (epsilon)", in_process=True,
                         scheduler=SD2_SCHEDULER)
def tiny_sd2(seed: int = 0) -> TextToImage:
    """A seconds-fast random twin of SD 2.x base (epsilon): SD 2's layer layout and names, per-block head counts,
    linear projections, a CLIPTextModel with SD 2's settings and SD 2's tokenizer (padding with ``!``)."""
    return _sd2_twin("tiny-sd2", SD2_SCHEDULER, seed)


@MODEL_BUILDERS.register("tiny-sd2-v", label="tiny random SD 2.1 twin (v-prediction)", in_process=True,
                         scheduler=SD2_V_SCHEDULER)
def tiny_sd2_v(seed: int = 0) -> TextToImage:
    """The SD 2 twin as SD 2.1 at 768 px is: a v-prediction network (``TextToImage.noise_prediction`` gives eps)."""
    return _sd2_twin("tiny-sd2-v", SD2_V_SCHEDULER, seed)


@MODEL_BUILDERS.register("sd2-architecture", label="SD 2.1 (768, v) architecture, random weights", in_process=True,
                         scheduler=SD2_V_SCHEDULER)
def sd2_architecture(seed: int = 0, with_vae: bool = True, v_prediction: bool = True) -> TextToImage:
    """SD 2.x's full architecture with random weights: SD 2.1 at 768 px (v-prediction, upcast attention), or with
    ``v_prediction=False`` SD 2.1 base (512 px, epsilon). For speed, memory and folder-loading tests only."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(SD2_768_UNET if v_prediction else SD2_UNET))
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD2_TEXT))
    vae = AutoencoderKL(**SD2_VAE, scaling_factor=0.18215) if with_vae else None
    scheduler = DDIMScheduler(**(SD2_V_SCHEDULER if v_prediction else SD2_SCHEDULER))
    return TextToImage("sd2-architecture-random", unet.eval(), text_encoder.eval(), clip_tokenizer(SD2_PAD_TOKEN),
                       scheduler, vae.eval() if vae else None)


def save_text_to_image(model: TextToImage, folder: str | Path) -> Path:
    """Write a model as a diffusers pipeline folder (safetensors) that :func:`load_text_to_image` reads."""
    folder = Path(folder)
    # the scheduler as the network was trained: TextToImage keeps its own set to epsilon (noise_prediction's output)
    scheduler = type(model.scheduler).from_config(model.scheduler.config, prediction_type=model.prediction_type)
    parts = {**model.components(), "scheduler": scheduler}
    index = {"_class_name": model.pipeline_class, **model.pipeline_config()}
    for name, part in parts.items():
        if part is None:
            continue
        part.save_pretrained(folder / name)
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def get_model(source: str, device: str = "cpu", dtype: str = "float32", use_safetensors: bool = True,
              build: str | None = None) -> TextToImage:
    """A model: a ``source`` naming an in-process builder (``tiny``, ``sd14-architecture``) is built here;
    otherwise ``source`` is a pipeline folder or hub id, and with ``build`` (a registered model builder, e.g.
    ``testbed``) a missing folder is assembled or trained first."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    builder = MODEL_BUILDERS.get(source)
    if builder is not None and builder.in_process:
        model = builder()
    elif build is not None:
        entry = MODEL_BUILDERS.get(build)
        if entry is None or entry.in_process:
            folders = [n for n in MODEL_BUILDERS if not MODEL_BUILDERS[n].in_process]
            raise ValueError(f"unknown model build {build!r} (one of {', '.join(folders)})")
        model = load_text_to_image(str(entry(source)), use_safetensors=use_safetensors)
    else:
        model = load_text_to_image(source, use_safetensors=use_safetensors)
    return model.to(device, DTYPES[dtype])
