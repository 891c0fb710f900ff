"""Real-data check of AnomalyXFusion's data path: train the *tiny random* model on MVTec AD triples with captions.

    python benchmarks/xfusion_tiny_train.py --data-root ../shared/data/mvtec_ad \
        --captions ../shared/data/mvtec_caption/mvtec_ad_caption.json --categories bottle,grid --steps 300
    python benchmarks/xfusion_tiny_train.py --quick    # 3 steps on bottle, a smoke run

This proves that real images, masks and captions flow through training (``anomalib-synth train xfusion``), that the
loss falls, and that the trained adapter samples through ``XFusionSynthesizer``. It cannot show image quality:
that needs the real Stable Diffusion 1.5 and CLIP weights and a GPU, which this project's machines do not have.
Writes OUTPUT/loss.png (loss per step, with a running mean) and OUTPUT/samples.png (normal | synthetic | mask).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data/mvtec_ad")
    parser.add_argument("--captions", default="../shared/data/mvtec_caption/mvtec_ad_caption.json")
    parser.add_argument("--categories", default="bottle,grid")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--output", default="results/xfusion_tiny")
    parser.add_argument("--quick", action="store_true", help="3 steps on bottle, into a temporary folder (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        if not Path(args.data_root, "bottle").is_dir():
            print(f"skipped: no MVTec AD bottle under {args.data_root}")
            return
        args.categories, args.steps, args.batch_size, args.image_size = "bottle", 3, 2, 32
        args.output = tempfile.mkdtemp(prefix="xfusion-tiny-quick-")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from anomalib_synth.evaluation.data import load_category, load_images
    from anomalib_synth.io import to_uint8
    from anomalib_synth.synthesizers import get
    from anomalib_synth.testing import save_tiny_models
    from anomalib_synth.training.xfusion import train_xfusion

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    categories = args.categories.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        models = save_tiny_models(tmp)
        adapter = train_xfusion(args.data_root, args.captions, output / "run", categories=categories,
                                base_model=str(models["sd"]), clip_model=str(models["clip"]), max_steps=args.steps,
                                batch_size=args.batch_size, image_size=args.image_size, lr=1e-3, num_tokens=4)  # fmt: skip
        logs = sorted((output / "run" / "logs").glob("version_*/metrics.csv"))
        steps, losses = [], []
        for log in logs:
            with log.open() as f:
                for row in csv.DictReader(f):
                    if row.get("loss"):
                        steps.append(int(row["step"]))
                        losses.append(float(row["loss"]))
        window = max(1, len(losses) // 20)
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist() if len(losses) >= window else losses
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, losses, alpha=0.35, label="loss (Eq. 17, per step)")
        ax.plot(steps[window - 1 :], smooth, label=f"running mean ({window} steps)")
        ax.set_xlabel("step")
        ax.set_ylabel("mask-weighted L2")
        ax.set_title(f"AnomalyXFusion adapter on tiny random SD, {','.join(categories)}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(output / "loss.png", dpi=100)
        print(f"loss: first {window} steps {sum(losses[:window]) / window:.4f}, last {window} steps "
              f"{sum(losses[-window:]) / window:.4f} ({len(losses)} steps)")  # fmt: skip

        synth = get("xfusion", adapter=adapter, category=categories[0], num_inference_steps=20)
        normals = load_images(load_category(args.data_root, categories[0]).normal[:4], (args.image_size,) * 2)
        out = synth(normals, generator=torch.Generator().manual_seed(0))
        rows = [torch.cat([n, s, m.expand(3, -1, -1)], 2) for n, s, m in zip(normals, out.images, out.masks)]
        from PIL import Image

        Image.fromarray(to_uint8(torch.cat(rows, 1))).save(output / "samples.png")
    print(f"wrote {output / 'loss.png'} and {output / 'samples.png'}")


if __name__ == "__main__":
    main()
