#!/usr/bin/env bash
# The three everyday commands on synthetic slides: tile with QuPath labels, train, predict.
#
#   bash examples/tile_train_predict.sh [WORKDIR]      # a few minutes on 2 CPU cores
#
# SLIDE_PX (default 4096), EPOCHS (4) and ITERATIONS (30 per epoch) make it smaller or larger.
set -euo pipefail
work=${1:-example-run}
slide_px=${SLIDE_PX:-4096}
epochs=${EPOCHS:-4}
iterations=${ITERATIONS:-30}
histoduo=${HISTODUO:-histoduo}
mkdir -p "$work/slides" "$work/annotations"
cd "$work"

# Synthetic 40x slides; each comes with its ground-truth regions as QuPath GeoJSON.
"$histoduo" synth slides --count 4 --width "$slide_px" --height $((slide_px * 3 / 4)) --seed 10
"$histoduo" synth new_slides/held_out.svs --width "$slide_px" --height $((slide_px * 3 / 4)) --seed 99
for geojson in slides/*.geojson; do cp "$geojson" annotations/; done

# 1. Tissue detection and tiling at 20x, tiles labelled by the annotations.
"$histoduo" tile slides/ --out tiles.h5 --mag 20 --tile-size 64 --annotations annotations/ \
    --classes normal,low_grade,high_grade,necrosis --labelled-only --quiet

# 2. A small DuoFormer (the paper's ResNet-50 / 768-d / 8+8 blocks needs a GPU).
"$histoduo" train tiles.h5 --out runs/ccrcc --backbone resnet18 --stages 2,3,4 --embed-dim 64 \
    --scale-depth 1 --patch-depth 1 --scale-heads 4 --patch-heads 4 --epochs "$epochs" \
    --iterations "$iterations" --lr 1e-3 --val-fraction 0.25 --test-fraction 0 --quiet

# 3. Grade new slides: maps, CSV and QuPath reports.
"$histoduo" predict new_slides/ --model runs/ccrcc/best.pt --out results/ --heatmap --quiet
cat results/slides.csv
