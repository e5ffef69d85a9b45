#!/bin/bash
# Issue #14: the embedded default's wall time: masked / sliced at the last step (4177941) / sliced at every step (new)
# usage: NEW=/tmp/bench_tree OLD=/tmp/bench_old bash benchmarks/recipe_wall_time.sh   (git worktree add <dir> <commit> --detach)
# run nothing else meanwhile: every figure is a wall time
set -u
NEW=${NEW:?a worktree of the new commit}; OLD=${OLD:?a worktree of the old commit}; R=${R:-/tmp/recipe}; mkdir -p $R
run() {  # name tree extra...
  local name=$1 tree=$2; shift 2
  echo "== $name start $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  local t0=$(date +%s.%N)
  (cd $tree && PYTHONPATH=$tree python recipes/prune_deit.py --output_dir $R/$name "$@" > $R/$name.log 2>&1)
  local rc=$?
  local t1=$(date +%s.%N)
  echo "== $name rc $rc wall $(python3 -c "print(round($t1-$t0,1))") s, end $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  grep -o "'train_runtime': '[0-9.]*'\|'train_runtime': [0-9.]*\|train_runtime[^,]*" $R/$name.log | tr '\n' ' '; echo
  grep -A8 "^MDP on" $R/$name.log
}
run table $NEW
T=$R/table/latency_table.json
ls -la $T
run masked $NEW --latency_table $T --slice_after_pruning false
run old_code $OLD --latency_table $T
run every_step $NEW --latency_table $T
