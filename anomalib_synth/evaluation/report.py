"""``results.json``, ``results.md`` and plots of an evaluation."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..io import write_text
from .protocols import CONTROLS
from .scores import METRICS


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, dict[str, float]]]]]:
    """``{protocol: {category: {method: {metric: {"mean", "std", "n"}}}}}`` over seeds."""
    grouped: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for r in records:
        grouped.setdefault((r["protocol"], r["category"], r["method"]), []).append(r["metrics"])
    out: dict = {}
    for (protocol, category, method), runs in grouped.items():
        stats = {}
        for metric in METRICS:
            values = [run[metric] for run in runs]
            stats[metric] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
        out.setdefault(protocol, {}).setdefault(category, {})[method] = stats
    return out


def _methods(table: dict[str, dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for per_method in table.values():
        for method in per_method:
            if method not in seen:
                seen.append(method)
    return [m for m in seen if m in CONTROLS] + [m for m in seen if m not in CONTROLS]


def verdicts(table: dict[str, dict[str, Any]], metric: str = "pixel_AP") -> dict[str, str]:
    """Per category: does the best synthesizer beat both controls (mean over seeds)?"""
    out = {}
    for category, per_method in table.items():
        controls = {m: v[metric]["mean"] for m, v in per_method.items() if m in CONTROLS}
        synths = {m: v[metric]["mean"] for m, v in per_method.items() if m not in (*CONTROLS, "none")}
        if not synths or not controls:
            continue
        best = max(synths, key=synths.get)
        margin = synths[best] - max(controls.values())
        spread = per_method[best][metric]["std"]
        which = "both controls" if len(controls) > 1 else "the control"
        if margin > 0:
            word = f"beats {which}" + (" (by less than the seed spread)" if margin < spread else "")
        else:
            word = f"does NOT beat {which}"
        out[category] = f"best: `{best}` ({synths[best]:.3f}) {word}; best control {max(controls.values()):.3f}"
    return out


def markdown_table(table: dict[str, dict[str, Any]], metric: str) -> str:
    categories = list(table)
    methods = _methods(table)
    lines = [
        "| method | " + " | ".join(categories) + " | mean |",
        "|---|" + "---|" * (len(categories) + 1),
    ]
    for method in methods:
        cells, means = [], []
        for category in categories:
            stats = table[category].get(method, {}).get(metric)
            if stats is None:
                cells.append("-")
                continue
            means.append(stats["mean"])
            cells.append(f"{stats['mean']:.3f} ± {stats['std']:.3f}")
        mean = f"{statistics.fmean(means):.3f}" if len(means) == len(categories) else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def write_report(config: Any, records: list[dict[str, Any]], output: Path, machine: str) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and the plots; return the results dict."""
    tables = aggregate(records)
    results = {"config": asdict(config), "machine": machine, "aggregate": tables, "runs": records}
    write_text(output / "results.json", json.dumps(results, indent=1))
    shots_from_test = sorted({r["category"] for r in records if r["shots_from_test"]})
    lines = [
        f"# k-shot evaluation ({config.shots}-shot, {len(config.seeds)} seeds, {config.image_size} px)",
        "",
        f"Machine: {machine}. Data: `{config.data_root}`. Textures: "
        + (f"`{config.texture_dir}` (given to every synthesizer that takes an anomaly source)" if config.texture_dir
           else "none (each synthesizer's own fallback source)"),  # fmt: skip
        "",
        "Cells are mean ± std over seeds. `control-untrained` is the protocol's network without training, "
        "`control-shot-diff` the blurred absolute difference to the nearest shot: a synthesizer helps only where it "
        "beats both. Do not read gaps smaller than the std as a ranking.",
    ]
    if shots_from_test:
        lines += ["", f"No `train/good` in {', '.join(shots_from_test)}: shots drawn from `test/good` and removed "
                      "from the test set."]  # fmt: skip
    for protocol, table in tables.items():
        budget = config.budget(protocol)
        if protocol == "segmentation":
            text = (f"{budget.steps} AdamW steps, batch {budget.batch_size}, lr {budget.lr}, anomaly ratio "
                    f"{budget.anomaly_ratio}")  # fmt: skip
        else:  # the model's own optimiser; one-epoch models (Patchcore, Padim) stop after their epoch
            text = f"at most {budget.steps} steps, batch {budget.batch_size}, anomaly ratio {budget.anomaly_ratio}"
        lines += ["", f"## Protocol `{protocol}`", "", f"Budget: {text}.", ""]
        for metric, title in (("pixel_AP", "Pixel AP (primary)"), ("pixel_AUROC", "Pixel AUROC"),
                              ("pixel_F1max", "Pixel F1-max"), ("image_AUROC", "Image AUROC")):  # fmt: skip
            lines += [f"### {title}", "", markdown_table(table, metric), ""]
        lines += ["### Verdict (pixel AP)", ""]
        lines += [f"- {category}: {text}" for category, text in verdicts(table).items()]
    write_text(output / "results.md", "\n".join(lines) + "\n")
    plot_bars(tables, output)
    plot_strips(records, output, Path(config.data_root))
    return results


def plot_bars(tables: dict[str, Any], output: Path) -> None:
    """One bar chart per protocol: pixel AUROC and pixel AP per category and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for protocol, table in tables.items():
        categories, methods = list(table), _methods(table)
        fig, axes = plt.subplots(1, 2, figsize=(max(6, 2.2 * len(categories)) * 2, 3.6))
        width = 0.8 / max(1, len(methods))
        for ax, metric in zip(axes, ("pixel_AUROC", "pixel_AP"), strict=True):
            for j, method in enumerate(methods):
                means = [table[c].get(method, {}).get(metric, {}).get("mean", 0) for c in categories]
                stds = [table[c].get(method, {}).get(metric, {}).get("std", 0) for c in categories]
                xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(categories))]
                ax.bar(xs, means, width, yerr=stds, label=method, hatch="//" if method in CONTROLS else None)
            ax.set_xticks(range(len(categories)), categories)
            ax.set_ylim(0, 1)
            ax.set_title(f"{protocol}: {metric}")
        axes[0].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(output / f"bars_{protocol}.png", dpi=80)
        plt.close(fig)


def plot_strips(records: list[dict[str, Any]], output: Path, data_root: Path) -> None:
    """Per protocol and category: real test images, their ground truth and each method's maps (first seed)."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from ..io import read_image, resize, to_uint8
    from .data import load_category, read_mask

    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("preview"):
            by_key.setdefault((r["protocol"], r["category"]), []).append(r)
    for (protocol, category), runs in by_key.items():
        runs.sort(key=lambda r: (r["method"] not in CONTROLS, r["method"]))
        images = runs[0]["preview_images"]
        samples = {str(s.image): s for s in load_category(data_root, category).test}
        row_images = torch.cat([resize(read_image(p), (64, 64)) for p in images], dim=2)
        row_masks = torch.cat([read_mask(samples[p].masks, (64, 64)).float()[None].expand(3, -1, -1) for p in images], 2)
        rows = [("image", to_uint8(row_images)), ("ground truth", to_uint8(row_masks))]
        for r in runs:
            with Image.open(output / r["preview"]) as img:
                rows.append((r["method"], np.asarray(img.convert("RGB"))))
        label_w, h = 120, 64
        canvas = Image.new("RGB", (label_w + 64 * len(images), h * len(rows)), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (label, array) in enumerate(rows):
            canvas.paste(Image.fromarray(array), (label_w, i * h))
            draw.text((4, i * h + 26), label, fill=(0, 0, 0))
        canvas.save(output / f"strip_{protocol}_{category.strip('/').replace('/', '_')}.png")
