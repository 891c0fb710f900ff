"""A class-agnostic one-prompt anomaly segmenter on a frozen ImageNet backbone (plain torch, no Lightning).

After MetaUAS (B.-B. Gao, "MetaUAS: Universal Anomaly Segmentation with One-Prompt Meta-Learning", NeurIPS 2024;
repository ``gaobb/MetaUAS``, ``metauas.py``). Its method section casts anomaly segmentation as *change
segmentation* between a normal prompt image and a query: a frozen ImageNet encoder embeds both, a **soft feature
alignment module** lets every query position attend over the prompt's positions (a learned 1x1 reduction on both
sides, a softmax over the prompt positions, the prompt features averaged with those weights), the aligned prompt
features are concatenated with the query's, and a UNet-style decoder turns them into a sigmoid mask. It is trained
once, on synthetic change pairs, and never on the test categories; at test time the prompt is one normal image.

This module keeps that structure and departs from it where this project's budget and data require:

- **Backbone.** EfficientNet-Lite0 (``efficientnet_lite0.local``, ImageNet weights from a local file) at
  ``blocks.1`` + ``blocks.2`` (strides 4 and 8), the layers of this project's PatchCore control, instead of
  MetaUAS's EfficientNet-b4 at strides 8-32: a CPU budget of minutes, and the same features as the baseline it is
  compared with, so that a gain is the segmenter's and not the backbone's.
- **Alignment.** One alignment, at stride 8, on PatchCore's embedding (each layer smoothed by a 3x3 average, the
  finer one pooled to stride 8, concatenated). The attention logits are *cosines* of the learned projection divided
  by a temperature (MetaUAS uses plain dot products), which keeps the softmax sharp from the first step.
- **Decoder inputs.** Besides the query and the aligned prompt (MetaUAS's concatenation), the decoder gets their
  absolute difference and the nearest-neighbour cosine distance of each query position to all prompt positions
  (PatchCore's score, non-learned), at stride 8 and, as the skip input of the upper stage, at stride 4. A small
  decoder (two stages of two 3x3 convolutions, GroupNorm) replaces MetaUAS's five-stage UNet with scSE attention; the
  stride-4 logits are upsampled bilinearly to the input size.
- **k prompts.** Every query position attends over the positions of all prompts together (MetaUAS averages the
  alignments of the prompts).
- **Training data.** No generic change-pair data set: pairs are made from normal images of other categories by this
  project's synthesizers (:mod:`.pairs`, :mod:`.pretrain`).

Inputs are images in ``[0, 1]``; the ImageNet normalisation happens inside the model.

>>> import torch
>>> model = OnePromptSegmenterModel(pre_trained=False).eval()
>>> model.segment(torch.rand(2, 3, 64, 64), torch.rand(1, 3, 64, 64)).shape
torch.Size([2, 1, 64, 64])
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "OnePromptSegmenterModel", "nearest_cosine_distance", "soft_align"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "anomalib_synth.one_prompt_segmenter/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCORES = ("top1", "max")
CHUNK_ELEMENTS = 1 << 24
"""Largest ``rows x prompt positions`` block of similarities computed at once (64 MB in float32)."""


def _row_chunks(rows: int, columns: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, columns)) if rows * columns > CHUNK_ELEMENTS else rows


def nearest_cosine_distance(query: Tensor, keys: Tensor) -> Tensor:
    """``1 - max cos`` of each query row to the key rows: ``query [B, N, C]``, ``keys [B or 1, M, C]`` -> ``[B, N]``.

    Non-learned (computed without gradient), in blocks of rows so that many prompt positions fit in memory.
    """
    with torch.no_grad():
        q = F.normalize(query, dim=-1)
        k = F.normalize(keys, dim=-1)
        out = []
        for b in range(q.shape[0]):
            kb = k[b if k.shape[0] > 1 else 0]
            step = _row_chunks(q.shape[1], kb.shape[0])
            best = [(q[b, i : i + step] @ kb.T).amax(-1) for i in range(0, q.shape[1], step)]
            out.append(torch.cat(best))
        return (1 - torch.stack(out)).clamp_min(0)


def soft_align(query_proj: Tensor, keys_proj: Tensor, values: Tensor, temperature: float) -> Tensor:
    """Soft alignment: each query row's softmax over the key rows (cosine / ``temperature``) averages ``values``.

    ``query_proj [B, N, D]``, ``keys_proj [B or 1, M, D]``, ``values [B or 1, M, C]`` -> ``[B, N, C]``.
    """
    q = F.normalize(query_proj, dim=-1)
    k = F.normalize(keys_proj, dim=-1)
    out = []
    for b in range(q.shape[0]):
        j = b if k.shape[0] > 1 else 0
        step = _row_chunks(q.shape[1], k.shape[1])
        parts = [torch.softmax(q[b, i : i + step] @ k[j].T / temperature, -1) @ values[j]
                 for i in range(0, q.shape[1], step)]  # fmt: skip
        out.append(torch.cat(parts))
    return torch.stack(out)


def _drop_unused_blocks(network: nn.Module, layers: Sequence[str]) -> None:
    """timm's EfficientNet feature network runs every block even when the last layer asked for is ``blocks.2``;
    the blocks after the deepest one asked for change no output, so they are dropped (a third of the cost)."""
    blocks = getattr(network, "blocks", None)
    indices = [name.split(".", 1)[1] for name in layers if name.startswith("blocks.")]
    if isinstance(blocks, nn.Sequential) and len(indices) == len(layers) and all(i.isdigit() for i in indices):
        network.blocks = blocks[: max(int(i) for i in indices) + 1]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(inplace=True),
    )


class OnePromptSegmenterModel(nn.Module):
    """Segment what differs between a query and one (or k) normal prompt images.

    Args:
        backbone (str): timm backbone of anomalib's ``TimmFeatureExtractor`` (frozen). Defaults to
            ``"efficientnet_lite0.local"`` (registered from a local file by
            :func:`anomalib_synth.backbones.register_builtin`).
        layers (Sequence[str]): two feature layers, fine then coarse; the coarse one sets the alignment grid.
            Defaults to ``("blocks.1", "blocks.2")`` (strides 4 and 8).
        pre_trained (bool): ImageNet weights for the backbone. Defaults to ``True``.
        proj_dim (int): channels of the learned projection the attention compares. Defaults to ``64``.
        hidden (int): channels of the decoder's lower stage (the upper one has half). Defaults to ``32``.
        temperature (float): softmax temperature of the cosine attention. Defaults to ``0.05``.
        score (str): image score from the probability map: ``"top1"`` (mean of the top 1 % of pixels) or
            ``"max"``. Defaults to ``"top1"``.

    Convention:
        - ``segment(query, prompts)`` takes images ``[B, 3, H, W]`` and ``[k, 3, H, W]`` in ``[0, 1]`` and returns
          mask *logits* ``[B, 1, H, W]``; every query is compared with all ``k`` prompts together.
        - ``set_prompts(prompts)`` caches the prompts' features; then ``model(query)`` returns logits in training
          mode and anomalib's ``InferenceBatch(pred_score [B], anomaly_map [B, 1, H, W] probabilities)`` in eval
          mode.
        - Only the projection and the decoder train; the backbone is frozen and, when pretrained, never saved.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0.local",
        layers: Sequence[str] = ("blocks.1", "blocks.2"),
        pre_trained: bool = True,
        proj_dim: int = 64,
        hidden: int = 32,
        temperature: float = 0.05,
        score: str = "top1",
    ) -> None:
        super().__init__()
        from anomalib.models.components import TimmFeatureExtractor

        from ...backbones import BUILTIN, BackboneWeightsError, register_weights

        layers = list(layers)
        if len(layers) != 2:
            msg = f"layers must name two feature layers (fine, coarse), got {layers}"
            raise ValueError(msg)
        if score not in SCORES:
            msg = f"score must be one of {SCORES}, got {score!r}"
            raise ValueError(msg)
        if not (temperature > 0 and proj_dim > 0 and hidden > 1):
            msg = f"temperature, proj_dim and hidden must be positive, got {temperature}, {proj_dim}, {hidden}"
            raise ValueError(msg)
        timm_name = backbone
        if backbone in BUILTIN:  # timm resolves the tag even without weights: register it, or drop it
            try:
                register_weights(backbone)
            except BackboneWeightsError:
                if pre_trained:
                    raise
                timm_name = backbone.partition(".")[0]
        self.config: dict[str, Any] = {
            "backbone": backbone, "layers": layers, "pre_trained": bool(pre_trained), "proj_dim": int(proj_dim),
            "hidden": int(hidden), "temperature": float(temperature), "score": score,
        }  # fmt: skip
        self.layers = layers
        self.temperature = float(temperature)
        self.score = score
        self.training_data: list[str] = []
        self.feature_extractor = TimmFeatureExtractor(timm_name, layers=layers, pre_trained=pre_trained,
                                                      requires_grad=False).eval()  # fmt: skip
        self.feature_extractor.requires_grad_(False)  # anomalib's flag only turns gradients off in its forward
        _drop_unused_blocks(self.feature_extractor.feature_extractor, layers)
        fine, coarse = self.feature_extractor.out_dims
        self.fine_channels, self.embed_channels = fine, fine + coarse
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.projection = nn.Conv2d(self.embed_channels, proj_dim, 1)
        self.lower = _block(3 * self.embed_channels + 1, hidden)
        self.upper = _block(hidden + fine + 1, hidden // 2)
        self.head = nn.Conv2d(hidden // 2, 1, 1)
        self._prompts: dict[str, Tensor] | None = None

    # --- features -----------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> OnePromptSegmenterModel:
        super().train(mode)
        self.feature_extractor.eval()  # frozen: no BatchNorm statistics updates, ever
        return self

    def embed(self, images: Tensor) -> dict[str, Tensor]:
        """Frozen features of images in ``[0, 1]``: ``fine [B, Cf, H/4, W/4]`` and ``coarse`` (the alignment
        embedding) ``[B, Cf + Cc, H/8, W/8]``, each layer smoothed by a 3x3 average as PatchCore does."""
        with torch.no_grad():
            features = self.feature_extractor((images - self.mean) / self.std)
            fine, coarse = (F.avg_pool2d(features[name], 3, 1, 1) for name in self.layers)
            pooled = F.adaptive_avg_pool2d(fine, coarse.shape[-2:])
            return {"fine": fine, "coarse": torch.cat([pooled, coarse], 1)}

    def set_prompts(self, prompts: Tensor) -> None:
        """Cache the features of the prompt images ``[k, 3, H, W]`` in ``[0, 1]`` for ``forward``."""
        if prompts.ndim != 4 or prompts.shape[1] != 3 or prompts.shape[0] < 1:
            msg = f"prompts must be [k, 3, H, W] with k >= 1, got {tuple(prompts.shape)}"
            raise ValueError(msg)
        self._prompts = self.embed(prompts)

    @property
    def prompt_features(self) -> dict[str, Tensor] | None:
        return self._prompts

    # --- the segmenter ------------------------------------------------------------------------------------------
    def decoder_inputs(self, query: dict[str, Tensor], prompts: dict[str, Tensor], paired: bool = False
                       ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """``(lower [B, 3C+1, h8, w8], skip [B, Cf+1, h4, w4])``: [query, aligned prompt, |difference|, distance]
        at stride 8 and [query, distance] at stride 4.

        ``prompts`` hold ``k`` images whose positions every query attends over together, or, with ``paired``,
        one prompt per query (``k == B``: query ``i`` against prompt ``i`` only, as in pretraining).
        """
        q8, p8 = query["coarse"], prompts["coarse"]
        b, c, h, w = q8.shape
        if paired and p8.shape[0] != b:
            msg = f"paired prompts need one prompt per query, got {p8.shape[0]} for {b}"
            raise ValueError(msg)

        def rows(x: Tensor) -> Tensor:  # [n, C, h, w] -> [n, h*w, C]
            return x.flatten(2).transpose(1, 2)

        def keys(x: Tensor) -> Tensor:  # all prompts' positions together, or one prompt per query
            return rows(x) if paired else rows(x).reshape(1, -1, x.shape[1])

        aligned = soft_align(rows(self.projection(q8)), keys(self.projection(p8)), keys(p8), self.temperature)
        aligned = aligned.transpose(1, 2).reshape(b, c, h, w)
        d8 = nearest_cosine_distance(rows(q8), keys(p8)).view(b, 1, h, w)
        q4, p4 = query["fine"], prompts["fine"]
        d4 = nearest_cosine_distance(rows(q4), keys(p4)).view(b, 1, *q4.shape[-2:])
        return torch.cat([q8, aligned, (q8 - aligned).abs(), d8], 1), torch.cat([q4, d4], 1)

    def decode(self, lower: Tensor, skip: Tensor, size: tuple[int, int]) -> Tensor:
        """Mask logits ``[B, 1, *size]`` from :meth:`decoder_inputs`."""
        x = self.lower(lower)
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.head(self.upper(torch.cat([x, skip], 1)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def segment_features(self, query: Tensor, prompts: dict[str, Tensor], paired: bool = False) -> Tensor:
        """Logits of query images ``[B, 3, H, W]`` against prompt features (from :meth:`embed`)."""
        return self.decode(*self.decoder_inputs(self.embed(query), prompts, paired), tuple(query.shape[-2:]))

    def segment(self, query: Tensor, prompts: Tensor) -> Tensor:
        """Mask logits ``[B, 1, H, W]`` of ``query [B, 3, H, W]`` against ``prompts [k, 3, H, W]`` (both in
        ``[0, 1]``); every query is compared with all prompts together."""
        if query.ndim != 4 or query.shape[1] != 3:
            msg = f"query must be [B, 3, H, W], got {tuple(query.shape)}"
            raise ValueError(msg)
        if prompts.ndim == 3:
            prompts = prompts.unsqueeze(0)
        return self.segment_features(query, self.embed(prompts))

    def anomaly_score(self, probabilities: Tensor) -> Tensor:
        """Image scores ``[B]`` of probability maps ``[B, 1, H, W]``: max, or the mean of the top 1 %."""
        flat = probabilities.flatten(1)
        if self.score == "max":
            return flat.amax(1)
        top = max(1, math.ceil(0.01 * flat.shape[1]))
        return flat.topk(top, dim=1).values.mean(1)

    def forward(self, query: Tensor):  # noqa: ANN201 (logits in training, InferenceBatch in eval)
        """Against the prompts of :meth:`set_prompts`: logits in training mode, anomalib's ``InferenceBatch`` in
        eval mode."""
        if self._prompts is None:
            msg = "no prompts: call set_prompts(normal images) first"
            raise RuntimeError(msg)
        prompts = {k: v.to(query.device) for k, v in self._prompts.items()}
        logits = self.segment_features(query, prompts)
        if self.training:
            return logits
        from anomalib.data import InferenceBatch

        probabilities = torch.sigmoid(logits)
        return InferenceBatch(pred_score=self.anomaly_score(probabilities), anomaly_map=probabilities)

    # --- saving -------------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, Tensor]:
        """What :meth:`save_pretrained` writes: the trained weights, plus the backbone when it is not pretrained
        (random weights could not be rebuilt)."""
        return {name: p for name, p in self.named_parameters()
                if p.requires_grad or not self.config["pre_trained"]}  # fmt: skip

    def save_pretrained(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` (the init arguments, ``training_data`` and ``extra``) and ``model.safetensors``
        (the trained weights) atomically into ``folder``; returns it."""
        from ...io import atomic_files, write_safetensors, write_text

        config = {"format": FORMAT, "init_args": self.config, "training_data": list(self.training_data),
                  **(extra or {})}  # fmt: skip
        with atomic_files(folder) as tmp:
            write_safetensors(tmp / WEIGHTS_NAME, self.trainable_state())
            write_text(tmp / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        return Path(folder)

    @staticmethod
    def read_config(folder: str | Path) -> dict[str, Any]:
        """The ``config.json`` of a saved segmenter; ``ValueError`` naming ``folder`` when it is not one."""
        path = Path(folder) / CONFIG_NAME
        if not Path(folder).is_dir() or not path.is_file() or not (Path(folder) / WEIGHTS_NAME).is_file():
            msg = (f"{str(folder)!r} is not a one-prompt segmenter folder (expected {CONFIG_NAME} and "
                   f"{WEIGHTS_NAME}; make one with `anomalib-synth pretrain-segmenter`)")  # fmt: skip
            raise ValueError(msg)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            msg = f"{str(folder)!r}: unreadable {CONFIG_NAME} ({err})"
            raise ValueError(msg) from err
        valid = isinstance(config, dict) and config.get("format") == FORMAT
        if not valid or not isinstance(config.get("init_args"), dict):
            msg = f"{str(folder)!r}: {CONFIG_NAME} is not a one-prompt segmenter config (format {FORMAT!r})"
            raise ValueError(msg)
        return config

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> OnePromptSegmenterModel:
        """A segmenter saved by :meth:`save_pretrained`; ``overrides`` replace init arguments that do not change
        the weights' shapes (e.g. ``score``). ``ValueError`` naming ``folder`` when it is missing or invalid."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config = cls.read_config(folder)
        model = cls(**{**config["init_args"], **overrides})
        try:
            state = load_file(str(Path(folder) / WEIGHTS_NAME))
        except (OSError, SafetensorError) as err:
            msg = f"{str(folder)!r}: unreadable {WEIGHTS_NAME} ({err})"
            raise ValueError(msg) from err
        expected = model.trainable_state()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
            msg = f"{str(folder)!r}: {WEIGHTS_NAME} does not fit the model its {CONFIG_NAME} describes"
            raise ValueError(msg)
        with torch.no_grad():
            for name, tensor in state.items():
                expected[name].copy_(tensor)
        model.training_data = list(config.get("training_data") or [])
        return model
