"""The k-shot evaluation harness: (protocol, category, synthesizer, seed) runs, resumable and in parallel."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ..io import write_png, write_text
from . import detectors, oneshot, protocols  # noqa: F401  (register the protocols)
from .base import REGISTRY, Budget, RunContext, get_protocol
from .data import load_category, load_images, load_test_set
from .scores import METRICS, evaluate_maps, normalise

DEFAULT_BUDGETS = {name: protocol.budget for name, protocol in REGISTRY.items()}
PREVIEW = 6  # test images per category kept (at 64 px) for the report's strips
DEFAULT_BACKBONE = "efficientnet_lite0.local"
PATCHCORE_LAYERS = ("blocks.1", "blocks.2")
"""PatchCore's default layers on EfficientNet-Lite0 (strides 4 and 8: finer maps; measured stronger than
``blocks.2,blocks.4`` on every category, see docs/results.md), so that ``control-patchcore`` is a strong control."""
DETECTOR_LAYERS = ("blocks.2", "blocks.4")
"""SuperSimpleNet's and GLASS's default layers (strides 8 and 16, like their WideResNet ``layer2,layer3``)."""


@dataclass
class EvalConfig:
    """Everything that defines an evaluation (stored in ``results.json``)."""

    data_root: str
    categories: list[str]
    synthesizers: list[str]
    protocols: list[str] = field(default_factory=lambda: ["segmentation"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    shots: int = 1
    image_size: int | None = None
    texture_dir: str | None = None
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: str = "anomalib.models.Patchcore"
    model_args: dict[str, Any] = field(default_factory=dict)
    workers: int = 2
    backbone: str | None = DEFAULT_BACKBONE
    layers: list[str] | None = None  # None: PATCHCORE_LAYERS for PatchCore, DETECTOR_LAYERS for the others
    backbone_weights: dict[str, str] = field(default_factory=dict)
    feature_cache: bool = True  # per-image cache of the frozen backbone's features within a run (same results)
    extra_normals: int = 0  # normal images beyond the shots for validation splits (0: strict k-shot, views only)
    segmenter_dir: str | None = None  # pretrained one-prompt segmenters (None: OUTPUT/segmenters)
    protocol_synthesizers: dict[str, list[str]] = field(default_factory=dict)  # per protocol, instead of synthesizers

    def synthesizers_for(self, protocol: str) -> list[str]:
        """The synthesizers ``protocol`` runs: ``protocol_synthesizers[protocol]`` if set, else ``synthesizers``."""
        return list(self.protocol_synthesizers.get(protocol, self.synthesizers))

    def budget(self, protocol: str) -> Budget:
        """The protocol's budget: its default, ``image_size`` if set, then ``budgets[protocol]``."""
        base = asdict(get_protocol(protocol).budget)
        if self.image_size is not None:
            base["image_size"] = self.image_size
        return Budget(**{**base, **self.budgets.get(protocol, {})})

    def layers_for(self, model: str) -> list[str]:
        """The backbone layers of ``model`` (``"patchcore"`` or another detector): ``layers`` if set."""
        if self.layers:
            return list(self.layers)
        return list(PATCHCORE_LAYERS if model == "patchcore" else DETECTOR_LAYERS)

    def size(self, protocol: str) -> tuple[int, int]:
        side = self.budget(protocol).image_size or 256
        return (side, side)

    def register_backbones(self) -> None:
        """Register the built-in offline backbones and ``backbone_weights`` with timm (in every worker)."""
        from ..backbones import register_builtin, register_weights

        register_builtin()
        for name, path in self.backbone_weights.items():
            register_weights(name, path)

    def validate(self) -> None:
        self.categories = list(dict.fromkeys(self.categories))  # duplicates would be run (and counted) twice
        self.synthesizers = list(dict.fromkeys(self.synthesizers))
        self.seeds = list(dict.fromkeys(self.seeds))
        fields = set(asdict(Budget()))
        for protocol, budget in self.budgets.items():
            bad = sorted(set(budget) - fields)
            if bad:
                msg = f"unknown budget setting(s) {bad} for {protocol}; choose from {sorted(fields)}"
                raise ValueError(msg)
        unknown = sorted(set(self.protocols) - set(REGISTRY))
        if unknown:
            msg = f"unknown protocol(s) {unknown}; choose from {tuple(REGISTRY)}"
            raise ValueError(msg)
        if self.backbone in ("", "none"):
            self.backbone = None
        if self.backbone is None:
            needing = [p for p in self.protocols if get_protocol(p).needs_backbone]
            if needing:
                msg = f"protocol(s) {needing} run anomalib's detectors on a pretrained backbone: give one (--backbone)"
                raise ValueError(msg)
        else:
            from ..backbones import check_pretrained, feature_layers

            self.register_backbones()
            check_pretrained(self.backbone)  # a clear error now rather than in every run
            available = feature_layers(self.backbone)
            bad = sorted({layer for m in ("patchcore", "glass") for layer in self.layers_for(m)} - set(available))
            if bad:  # anomalib would drop them with a warning and fail later
                msg = f"layer(s) {bad} are not feature layers of {self.backbone}; choose from {available}"
                raise ValueError(msg)
        for category in self.categories:
            load_category(self.data_root, category)  # a clear error for a missing or malformed category
        if self.texture_dir is not None:
            from ..io import list_images

            list_images(self.texture_dir)
        from ..synthesizers import available

        names = set(available()) | {"none"}
        unknown = sorted(set(self.protocol_synthesizers) - set(self.protocols))
        if unknown:
            msg = f"synthesizers given for protocol(s) {unknown} that this evaluation does not run"
            raise ValueError(msg)
        every = [*self.synthesizers, *(s for names_ in self.protocol_synthesizers.values() for s in names_)]
        bad = sorted({part for s in every for part in s.split("+")} - names)
        if bad:
            msg = f"unknown synthesizer(s) {bad}; available: {', '.join(sorted(names))}"
            raise ValueError(msg)


def run_path(output: Path, protocol: str, category: str, method: str, seed: int) -> Path:
    return output / "runs" / protocol / category.strip("/") / method / f"seed{seed}.json"


RUN_SETTINGS = (
    "data_root",
    "shots",
    "image_size",
    "texture_dir",
    "budgets",
    "model",
    "model_args",
    "backbone",
    "layers",
    "backbone_weights",
    "extra_normals",
)
"""Settings that change a run's result: a resumed evaluation must use the same ones."""


def check_settings(config: EvalConfig, output: Path) -> None:
    """Record the run-defining settings in ``output/settings.json``, or refuse to mix runs made with others."""
    settings = {key: asdict(config)[key] for key in RUN_SETTINGS}
    # the budgets each protocol runs with, defaults included: a resume with other defaults (code) is refused too
    settings["resolved_budgets"] = {p: asdict(config.budget(p)) for p in sorted(config.protocols)}
    path = output / "settings.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        resolved = previous.get("resolved_budgets", {})
        changed = sorted(k for k in RUN_SETTINGS if previous.get(k) != json.loads(json.dumps(settings[k])))
        changed += [f"budget of {p}" for p, b in settings["resolved_budgets"].items() if p in resolved
                    and resolved[p] != json.loads(json.dumps(b))]  # fmt: skip
        if changed:
            msg = (
                f"{output} holds runs made with other settings ({', '.join(changed)}); "
                "use another output folder or delete it"
            )
            raise ValueError(msg)
        missing = {p: b for p, b in settings["resolved_budgets"].items() if p not in resolved}
        if missing:  # protocols added to an evaluation: record their budgets too
            previous["resolved_budgets"] = {**resolved, **missing}
            write_text(path, json.dumps(previous, indent=1))
        return
    write_text(path, json.dumps(settings, indent=1))


def plan(config: EvalConfig) -> list[dict[str, Any]]:
    """Every run of the evaluation: per protocol, its controls and synthesizers (``Protocol.methods``);
    ``control-patchcore`` only with a backbone."""
    tasks = []
    for name in config.protocols:
        methods = get_protocol(name).methods(config.synthesizers_for(name))
        if config.backbone is None:
            methods = [m for m in methods if m != "control-patchcore"]
        for category in config.categories:
            for method in methods:
                for seed in config.seeds:
                    tasks.append({"protocol": name, "category": category, "method": method, "seed": seed})
    return tasks


def shared_control_aliases(config: EvalConfig, tasks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """``{id(task): earlier task}`` for the shared controls (``control-shot-diff``, ``control-patchcore``) that an
    earlier protocol of the same image size already runs: they depend only on the shots, the seed and the size, so
    they run once and are reported under every protocol."""
    from .base import SHARED_CONTROLS

    first: dict[tuple, dict[str, Any]] = {}
    aliases = {}
    for task in tasks:
        if task["method"] not in SHARED_CONTROLS:
            continue
        key = (task["category"], task["method"], task["seed"], config.size(task["protocol"]))
        if key in first:
            aliases[id(task)] = first[key]
        else:
            first[key] = task
    return aliases


def held_out_normals(data: Any, shots: list[Path], count: int, seed: int) -> list[Path]:
    """Up to ``count`` normal training images that are not shots (none when the shots come from the test set),
    drawn reproducibly. Only with ``EvalConfig.extra_normals`` (an explicit option): by default a k-shot run sees
    its k shots and nothing else, and validation splits are made of augmented views of them."""
    if data.shots_from_test or count <= 0:
        return []
    candidates = [p for p in data.normal if p not in shots]
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return [candidates[i] for i in order[:count]]


def execute(task: dict[str, Any], config: EvalConfig, output: Path) -> dict[str, Any]:
    """Run one task and return its record (metrics, timing, losses, preview maps)."""
    start, cpu = time.perf_counter(), time.process_time()
    protocol = get_protocol(task["protocol"])
    budget = config.budget(task["protocol"])
    size = config.size(task["protocol"])
    data = load_category(config.data_root, task["category"])
    shot_paths, test = data.split(config.shots, task["seed"])
    images, masks, labels = load_test_set(test, size)
    method, seed = task["method"], task["seed"]
    ctx = RunContext(config=config, category=task["category"], seed=seed, budget=budget, size=size,
                     shot_paths=shot_paths, shots=load_images(shot_paths, size), test_images=images, test_masks=masks,
                     test_labels=labels, val_paths=held_out_normals(data, shot_paths, config.extra_normals, seed),
                     test_paths=[s.image for s in test])  # fmt: skip
    outcome = protocol.run(method, ctx)
    nan = float("nan")
    metrics = evaluate_maps(outcome.maps, masks, labels) if outcome.maps is not None else {m: nan for m in METRICS}
    metrics = {**{m: nan for m in METRICS}, **metrics, **outcome.metrics}
    order = sorted(range(len(test)), key=lambda i: (not test[i].label, str(test[i].image)))[:PREVIEW]
    preview = None
    if seed == config.seeds[0] and outcome.maps is not None:  # maps of a few test images, for the report's strips
        small = F.interpolate(outcome.maps[order][:, None].float(), size=(64, 64), mode="bilinear",
                              align_corners=False)  # fmt: skip
        preview = run_path(output, task["protocol"], task["category"], method, seed).with_suffix(".png")
        write_png(preview, make_grid(normalise(small), nrow=len(order), padding=0))
    losses = outcome.losses
    return {
        **task,
        "metrics": metrics,
        "shots": [str(p) for p in shot_paths],
        "shots_from_test": data.shots_from_test,
        "n_test": len(test),
        "n_anomalous": int(labels.sum()),
        "image_size": size[0],
        "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "info": outcome.info,
        "preview_images": [str(test[i].image) for i in order],
        "preview": None if preview is None else str(preview.relative_to(output)),
    }


def _work(args: tuple[dict[str, Any], dict[str, Any], str]) -> dict[str, Any]:
    task, config_dict, output = args
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = EvalConfig(**config_dict)
    # timm warns of the classifier tensors a features-only backbone does not load, at every model built
    logging.getLogger("timm.models._builder").setLevel(logging.ERROR)
    if config.backbone is not None:
        config.register_backbones()  # timm's registry is per process (spawned workers start empty)
    try:
        record = execute(task, config, Path(output))
    finally:
        torch.set_num_threads(threads)
    path = run_path(Path(output), task["protocol"], task["category"], task["method"], task["seed"])
    write_text(path, json.dumps(record))
    return record


def _pretrain(args: tuple[dict[str, Any], str]) -> str:
    config_dict, category = args
    torch.set_num_threads(1)
    config = EvalConfig(**config_dict)
    config.register_backbones()
    return str(oneshot.pretrain_segmenter(config, config.budget("segmenter"), category))


def pretrain_segmenters(config: EvalConfig, progress: bool = True) -> list[str]:
    """Pretrain (or finish, or reuse) one segmenter per evaluated category, each leaving its category out; they
    run ``workers`` at a time, before the runs that read them."""
    names = list(dict.fromkeys(Path(c).name for c in config.categories))
    args = [(asdict(config), name) for name in names]
    with tqdm(total=len(args), desc="pretrain segmenters", unit="model", disable=not progress) as bar:
        if config.workers > 1 and len(args) > 1:
            with mp.get_context("spawn").Pool(min(config.workers, len(args))) as pool:
                folders = []
                for folder in pool.imap(_pretrain, args):
                    folders.append(folder)
                    bar.update(1)
        else:
            folders = []
            for arg in args:
                folders.append(_pretrain(arg))
                bar.update(1)
    return folders


def evaluate(config: EvalConfig, output: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run (or finish) the evaluation into ``output`` and write ``results.json``, ``results.md`` and plots.

    Finished runs (their JSON exists) are not redone, so an interrupted evaluation resumes.
    """
    from .report import write_report

    config.validate()
    output = Path(output)
    check_settings(config, output)
    if oneshot.needs_segmenter(config.protocols):
        config.segmenter_dir = config.segmenter_dir or str(output / "segmenters")
        pretrain_segmenters(config, progress)
    tasks = plan(config)
    aliases = shared_control_aliases(config, tasks)
    todo = [t for t in tasks if id(t) not in aliases and not run_path(output, **t).is_file()]
    args = [(t, asdict(config), str(output)) for t in todo]
    with tqdm(
        total=len(tasks), initial=len(tasks) - len(todo), desc="evaluate", unit="run", disable=not progress
    ) as bar:
        if config.workers > 1 and len(todo) > 1:
            context = mp.get_context("spawn")
            with context.Pool(config.workers, maxtasksperchild=32) as pool:
                for record in pool.imap_unordered(_work, args):
                    bar.set_postfix_str(f"{record['category']}/{record['method']}/{record['seed']}")
                    bar.update(1)
        else:
            for arg in args:
                record = _work(arg)
                bar.set_postfix_str(f"{record['category']}/{record['method']}/{record['seed']}")
                bar.update(1)
    for task in tasks:  # the shared controls of later protocols: the record of the first, under their name
        source = aliases.get(id(task))
        if source is not None and not run_path(output, **task).is_file():
            record = {**json.loads(run_path(output, **source).read_text()), "protocol": task["protocol"]}
            write_text(run_path(output, **task), json.dumps({**record, "computed_in": source["protocol"]}))
    records = [json.loads(run_path(output, **t).read_text()) for t in tasks]
    machine = f"{platform.machine()}, {mp.cpu_count()} CPU cores, torch {torch.__version__}, {config.workers} workers"
    return write_report(config, records, output, machine)
