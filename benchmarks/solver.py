"""Solver benchmark on synthetic problems with the paper's shapes; prints markdown tables for docs/solver.md.

    python benchmarks/solver.py                 # full run (~10-15 min on 2 cores: the MILP dominates)
    python benchmarks/solver.py --no-milp       # chain_dp and greedy only (~1 min)

Table 1: one problem per family and budget: exact chain_dp (median of 3 runs) vs the Pyomo/HiGHS MILP (time
limit), greedy, and MindtPy when installed. Table 2: chain_dp over 3 seeds x 7 budgets per family, the
figures compared with the targets (proven optimal; CNN median <= 0.1 s, max <= 0.5 s; DeiT-B <= 1 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdp_hf.solver import BackendUnavailable, solve  # noqa: E402
from mdp_hf.solver import synthetic  # noqa: E402

FAMILIES = {
    "resnet50": lambda seed, f: synthetic.resnet(50, seed, f),
    "resnet101": lambda seed, f: synthetic.resnet(101, seed, f),
    "mobilenet_v1": lambda seed, f: synthetic.mobilenet_v1(seed, f),
    "deit_b": lambda seed, f: synthetic.deit(seed, f),
}
TARGETS = {"resnet50": (0.1, 0.5), "resnet101": (0.1, 0.5), "mobilenet_v1": (0.1, 0.5), "deit_b": (1.0, 1.0)}


def rel(a: float, b: float) -> str:
    return f"{(a - b) / abs(b):+.2e}" if b else "n/a"


def timed_chain(problem, repeats=3):
    runs = [solve(problem, backend="chain_dp") for _ in range(repeats)]
    best = runs[0]
    return best, statistics.median(r.solve_time_s for r in runs)


def table_per_problem(args):
    try:
        from mdp_hf.solver.pyomo_model import mindtpy_solvers

        mindtpy_solvers()
        have_mindtpy = True
    except BackendUnavailable as e:
        have_mindtpy = False
        print(f"MindtPy: not run ({e})\n")
    print("| family | budget | chain_dp s | status | gap | objective | MILP s | MILP status | MILP gap | "
          "MILP obj - exact (rel) | greedy s | greedy obj - exact (rel) | MindtPy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for family in args.families:
        for fraction in args.budgets:
            problem = FAMILIES[family](0, fraction)
            exact, t_exact = timed_chain(problem)
            row = [family, f"{fraction:.2f}", f"{t_exact:.3f}", exact.status, f"{exact.gap:.1e}", f"{exact.objective:.3f}"]
            milp_budgets = args.deit_milp_budgets if family == "deit_b" else args.budgets
            if args.milp and fraction in milp_budgets:
                limit = args.deit_milp_time_limit if family == "deit_b" else args.milp_time_limit
                milp = solve(problem, backend="milp", time_limit_s=limit)
                row += [f"{milp.solve_time_s:.1f}", milp.status, f"{milp.gap:.1e}", rel(milp.objective, exact.objective)]
            else:
                row += ["-", "not run", "-", "-"]
            greedy = solve(problem, backend="greedy")
            row += [f"{greedy.solve_time_s:.2f}", rel(greedy.objective, exact.objective)]
            if have_mindtpy:
                mt = solve(problem, backend="mindtpy", time_limit_s=args.milp_time_limit)
                row.append(f"{mt.solve_time_s:.1f} s, {rel(mt.objective, exact.objective)}")
            else:
                row.append("not installed")
            print("| " + " | ".join(row) + " |", flush=True)


def table_per_family(args):
    print("\n| family | problems | all proven optimal | median s | max s | target median / max s | met |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families:
        times, optimal = [], 0
        for seed in range(args.seeds):
            for fraction in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
                solution = solve(FAMILIES[family](seed, fraction), backend="chain_dp")
                times.append(solution.solve_time_s)
                optimal += solution.status == "optimal" and solution.gap == 0.0
        med, mx = statistics.median(times), max(times)
        target_med, target_max = TARGETS[family]
        met = med <= target_med and mx <= target_max and optimal == len(times)
        print(f"| {family} | {len(times)} | {optimal}/{len(times)} | {med:.3f} | {mx:.3f} | {target_med} / {target_max} "
              f"| {'yes' if met else 'NO'} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.45, 0.6, 0.75, 0.9])
    parser.add_argument("--no-milp", dest="milp", action="store_false")
    parser.add_argument("--milp-time-limit", type=float, default=30.0)
    parser.add_argument("--deit-milp-time-limit", type=float, default=60.0)
    parser.add_argument("--deit-milp-budgets", nargs="+", type=float, default=[0.3, 0.6, 0.9])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    start = time.time()
    table_per_problem(args)
    table_per_family(args)
    print(f"\nbenchmark wall time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
