"""Independent check of chain_dp on a huge instance: the Pyomo/HiGHS MILP with a long time limit.

chain_dp proves its own optimality (Pareto DP with Lagrangian bounds, see docs/solver.md). On the huge shapes
HiGHS proves nothing in 60 s, so this runs the MILP much longer on one instance and compares:
- the MILP's incumbent must never beat chain_dp's objective (else chain_dp missed a better solution);
- the MILP's bound must never fall below chain_dp's objective (else chain_dp's answer is infeasible or
  over-counted);
- if the MILP closes its gap, the two optima must agree: an independent proof.

    python benchmarks/solver_crosscheck.py --family resnet101_huge --budget 0.5 --time-limit 1200
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from solver import FAMILIES  # noqa: E402

from mdp_hf.solver import solve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="resnet101_huge")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=1200.0)
    args = parser.parse_args()

    problem = FAMILIES[args.family](args.seed, args.budget)
    start = time.perf_counter()
    dp = solve(problem, "auto")
    dp_s = time.perf_counter() - start
    print(
        f"{args.family} seed {args.seed} budget {args.budget}: auto ({dp.backend}) {dp.status} objective "
        f"{dp.objective:.6f} latency {dp.latency_ms:.6f}/{problem.budget_ms:.6f} ms in {dp_s:.2f} s",
        flush=True,
    )
    start = time.perf_counter()
    milp = solve(problem, "milp", time_limit=args.time_limit)
    milp_s = time.perf_counter() - start
    print(
        f"milp {milp.status} objective {milp.objective:.6f} bound {milp.bound:.6f} gap {milp.gap:.3g} "
        f"in {milp_s:.0f} s (limit {args.time_limit:.0f} s)"
    )
    tol = 1e-9 * max(1.0, abs(dp.objective))
    beats = milp.objective > dp.objective + tol
    below = milp.bound < dp.objective - tol
    print(
        f"MILP incumbent beats chain_dp: {beats}; MILP bound below chain_dp's objective: {below}; "
        f"MILP incumbent relative to chain_dp: {(milp.objective - dp.objective) / abs(dp.objective):+.2e}"
    )
    if milp.status == "optimal":
        print(f"independent proof: optima agree to {abs(milp.objective - dp.objective) / abs(dp.objective):.1e}")
    else:
        print("no independent proof: the MILP did not close its gap within the limit")


if __name__ == "__main__":
    main()
