#!/usr/bin/env bash
# The evidence-v2 study (issue 15) on a 2-core CPU machine: docs/pareto.md. Resumable: run it again to finish.
# Timing stages run alone; the training stages run on two workers of one thread each (the latency checks and
# bisections inside them then time beside one other busy process: benchmarks/busy_table.py found that costs
# little, where a third process makes timings worthless). Run nothing else meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/pareto_v2}
N=${N:-200}
mkdir -p "$OUT"
P="python benchmarks/pareto.py --out $OUT"
ALL="mdp mdp_stem widths_table blocks_linear halp uniform torch_pruning"

$P --stage dense --family deit > "$OUT/dense_deit.log" 2>&1 &
$P --stage dense --family resnet > "$OUT/dense_resnet.log" 2>&1
wait
$P --stage table --family both > "$OUT/table.log" 2>&1   # alone

worker_a() {
  for seed in 0 1; do $P --stage run --family deit --seed "$seed" --finetune_steps "$N" --methods $ALL; done
  $P --stage run --family deit --seed 0 --finetune_steps $((2 * N)) --budgets 0.3 --methods $ALL
  $P --stage run --family deit --seed 0 --finetune_steps "$N" --methods small_dense
}
worker_b() {
  for seed in 0 1 2; do $P --stage run --family resnet --seed "$seed" --finetune_steps "$N" --methods $ALL; done
  $P --stage run --family deit --seed 2 --finetune_steps "$N" --methods $ALL
  $P --stage run --family resnet --seed 0 --finetune_steps "$N" --methods small_dense
  $P --stage run --family resnet --seed 0 --finetune_steps $((2 * N)) --budgets 0.3 --methods $ALL
}
worker_a > "$OUT/worker_a.log" 2>&1 &
worker_b > "$OUT/worker_b.log" 2>&1
wait
$P --stage measure > "$OUT/measure.log" 2>&1   # alone
$P --stage report --finetune_steps "$N" > "$OUT/report.log" 2>&1
echo "done: $OUT/report.md, docs/pareto_v2_*.png"
