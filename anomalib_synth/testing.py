"""Test helpers that ship with the package: tiny random-weight Stable Diffusion, CLIP and BLIP-2 models, built in
code and saved with ``save_pretrained``.

They exist so that every diffusion synthesizer can be exercised offline, on CPU, through the same public
``from_pretrained`` loading path as the real weights (the way diffusers tests its pipelines). Their images are noise:
they prove the mechanics (shapes, masks, losses, gradients, call counts), never image quality.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     paths = save_tiny_models(tmp)
...     sorted(paths)
['blip2', 'clip', 'sd', 'sd-inpainting']
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

__all__ = ["TINY_IMAGE_SIZE", "save_tiny_models", "tiny_tokenizer"]

TINY_IMAGE_SIZE = 32
"""Native resolution of the tiny models (VAE factor 2, latent 16x16, cross-attention at 16x16 and 8x8)."""


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for the bytes 0-255 (GPT-2 / CLIP convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_tokenizer(model_max_length: int = 77):
    """A byte-level ``CLIPTokenizer`` without merges: every character is a token, so words span several tokens."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for symbol in _byte_symbols():
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    # through files, which every supported transformers reads (4.x wants file paths, 5.x also takes the dicts)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def _unet(in_channels: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=TINY_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
    )


def _text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )  # fmt: skip


def save_tiny_models(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build tiny random models and save them under ``root``.

    Returns:
        dict[str, Path]: ``"sd"`` (a Stable Diffusion pipeline folder), ``"sd-inpainting"`` (its 9-channel
        inpainting variant), ``"clip"`` (a ``CLIPModel`` with tokenizer and image processor) and ``"blip2"`` (a
        ``Blip2ForImageTextRetrieval`` with a BERT tokenizer).
    """
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        return _build_and_save(Path(root), seed)


def _build_and_save(root: Path, seed: int) -> dict[str, Path]:
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPVisionConfig

    torch.manual_seed(seed)  # the diffusers/transformers constructors draw their initial weights from the global RNG
    tokenizer = tiny_tokenizer()
    text_config = _text_config(len(tokenizer))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    vae = _vae()
    text_encoder = CLIPTextModel(text_config)
    paths = {"sd": root / "sd", "sd-inpainting": root / "sd-inpainting", "clip": root / "clip", "blip2": root / "blip2"}
    for key, pipeline_cls, in_channels in (
        ("sd", StableDiffusionPipeline, 4),
        ("sd-inpainting", StableDiffusionInpaintPipeline, 9),
    ):
        pipeline = pipeline_cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=_unet(in_channels),
                                scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False)  # fmt: skip
        pipeline.save_pretrained(paths[key])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=16)  # fmt: skip
    clip = CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    clip.save_pretrained(paths["clip"])
    tokenizer.save_pretrained(paths["clip"])
    CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                       crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}).save_pretrained(paths["clip"])  # fmt: skip
    _save_tiny_blip2(paths["blip2"])
    return paths


def _save_tiny_blip2(folder: Path) -> None:
    """A BLIP-2 image-text model (vision tower + Q-Former with text embeddings) and a character-level BERT tokenizer."""
    from transformers import BertTokenizer, Blip2Config, Blip2ForImageTextRetrieval

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,'-"))
    vocab = {token: i for i, token in enumerate(specials + chars + [f"##{c}" for c in chars])}
    with tempfile.TemporaryDirectory() as tmp:  # a vocab file: the form every supported transformers reads
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer.from_pretrained(tmp)
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": TINY_IMAGE_SIZE, "patch_size": 8},
        qformer_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "encoder_hidden_size": 32, "vocab_size": len(vocab), "cross_attention_frequency": 1,
                        "pad_token_id": 0, "use_qformer_text_input": True},
        num_query_tokens=8, image_text_hidden_size=16,
    )  # fmt: skip
    Blip2ForImageTextRetrieval(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
