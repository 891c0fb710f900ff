"""The k-shot evaluation harness: (protocol, category, synthesizer, seed) runs, resumable and in parallel."""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from torchvision.utils import make_grid

from ..io import write_png, write_text
from . import protocols
from .data import load_category, load_images, load_test_set
from .protocols import CONTROLS, PROTOCOLS, Budget
from .scores import evaluate_maps, normalise

DEFAULT_BUDGETS = {
    "segmentation": Budget(steps=300, batch_size=8, lr=1e-3),
    "draem": Budget(steps=40, batch_size=4, lr=1e-4),
    "anomalib": Budget(steps=40, batch_size=4, lr=1e-4),
}
PREVIEW = 6  # test images per category kept (at 64 px) for the report's strips


@dataclass
class EvalConfig:
    """Everything that defines an evaluation (stored in ``results.json``)."""

    data_root: str
    categories: list[str]
    synthesizers: list[str]
    protocols: list[str] = field(default_factory=lambda: ["segmentation"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    shots: int = 1
    image_size: int = 128
    texture_dir: str | None = None
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: str = "anomalib.models.Patchcore"
    model_args: dict[str, Any] = field(default_factory=dict)
    workers: int = 2

    def budget(self, protocol: str) -> Budget:
        return Budget(**{**asdict(DEFAULT_BUDGETS[protocol]), **self.budgets.get(protocol, {})})

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
        unknown = sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown:
            msg = f"unknown protocol(s) {unknown}; choose from {PROTOCOLS}"
            raise ValueError(msg)
        for category in self.categories:
            load_category(self.data_root, category)  # a clear error for a missing or malformed category
        if self.texture_dir is not None:
            from ..io import list_images

            list_images(self.texture_dir)
        from ..synthesizers import available

        names = set(available()) | {"none"}
        bad = sorted(set(self.synthesizers) - names)
        if bad:
            msg = f"unknown synthesizer(s) {bad}; available: {', '.join(sorted(names))}"
            raise ValueError(msg)


def run_path(output: Path, protocol: str, category: str, method: str, seed: int) -> Path:
    return output / "runs" / protocol / category.strip("/") / method / f"seed{seed}.json"


RUN_SETTINGS = ("data_root", "shots", "image_size", "texture_dir", "budgets", "model", "model_args")
"""Settings that change a run's result: a resumed evaluation must use the same ones."""


def check_settings(config: EvalConfig, output: Path) -> None:
    """Record the run-defining settings in ``output/settings.json``, or refuse to mix runs made with others."""
    settings = {key: asdict(config)[key] for key in RUN_SETTINGS}
    path = output / "settings.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in RUN_SETTINGS if previous.get(k) != json.loads(json.dumps(settings[k])))
        if changed:
            msg = (
                f"{output} holds runs made with other settings ({', '.join(changed)}); "
                "use another output folder or delete it"
            )
            raise ValueError(msg)
        return
    write_text(path, json.dumps(settings, indent=1))


def plan(config: EvalConfig) -> list[dict[str, Any]]:
    """Every run of the evaluation, controls included (``none`` only applies to the ``anomalib`` protocol)."""
    tasks = []
    for protocol in config.protocols:
        methods = [s for s in config.synthesizers if s != "none" or protocol == "anomalib"]
        controls = list(CONTROLS) if protocol != "anomalib" else ["control-shot-diff"]
        for category in config.categories:
            for method in [*controls, *methods]:
                for seed in config.seeds:
                    tasks.append({"protocol": protocol, "category": category, "method": method, "seed": seed})
    return tasks


def execute(task: dict[str, Any], config: EvalConfig, output: Path) -> dict[str, Any]:
    """Run one task and return its record (metrics, timing, losses, preview maps)."""
    start = time.perf_counter()
    size = (config.image_size, config.image_size)
    data = load_category(config.data_root, task["category"])
    shot_paths, test = data.split(config.shots, task["seed"])
    shots = load_images(shot_paths, size)
    images, masks, labels = load_test_set(test, size)
    budget = config.budget(task["protocol"])
    method, seed, protocol = task["method"], task["seed"], task["protocol"]
    losses: list[float] = []
    if method == "control-shot-diff":
        maps = protocols.shot_difference(shots, images)
    elif protocol == "segmentation":
        synth = None if method == "control-untrained" else protocols.make_synthesizer(
            method, config.texture_dir, test_images=[s.image for s in test]
        )
        maps, losses = protocols.segmentation(shots, images, synth, seed, budget)
    elif protocol == "draem":
        maps = protocols.draem(shot_paths, images, method, seed, budget, size, config.texture_dir,
                               train=method != "control-untrained")  # fmt: skip
    else:
        maps = protocols.anomalib_model(shot_paths, images, method, seed, budget, size, config.texture_dir,
                                        config.model, config.model_args)  # fmt: skip
    metrics = evaluate_maps(maps, masks, labels)
    order = sorted(range(len(test)), key=lambda i: (not test[i].label, str(test[i].image)))[:PREVIEW]
    preview = None
    if seed == config.seeds[0]:  # maps of a few test images, for the report's strips
        small = F.interpolate(maps[order][:, None].float(), size=(64, 64), mode="bilinear", align_corners=False)
        preview = run_path(output, protocol, task["category"], method, seed).with_suffix(".png")
        write_png(preview, make_grid(normalise(small), nrow=len(order), padding=0))
    return {
        **task,
        "metrics": metrics,
        "shots": [str(p) for p in shot_paths],
        "shots_from_test": data.shots_from_test,
        "n_test": len(test),
        "n_anomalous": int(labels.sum()),
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "preview_images": [str(test[i].image) for i in order],
        "preview": None if preview is None else str(preview.relative_to(output)),
    }


def _work(args: tuple[dict[str, Any], dict[str, Any], str]) -> dict[str, Any]:
    task, config_dict, output = args
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = execute(task, EvalConfig(**config_dict), Path(output))
    finally:
        torch.set_num_threads(threads)
    path = run_path(Path(output), task["protocol"], task["category"], task["method"], task["seed"])
    write_text(path, json.dumps(record))
    return record


def evaluate(config: EvalConfig, output: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run (or finish) the evaluation into ``output`` and write ``results.json``, ``results.md`` and plots.

    Finished runs (their JSON exists) are not redone, so an interrupted evaluation resumes.
    """
    from .report import write_report

    config.validate()
    output = Path(output)
    check_settings(config, output)
    tasks = plan(config)
    todo = [t for t in tasks if not run_path(output, **t).is_file()]
    args = [(t, asdict(config), str(output)) for t in todo]
    with tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="evaluate", unit="run", disable=not progress) as bar:
        if config.workers > 1 and len(todo) > 1:
            context = mp.get_context("spawn")
            with context.Pool(config.workers, maxtasksperchild=4) as pool:
                for record in pool.imap_unordered(_work, args):
                    bar.set_postfix_str(f"{record['category']}/{record['method']}/{record['seed']}")
                    bar.update(1)
        else:
            for arg in args:
                record = _work(arg)
                bar.set_postfix_str(f"{record['category']}/{record['method']}/{record['seed']}")
                bar.update(1)
    records = [json.loads(run_path(output, **t).read_text()) for t in tasks]
    machine = f"{platform.machine()}, {mp.cpu_count()} CPU cores, torch {torch.__version__}, {config.workers} workers"
    return write_report(config, records, output, machine)
