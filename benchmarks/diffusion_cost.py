"""Cost of the diffusion synthesizers at full size (512x512), measured on random-weight models built in code.

    python benchmarks/diffusion_cost.py                       # measure here (CPU: ~15-25 min, peak < 10 GiB)
    python benchmarks/diffusion_cost.py --update-docs docs/diffusion.md --json benchmarks/diffusion_cost.json
    python benchmarks/diffusion_cost.py --from-json benchmarks/diffusion_cost.json   # re-count, re-use the timings
    python benchmarks/diffusion_cost.py --quick               # tiny models, seconds: a smoke test

No weights are downloaded: Stable Diffusion 1.5's UNet (4- and 9-channel), VAE and CLIP text encoder, the CLIP
ViT-L/14 image tower and BLIP-2's ViT-g + Q-Former are built from their configurations, written below, with random
weights. Random weights cost the same as real ones.

Each component runs in its own subprocess (so that its peak memory is its own and its memory is given back before
the next one) and is timed on the operations the synthesizers perform: a UNet forward at batch 1 and 2 (classifier-
free guidance), AnomalyAny's guided iteration (conditional UNet forward with the cross-attention store, then the
backward of ``L_att + L_prompt`` to the latent and the prompt embedding, with and without attention slicing), the
VAE encode, decode and decode+backward, the text encoders, the CLIP image tower forward and forward+backward, and
BLIP-2's vision tower and Q-Former forward and forward+backward. Times are the median of ``--repeats`` calls after
one warm-up, in wall and in CPU time; on CPU the table uses the CPU time of one thread (``--threads 1``), which is
the time on one idle core whatever else the machine runs (on a loaded machine, more threads spin-wait and inflate
both). Memory is the peak resident set size (``VmHWM``, reset before each operation) on CPU, and the peak
allocated CUDA memory on a GPU.

The counts come from the synthesizers' own code and defaults: :meth:`AnomalyAnySynthesizer.expected_costs` (on
tiny models built here), and the constructor defaults of the other three (``num_inference_steps``, ``strength``,
``guidance_scale``, ``asea_steps``), so rerun (``--from-json`` is enough) when a default changes. The projected time
per image is the sum of count x measured time over the operations of each synthesizer.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SIZE = 512
QUICK_SIZE = 32
DOCS_BEGIN, DOCS_END = "<!-- diffusion_cost:begin -->", "<!-- diffusion_cost:end -->"

# -- full-size configurations, written in code ------------------------------------------------------------------------


def unet_config(in_channels: int, quick: bool) -> dict[str, Any]:
    """Stable Diffusion 1.5's ``UNet2DConditionModel`` (860 M parameters; 9 input channels for inpainting)."""
    if quick:
        return {"sample_size": QUICK_SIZE // 2, "in_channels": in_channels, "out_channels": 4,
                "block_out_channels": (16, 32), "layers_per_block": 1, "cross_attention_dim": 32,
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), "attention_head_dim": 8,
                "norm_num_groups": 8}  # fmt: skip
    return {"sample_size": 64, "in_channels": in_channels, "out_channels": 4, "center_input_sample": False,
            "flip_sin_to_cos": True, "freq_shift": 0,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "downsample_padding": 1,
            "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
            "cross_attention_dim": 768, "attention_head_dim": 8}  # fmt: skip


def vae_config(quick: bool) -> dict[str, Any]:
    """Stable Diffusion 1.5's ``AutoencoderKL`` (84 M parameters, factor 8, 4 latent channels)."""
    if quick:
        return {"sample_size": QUICK_SIZE, "in_channels": 3, "out_channels": 3, "block_out_channels": (8, 16),
                "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
                "latent_channels": 4, "norm_num_groups": 4}  # fmt: skip
    return {"sample_size": SIZE, "in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "act_fn": "silu",
            "scaling_factor": 0.18215}  # fmt: skip


def clip_text_config(quick: bool) -> dict[str, Any]:
    """CLIP ViT-L/14's text tower (123 M parameters): SD 1.5's text encoder and AnomalyAny's/XFusion's CLIP text."""
    if quick:
        return {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                "num_hidden_layers": 2, "max_position_embeddings": 77, "projection_dim": 16}  # fmt: skip
    return {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
            "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}  # fmt: skip


def clip_vision_config(quick: bool) -> dict[str, Any]:
    """CLIP ViT-L/14's image tower (304 M parameters, 224 px): AnomalyAny's ``L_img``, XFusion's texture."""
    if quick:
        return {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                "image_size": 32, "patch_size": 8, "projection_dim": 16}  # fmt: skip
    return {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
            "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip


def blip2_config(quick: bool) -> dict[str, Any]:
    """``Salesforce/blip2-itm-vit-g``: EVA ViT-g (39 layers, width 1408, 224 px) + Q-Former (12 layers, 32 queries)."""
    if quick:
        return {"vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                "qformer_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "encoder_hidden_size": 32, "vocab_size": 100,
                                   "cross_attention_frequency": 1, "use_qformer_text_input": True},
                "num_query_tokens": 8, "image_text_hidden_size": 16}  # fmt: skip
    return {"vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                              "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "qkv_bias": True},
            "qformer_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                               "num_attention_heads": 12, "encoder_hidden_size": 1408, "vocab_size": 30523,
                               "cross_attention_frequency": 2, "use_qformer_text_input": True},
            "num_query_tokens": 32, "image_text_hidden_size": 256}  # fmt: skip


# -- memory and timing ------------------------------------------------------------------------------------------------


def _status_mib(key: str) -> float | None:
    try:
        match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def rss_mib() -> float | None:
    """Current resident set size of this process (Linux), MiB."""
    return _status_mib("VmRSS")


def reset_peak(device: str) -> None:
    """Release freed heap to the system and reset the peak counters (``VmHWM`` on Linux, CUDA's peak)."""
    try:  # tensors are freed by reference counting; give the freed heap back so that VmHWM restarts low
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float | None:
    """Peak since :func:`reset_peak`: CUDA allocated memory on a GPU, else the resident set size."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mib("VmHWM")


def measure(fn: Callable[[], Any], repeats: int, device: str) -> dict[str, float | None]:
    """Median seconds of ``repeats`` calls after one warm-up, and the peak memory over all of them."""
    reset_peak(device)
    before = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else rss_mib()
    fn()
    times, cpu = [], []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu),
        "peak_mib": peak_mib(device),
        "before_mib": before,
    }


# -- components and their operations ---------------------------------------------------------------------------------


def _attention_loss(store: Any, tokens: int = 10, token: int = 4) -> torch.Tensor:
    """AnomalyAny's ``L_att`` on the captured maps: token softmax (x100), smoothing, ``1 - max``."""
    from kornia.filters import gaussian_blur2d

    maps = store.maps().float()[:, 1 : tokens + 1]
    amap = (maps * 100).softmax(dim=1)[:, token : token + 1]
    amap = gaussian_blur2d(amap, (3, 3), (0.5, 0.5), border_type="reflect")
    return 1 - amap.flatten(1).amax(1).sum()


def task_unet(quick: bool, device: str, dtype: torch.dtype, repeats: int, in_channels: int = 4,
              sliced: bool = False) -> dict[str, Any]:  # fmt: skip
    from diffusers import UNet2DConditionModel

    from anomalib_synth.synthesizers.diffusion.anomalyany import attention_resolution
    from anomalib_synth.synthesizers.diffusion.attention import AttentionStore, attach_attention_store

    unet = UNet2DConditionModel(**unet_config(in_channels, quick)).to(device, dtype).requires_grad_(False).eval()
    if sliced:
        unet.set_attention_slice("auto")
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, in_channels, size, size, generator=g).to(device)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device)
    t = torch.tensor(500, device=device)
    results: dict[str, Any] = {"parameters": sum(p.numel() for p in unet.parameters())}

    def forward(batch: int) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                unet(z.repeat(batch, 1, 1, 1).to(dtype), t, encoder_hidden_states=context.repeat(batch, 1, 1).to(dtype))

        return run

    if not sliced:
        results["fwd1"] = measure(forward(1), repeats, device)
        results["fwd2"] = measure(forward(2), repeats, device)
    if in_channels == 4:  # AnomalyAny's guided iteration: conditional forward with the store, backward to z and E
        store = attach_attention_store(unet, AttentionStore(attention_resolution(unet, size)))

        def guided() -> None:
            latent = z.clone().requires_grad_(True)
            embedding = context.clone().requires_grad_(True)
            with torch.enable_grad():
                store.reset()
                unet(latent.to(dtype), t, encoder_hidden_states=embedding.to(dtype))
                loss = _attention_loss(store) + (1 - torch.cosine_similarity(embedding.mean(1), context.mean(1))).sum()
                torch.autograd.grad(loss, [latent, embedding])

        results["guided_sliced" if sliced else "guided"] = measure(guided, repeats, device)
        store.detach()
    return results


def task_vae(quick: bool, device: str, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_config(quick)).to(device, dtype).requires_grad_(False).eval()
    size = vae.config.sample_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=g).to(device, dtype)
    latent = torch.randn(1, 4, size // factor, size // factor, generator=g).to(device)
    results: dict[str, Any] = {"parameters": sum(p.numel() for p in vae.parameters())}

    def encode() -> None:
        with torch.no_grad():
            _ = vae.encode(image * 2 - 1).latent_dist.mean

    def decode() -> None:
        with torch.no_grad():
            _ = vae.decode(latent.to(dtype)).sample

    def decode_backward() -> None:  # AnomalyAny's L_img: gradient of the decoded image to the latent
        leaf = latent.clone().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(vae.decode(leaf.to(dtype)).sample.float().mean(), [leaf])

    results["encode"] = measure(encode, repeats, device)
    results["decode"] = measure(decode, repeats, device)
    results["decode_fb"] = measure(decode_backward, repeats, device)
    return results


def task_text(quick: bool, device: str, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**clip_text_config(quick))).to(device, dtype).requires_grad_(False).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 77), generator=torch.Generator().manual_seed(0)).to(device)

    def run() -> None:
        with torch.no_grad():
            model(ids)

    return {"parameters": sum(p.numel() for p in model.parameters()), "fwd": measure(run, repeats, device)}


def task_clip_vision(quick: bool, device: str, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**clip_vision_config(quick))
    model = CLIPVisionModelWithProjection(config).to(device, dtype).requires_grad_(False).eval()
    pixels = torch.randn(1, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device)

    def forward() -> None:
        with torch.no_grad():
            _ = model(pixel_values=pixels.to(dtype)).image_embeds

    def forward_backward() -> None:  # AnomalyAny's L_img: gradient of the image embedding to the pixels
        leaf = pixels.clone().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(model(pixel_values=leaf.to(dtype)).image_embeds.float().sum(), [leaf])

    return {"parameters": sum(p.numel() for p in model.parameters()), "fwd": measure(forward, repeats, device),
            "fb": measure(forward_backward, repeats, device)}  # fmt: skip


def task_blip2(quick: bool, device: str, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    """BLIP-2's CSM pass, and ASEA's step with ``e_g`` on the ViT input (gradient through ViT-g) or on its output
    (the official placement: gradient through the Q-Former only)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    config = Blip2Config(**blip2_config(quick))
    model = Blip2ForImageTextRetrieval(config).to(device, dtype).requires_grad_(False).eval()
    vision = model.vision_model
    g = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=g).to(device, dtype)
    ids = torch.randint(0, config.qformer_config.vocab_size, (1, 32), generator=g).to(device)
    queries = model.query_tokens.expand(1, -1, -1)
    n_query = queries.shape[1]
    mask = torch.ones(1, n_query + ids.shape[1], dtype=torch.long, device=device)
    with torch.no_grad():
        patches = vision.embeddings(pixels)
        image_embeds = vision.post_layernorm(vision.encoder(inputs_embeds=patches).last_hidden_state)

    def qformer(embeds: torch.Tensor) -> torch.Tensor:
        text_and_queries = model.embeddings(input_ids=ids, query_embeds=queries)
        out = model.qformer(query_embeds=text_and_queries, query_length=n_query, attention_mask=mask,
                            encoder_hidden_states=embeds,
                            encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=device))  # fmt: skip
        return out.last_hidden_state[:, :n_query].mean(1)

    def vit(hidden: torch.Tensor) -> torch.Tensor:
        return vision.post_layernorm(vision.encoder(inputs_embeds=hidden).last_hidden_state)

    def vit_forward() -> None:
        with torch.no_grad():
            vit(vision.embeddings(pixels))

    def qformer_forward() -> None:
        with torch.no_grad():
            qformer(image_embeds)

    def step_through_vit() -> None:  # e_g on the patch embeddings
        e_g = torch.zeros(patches.shape, device=device, dtype=torch.float32, requires_grad=True)
        with torch.enable_grad():
            torch.autograd.grad(qformer(vit(patches + e_g.to(dtype))).float().sum(), [e_g])

    def step_qformer_only() -> None:  # e_g on ln_vision(ViT(image)), detached
        e_g = torch.zeros(image_embeds.shape, device=device, dtype=torch.float32, requires_grad=True)
        with torch.enable_grad():
            torch.autograd.grad(qformer(image_embeds + e_g.to(dtype)).float().sum(), [e_g])

    return {"parameters": sum(p.numel() for p in model.parameters()),
            "vision_parameters": sum(p.numel() for p in vision.parameters()),
            "vit_fwd": measure(vit_forward, repeats, device), "qformer_fwd": measure(qformer_forward, repeats, device),
            "asea_qformer_fb": measure(step_qformer_only, repeats, device),
            "asea_vit_fb": measure(step_through_vit, repeats, device)}  # fmt: skip


TASKS: dict[str, Callable[..., dict[str, Any]]] = {
    "text": task_text,
    "clip_vision": task_clip_vision,
    "vae": task_vae,
    "unet": task_unet,
    "unet_sliced": lambda *a: task_unet(*a, sliced=True),
    "unet_inpaint": lambda *a: task_unet(*a, in_channels=9),
    "blip2": task_blip2,
}


def run_task(name: str, quick: bool, device: str, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    start = rss_mib()
    result = TASKS[name](quick, device, dtype, repeats)
    result["process_start_mib"] = start
    return result


def run_in_subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable,
            __file__,
            "--task",
            name,
            "--task-output",
            str(out),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--repeats",
            str(args.repeats),
            "--threads",
            str(getattr(args, "threads", 1)),
        ]
        command += ["--quick"] if args.quick else []  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr else ''}"}
        result = json.loads(out.read_text())
        result["wall_seconds"] = time.perf_counter() - started
        return result


# -- counts from the synthesizers' code ------------------------------------------------------------------------------


def constructor_defaults(cls: type) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def diffusers_steps(num_inference_steps: int, strength: float) -> int:
    """Denoising steps diffusers' img2img/inpainting pipelines run: ``min(int(N * strength), N)``."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def official_anomalyany(num_inference_steps: int = 200, gamma: float = 0.3, inner: int = 10) -> dict[str, Any]:
    """The official loop (EPFL-IMOS/AnomalyAny, ``clip_pipeline_attend_and_excite.py``), counted per image.

    Per executed step: a grad-enabled CFG forward whose output is unused (2), ``inner`` conditional forwards each
    followed by two backwards (latent, then prompt, through the same graph), the final CFG forward (2). At steps
    ``i < 10`` while the map is not localised, one more conditional forward; at step 0, if the peak attention is
    below 0.05, 5 Attend-and-Excite iterations (3 forwards, 1 backward each) and one more forward and backward.
    ``L_img`` (VAE decode + CLIP, forward and backward) in every inner iteration of the steps ``i > 0.7 n``.
    """
    n = int(num_inference_steps * gamma)
    refine = sum(i > 0.7 * n for i in range(n))
    low = {"unet_forward": (2 + inner + 2) * n, "unet_backward": 2 * inner * n}
    high = {"unet_forward": low["unet_forward"] + min(n, 10) + 16, "unet_backward": low["unet_backward"] + 6}
    return {"executed_steps": n, "low": low, "high": high, "vae_decode": inner * refine, "clip_image": inner * refine}


def synthesizer_counts(quick_models: dict[str, Path] | None = None) -> dict[str, dict[str, Any]]:
    """Per image, per synthesizer, from the code's defaults: operation -> count (UNet counts in images)."""
    from anomalib_synth.synthesizers import get, get_class
    from anomalib_synth.testing import save_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        models = quick_models or save_tiny_models(tmp)
        anyany = get("anomalyany", model=models["sd"], clip_model=models["clip"], category="bottle")
        costs = anyany.expected_costs()
        n = anyany.executed_steps()
    counts: dict[str, dict[str, Any]] = {}
    inpaint = constructor_defaults(get_class("inpainting"))
    steps = diffusers_steps(inpaint["num_inference_steps"], inpaint["strength"])
    cfg = 2 if inpaint["guidance_scale"] > 1 else 1
    counts["inpainting"] = {"settings": f"{inpaint['num_inference_steps']} steps, strength {inpaint['strength']}, "
                                        f"CFG {inpaint['guidance_scale']}",
                            "unet_forward": cfg * steps, "unet_backward": 0,
                            "ops": {"unet9_fwd_cfg": steps, "vae_encode": 1, "vae_decode": 1, "text": 2}}  # fmt: skip
    counts["anomalyany"] = {"settings": f"{anyany.num_inference_steps} steps x gamma {anyany.gamma} = {n} executed, "
                                        f"{anyany.inner_steps} inner iterations, {costs['vae_decode'] // max(anyany.inner_steps, 1)} refinement steps",
                            "unet_forward": costs["unet_forward"], "unet_backward": costs["unet_backward"],
                            "ops": {"unet_fwd_cfg": n, "unet_guided": costs["unet_backward"],
                                    "unet_fwd1": costs["unet_forward"] - 2 * n - costs["unet_backward"],
                                    "vae_decode_fb": costs["vae_decode"], "clip_vision_fb": costs["clip_image"],
                                    "vae_encode": 1, "vae_decode": 1, "text": 4}}  # fmt: skip
    xf = constructor_defaults(get_class("xfusion"))
    steps = min(int(xf["num_inference_steps"] * xf["strength"]), xf["num_inference_steps"])
    cfg = 2 if xf["guidance_scale"] != 1 else 1
    counts["xfusion"] = {"settings": f"{xf['num_inference_steps']} steps, strength {xf['strength']}, "
                                     f"guidance {xf['guidance_scale']}",
                         "unet_forward": cfg * steps, "unet_backward": 0,
                         "ops": {"unet_fwd1": cfg * steps, "vae_encode": 1, "vae_decode": 1, "text": cfg,
                                 "clip_vision_fwd": 1}}  # fmt: skip
    ac = constructor_defaults(get_class("anomalycontrol"))
    steps = diffusers_steps(ac["num_inference_steps"], ac["strength"])
    cfg = 2 if ac["guidance_scale"] > 1 else 1
    counts["anomalycontrol"] = {"settings": f"{ac['num_inference_steps']} steps, strength {ac['strength']}, "
                                            f"CFG {ac['guidance_scale']}; ASEA {ac['asea_steps']} steps per reference",
                                "unet_forward": cfg * steps, "unet_backward": 0,
                                "ops": {"unet9_fwd_cfg": steps, "vae_encode": 2, "vae_decode": 1, "text": 2},
                                "per_reference": {"asea_steps": ac["asea_steps"]}}  # fmt: skip
    return counts


# -- report ----------------------------------------------------------------------------------------------------------


def op_seconds(m: dict[str, Any], key: str = "seconds") -> dict[str, float]:
    """Seconds per counted operation, from the measurements (``key``: ``"seconds"``, wall, or ``"cpu_seconds"``)."""

    def s(task: str, op: str) -> float:
        return m.get(task, {}).get(op, {}).get(key, math.nan)

    return {
        "unet_fwd1": s("unet", "fwd1"),
        "unet_fwd_cfg": s("unet", "fwd2"),
        "unet_guided": s("unet", "guided"),
        "unet9_fwd1": s("unet_inpaint", "fwd1"),
        "unet9_fwd_cfg": s("unet_inpaint", "fwd2"),
        "vae_encode": s("vae", "encode"),
        "vae_decode": s("vae", "decode"),
        "vae_decode_fb": s("vae", "decode_fb"),
        "text": s("text", "fwd"),
        "clip_vision_fwd": s("clip_vision", "fwd"),
        "clip_vision_fb": s("clip_vision", "fb"),
    }


def weights_mib(m: dict[str, Any], task: str, bytes_per: int = 4) -> float:
    return m.get(task, {}).get("parameters", 0) * bytes_per / 2**20


def activation_mib(m: dict[str, Any], task: str, op: str) -> float:
    entry = m.get(task, {}).get(op, {})
    if entry.get("peak_mib") is None or entry.get("before_mib") is None:
        return math.nan
    return max(entry["peak_mib"] - entry["before_mib"], 0.0)


def fmt_s(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x / 3600:.1f} h" if x >= 3600 else (f"{x / 60:.1f} min" if x >= 120 else f"{x:.2f} s")


def fmt_gib(mib: float) -> str:
    return "n/a" if math.isnan(mib) else f"{mib / 1024:.1f} GiB"


def projected(counts: dict[str, Any], sec: dict[str, float]) -> float:
    return sum(count * sec.get(op, math.nan) for op, count in counts["ops"].items())


def official_projection(sec: dict[str, float]) -> float:
    """The official loop's time from the same measured operations (lower count: no extra Attend-and-Excite)."""
    official = official_anomalyany()
    # per executed step: two CFG forwards (one grad-enabled, unused; the final one) and 10 x (forward + 2 backwards)
    per_step = 2 * sec["unet_fwd_cfg"] + 10 * (2 * sec["unet_guided"] - sec["unet_fwd1"])
    return official["executed_steps"] * per_step + official["vae_decode"] * (
        sec["vae_decode_fb"] + sec["clip_vision_fb"]
    )


def report(measured: dict[str, Any], counts: dict[str, dict[str, Any]]) -> str:
    m, meta = measured["tasks"], measured["meta"]
    cuda = meta["device"].startswith("cuda")
    key = "seconds" if cuda else "cpu_seconds"  # on CPU: the process's CPU time, robust to the machine's load
    sec = op_seconds(m, key)
    bytes_per = 2 if meta["dtype"] in ("float16", "bfloat16") else 4
    mem_label = "peak CUDA memory (est.)" if cuda else "peak RSS (est.)"
    uses = {"inpainting": (("unet_inpaint", "fwd2"), ("vae", "decode"), ("text", "fwd")),
            "anomalyany": (("unet", "guided"), ("vae", "decode_fb"), ("clip_vision", "fb"), ("text", "fwd")),
            "xfusion": (("unet", "fwd1"), ("vae", "decode"), ("clip_vision", "fwd"), ("text", "fwd")),
            "anomalycontrol": (("unet_inpaint", "fwd2"), ("vae", "decode"), ("text", "fwd"), ("blip2", "vit_fwd"),
                               ("blip2", "asea_qformer_fb"))}  # fmt: skip
    load = meta.get("load")
    load_note = f", load average {load[0]:.1f} -> {load[1]:.1f} on {meta['cpus']} CPUs" if load else ""
    unit = "" if cuda else f" (CPU time, {meta['threads']} thread{'s' if meta['threads'] > 1 else ''})"
    lines = [
        f"Measured on {meta['machine']} ({meta['device']}, {meta['dtype']}, {meta['threads']} "
        f"thread{'s' if meta['threads'] != 1 else ''}, torch "
        f"{meta['torch']}{load_note}), {SIZE}x{SIZE}"
        + (" (QUICK: tiny models, not the real sizes)" if meta["quick"] else "")
        + f", median of {meta['repeats']} calls after a warm-up.",
        "",
        (
            "| synthesizer | defaults | UNet forwards / image | UNet backwards / image | one UNet forward"
            f"{unit} | one UNet forward + backward | {mem_label} | projected time / image |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in counts.items():
        tasks = {task for task, _ in uses[name]}
        weights = sum(weights_mib(m, task, bytes_per) for task in tasks)
        peak = weights + max(activation_mib(m, task, op) for task, op in uses[name])
        inpaint = name in ("inpainting", "anomalycontrol")
        fwd = sec["unet9_fwd1"] if inpaint else sec["unet_fwd1"]
        fb = fmt_s(sec["unet_guided"]) if c["unet_backward"] else "-"
        cell = fmt_s(projected(c, sec))
        if "per_reference" in c:
            k = c["per_reference"]["asea_steps"]
            blip = {op: m.get("blip2", {}).get(op, {}).get(key, math.nan)
                    for op in ("vit_fwd", "qformer_fwd", "asea_qformer_fb")}  # fmt: skip
            cell += (f"; + once per reference (cached): {fmt_s(blip['vit_fwd'] + (k + 1) * blip['qformer_fwd'])} "
                     f"+ {fmt_s(k * blip['asea_qformer_fb'])} for ASEA")  # fmt: skip
        lines.append(f"| `{name}` | {c['settings']} | {c['unet_forward']} | {c['unet_backward']} | {fmt_s(fwd)} "
                     f"| {fb} | {fmt_gib(peak)} | {cell} |")  # fmt: skip
    official = official_anomalyany()
    lo, hi = official["low"], official["high"]
    any_c = counts["anomalyany"]
    lines += [
        (
            f"| official AnomalyAny loop | 200 steps x gamma 0.3 = {official['executed_steps']} executed, 10 inner "
            f"iterations | {lo['unet_forward']}-{hi['unet_forward']} | {lo['unet_backward']}-{hi['unet_backward']} "
            f"| {fmt_s(sec['unet_fwd1'])} | {fmt_s(sec['unet_guided'])} | - | about {fmt_s(official_projection(sec))} |"
        ),
        "",
        (
            f"Our `anomalyany` runs {any_c['unet_forward']} UNet forwards per image against the official loop's "
            f"{lo['unet_forward']}-{hi['unet_forward']} (about 850), and {any_c['unet_backward']} backwards against "
            f"{lo['unet_backward']}: the official code also runs a grad-enabled CFG forward whose output it never "
            "uses at every step, and a second backward per inner iteration for the prompt. Its projected time is "
            f"{projected(any_c, sec) / official_projection(sec):.2f} of the official loop's."
        ),
        "",
        "Per operation (peak = the operation's own peak, its model's weights included):",
        "",
        "| operation | wall seconds | CPU seconds | peak memory | model weights |",
        "|---|---|---|---|---|",
    ]
    names = {("unet", "fwd1"): "UNet forward, batch 1", ("unet", "fwd2"): "UNet forward, batch 2 (CFG)",
             ("unet", "guided"): "AnomalyAny guided iteration: UNet forward + backward of L_att + L_prompt",
             ("unet_sliced", "guided_sliced"): "the same with `attention_slicing`",
             ("unet_inpaint", "fwd1"): "inpainting UNet (9 channels) forward, batch 1",
             ("unet_inpaint", "fwd2"): "inpainting UNet (9 channels) forward, batch 2 (CFG)",
             ("vae", "encode"): "VAE encode", ("vae", "decode"): "VAE decode",
             ("vae", "decode_fb"): "VAE decode + backward to the latent (L_img)",
             ("text", "fwd"): "CLIP text encoder, 77 tokens",
             ("clip_vision", "fwd"): "CLIP ViT-L/14 image tower, 224 px",
             ("clip_vision", "fb"): "CLIP ViT-L/14 image tower forward + backward (L_img)",
             ("blip2", "vit_fwd"): "BLIP-2 ViT-g forward, 224 px", ("blip2", "qformer_fwd"): "BLIP-2 Q-Former forward",
             ("blip2", "asea_qformer_fb"): "ASEA step, e_g on the ViT-g output (official; backward through the Q-Former)",
             ("blip2", "asea_vit_fb"): "ASEA step, e_g on the patch embeddings (before issue 14; backward through ViT-g)"}  # fmt: skip
    for (task, op), label in names.items():
        entry = m.get(task, {}).get(op)
        if entry is None:
            error = m.get(task, {}).get("error")
            lines.append(f"| {label} | {'failed: ' + error if error else 'not measured'} | | | |")
            continue
        peak = entry.get("peak_mib")
        lines.append(f"| {label} | {fmt_s(entry['seconds'])} | {fmt_s(entry.get('cpu_seconds', math.nan))} | "
                     f"{fmt_gib(peak if peak is not None else math.nan)} | {fmt_gib(weights_mib(m, task, bytes_per))} |")  # fmt: skip
    return "\n".join(lines)


def update_docs(path: Path, table: str) -> None:
    text = path.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        msg = f"{path} has no {DOCS_BEGIN} ... {DOCS_END} block"
        raise SystemExit(msg)
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    path.write_text(f"{head}{DOCS_BEGIN}\n{table}\n{DOCS_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, in this process: a smoke test")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one subprocess per component (default: on, off with --quick)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per operation, after one warm-up")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on CPU (default 1: its CPU time is the time on one idle core, whatever "
        "else runs on the machine; with 2+ threads on a loaded machine, spin-waiting inflates "
        "both the wall and the CPU time)",
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--from-json", type=Path, help="re-use these measurements; only recount")
    parser.add_argument("--update-docs", type=Path, help="replace the marked table block in this Markdown file")
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--task-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    try:
        return _run(args, dtype)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, dtype: torch.dtype) -> int:
    if args.task:  # child process: one component
        result = run_task(args.task, args.quick, args.device, dtype, args.repeats)
        args.task_output.write_text(json.dumps(result))
        return 0

    if args.from_json:
        measured = json.loads(args.from_json.read_text())
    else:
        meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
                           + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
                "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "quick": args.quick, "repeats": args.repeats, "cpus": os.cpu_count(),
                "load": [os.getloadavg()[0]]}  # fmt: skip
        measured = {"meta": meta, "tasks": {}}
        for name in args.tasks.split(","):
            started = time.perf_counter()
            if args.isolate is False or (args.isolate is None and args.quick):
                measured["tasks"][name] = run_task(name, args.quick, args.device, dtype, args.repeats)
            else:
                measured["tasks"][name] = run_in_subprocess(name, args)
            print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        meta["load"].append(os.getloadavg()[0])
        if args.json:
            args.json.write_text(json.dumps(measured, indent=1) + "\n")
    table = report(measured, synthesizer_counts())
    print(table)
    if args.update_docs:
        update_docs(args.update_docs, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
