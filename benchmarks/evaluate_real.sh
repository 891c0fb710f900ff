#!/usr/bin/env bash
# The 1-shot evaluation on real defects behind docs/results.md (issue 4). Needs the non-commercial data set
# (MVTec AD bottle/capsule/grid with masks, Intel hazelnut toy set, DTD textures) under DATA (default ../shared/data);
# nothing of it is committed. About 33 minutes on 2 idle CPU cores (measured: 32.8).
#   benchmarks/evaluate_real.sh [DATA] [OUTPUT]
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data}"
output="${2:-results/evaluation_real}"
command=(anomalib-synth evaluate --data-root "$data"
  --categories mvtec_ad/bottle,mvtec_ad/capsule,mvtec_ad/grid,hazelnut_toy --shots 1
  --synthesizers anomalib-perlin,perlin,cutpaste,nsa --protocol segmentation,draem --seeds 0,1,2
  --image-size 96 --budget segmentation:steps=150 --budget draem:steps=10,batch_size=2
  --texture-dir "$data/textures/dtd/images" --output "$output" --workers 2)
HF_HUB_OFFLINE=1 "${command[@]}" -q > /dev/null
python benchmarks/make_results_doc.py "$output" docs --command "${command[*]}" --notes docs/results_notes.md
