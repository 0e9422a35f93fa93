#!/usr/bin/env bash
# The AlterMOMA readings grid (docs/altermoma.md) on one machine with many cores (and a GPU), in one go:
#   1. the reference models (camera trunk, single-modality models, camera-LiDAR / camera-radar fusion from the
#      pre-trained backbones) and the dense + SNIP seed-0 cells, in one process;
#   2. every other cell as its own `fusionlens reproduce altermoma` process, PARALLEL at a time, in priority order
#      (85 %: SNIP, ProsPr, paper-literal AlterMOMA and three readings x 2 pairs x 3 seeds; then the beta/alpha
#      ablation of each reading; then 80 and 90 %), next to the split-half reliability benchmark of both pairs;
#   3. the cell tree (checkpoints left out), logs and the reliability tables packed into OUT_DIR/grid.tgz.
# Cells are resumable files, so a run cut off by BUDGET_S keeps every finished cell.
#
#   benchmarks/altermoma_readings_grid.sh OUT_DIR [TREE] [DEVICE] [PARALLEL] [BUDGET_S] [FINETUNE_STEPS]
#   e.g. PYTHON=python3 PYTHONPATH=src benchmarks/altermoma_readings_grid.sh $OUT /tmp/am cuda 12 520
set -u
OUTD=$1
TREE=${2:-out/reproduce/altermoma}
DEV=${3:-cpu}
PAR=${4:-2}
BUDGET=${5:-100000}
FT=${6:-200}
PY=${PYTHON:-python}
SMALL=${SMALL:-}  # extra flags for a smoke run (tiny sizes)
start=$(date +%s)
mkdir -p "$OUTD" "$TREE"
LOGS="$TREE/device-logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
run() { "$PY" -m fusionlens reproduce altermoma --out "$TREE" --structured-ratios "" --no-progress \
        --finetune-steps "$FT" $SMALL "$@"; }

# 1. reference models + dense cells + SNIP seed 0 (all cores for the CPU-only camera trunk)
if ! OMP_NUM_THREADS=16 run --device "$DEV" --pairs "camera,lidar;camera,radar" --methods snip --sparsities 0.85 \
        --seeds 0 --betas "" > "$LOGS/phase1.log" 2>&1; then
    echo "phase 1 failed on $DEV (tail below); going on on the CPU"; tail -20 "$LOGS/phase1.log"
    DEV=cpu
    OMP_NUM_THREADS=16 run --device cpu --pairs "camera,lidar;camera,radar" --methods snip --sparsities 0.85 \
        --seeds 0 --betas "" > "$LOGS/phase1-cpu.log" 2>&1 || { tail -20 "$LOGS/phase1-cpu.log"; }
fi
echo "phase 1 done after $(( $(date +%s) - start )) s on $DEV"

# 2. the cells, one process each
export OMP_NUM_THREADS=1
READINGS=("" "--altermoma-batches 8" "--altermoma-batches 8 --altermoma-same-batches" "--altermoma-optimizer adam")
JOBS="$LOGS/jobs.txt"
: > "$JOBS"
grid() {  # every method and reading at sparsity $1
    for seed in 0 1 2; do
        for pair in camera,lidar camera,radar; do
            for m in snip prospr; do
                echo "--pairs $pair --methods $m --sparsities $1 --seeds $seed --betas ''"
            done
            for r in "${READINGS[@]}"; do
                echo "--pairs $pair --methods altermoma --sparsities $1 --seeds $seed --betas '' $r"
            done
        done
    done
}
grid 0.85 >> "$JOBS"
for beta in 0 0.5 2; do
    for r in "${READINGS[@]}"; do  # the SNIP cell (done in phase 1) keeps the ablation from recomputing AlterMOMA
        echo "--pairs camera,lidar --methods snip --sparsities 0.85 --seeds 0 --betas $beta --ablation-sparsities 0.85 $r" \
            >> "$JOBS"
    done
done
grid 0.8 >> "$JOBS"
grid 0.9 >> "$JOBS"
rel() {  # split-half reliability of one pair's reference model ($2: the device)
    "$PY" benchmarks/altermoma_reliability.py --checkpoint "$TREE/pretrained/checkpoints/tiny_$1_pre.pt" \
        --device "$2" --readings sgd,adam --json "$LOGS/reliability_$1.json" $RELIABILITY \
        > "$LOGS/reliability_$1.md" 2> "$LOGS/reliability_$1.err"
}
RELIABILITY=${RELIABILITY:-}
left=$(( BUDGET - ($(date +%s) - start) ))
[ "$left" -lt 30 ] && left=30  # phase 1 overran: still start a few cells and the reliability runs
export -f run rel
export PY TREE FT SMALL LOGS DEV RELIABILITY
timeout "$left" bash -c 'rel camera-lidar "$DEV" || rel camera-lidar cpu' &
timeout "$left" bash -c 'rel camera-radar "$DEV" || rel camera-radar cpu' &
timeout "$left" xargs -P "$PAR" -d '\n' -I{} bash -c \
    'n=$(echo "{}" | md5sum | cut -c1-8); run --device "$DEV" {} > "$LOGS/cell-$n.log" 2>&1 ||
     { echo "FAILED on $DEV: {}" >> "$LOGS/failed.txt"; run --device cpu {} >> "$LOGS/cell-$n.log" 2>&1; } ||
     echo "FAILED on cpu: {}" >> "$LOGS/failed.txt"' \
    < "$JOBS"
wait
echo "phase 2 stopped after $(( $(date +%s) - start )) s; cells: $(find "$TREE" -name 'seed*.json' | wc -l)"

# 3. pack everything but the checkpoints
tar czf "$OUTD/grid.tgz" -C "$TREE" --exclude='*.pt' .
[ -f "$LOGS/failed.txt" ] && { echo "failed jobs:"; head -5 "$LOGS/failed.txt"; }
cat "$LOGS"/reliability_*.md 2>/dev/null | tail -30
