"""Solver benchmark on synthetic problems with the paper's shapes; prints markdown tables for docs/solver.md.

    python benchmarks/solver.py                 # full run (~20 min on 2 cores: the MILP dominates)
    python benchmarks/solver.py --no-milp       # the default backend and greedy only (a few minutes)

Table 1: one problem per family and budget: the default backend (`auto`, median of 3 runs) vs the Pyomo/HiGHS
MILP (time limit), greedy, and MindtPy when installed. Table 2: `auto` over seeds x budgets per family, the
figures compared with the targets (proven optimal; CNN median <= 0.1 s, max <= 0.5 s; DeiT-B <= 1 s; the
huge shapes: seconds).

Families: today's four (ResNet-50/101, MobileNet-V1, DeiT-B); widths-only (every block fixed kept, the paper's
ablations); per-layer group sizes (each dimension its own group, so its own number of choices); monotone
iterative steps (widths truncated to the active units, some blocks already removed, some choices fixed); and
huge shapes (ResNet-101 with 64 residual / 128 bottleneck choices; DeiT-B with groups of 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdp_hf.solver import (  # noqa: E402
    BackendUnavailable,
    NoSolutionWithinTimeLimit,
    solve,
    synthetic,  # noqa: E402
)


def _rebudget(problem, fraction):
    problem.budget_ms = fraction * problem.dense_latency()
    return problem


FAMILIES = {
    "resnet50": lambda seed, f: synthetic.resnet(50, seed, f),
    "resnet101": lambda seed, f: synthetic.resnet(101, seed, f),
    "mobilenet_v1": lambda seed, f: synthetic.mobilenet_v1(seed, f),
    "deit_b": lambda seed, f: synthetic.deit(seed, f),
    "resnet50_widths_only": lambda seed, f: synthetic.widths_only(synthetic.resnet(50, seed, f)),
    "deit_b_widths_only": lambda seed, f: synthetic.widths_only(synthetic.deit(seed, f)),
    "resnet50_per_layer_groups": lambda seed, f: synthetic.resnet(50, seed, f, per_layer_groups=True),
    "deit_b_per_layer_groups": lambda seed, f: synthetic.deit(seed, f, per_layer_groups=True),
    "resnet50_monotone_step": lambda seed, f: _rebudget(
        synthetic.monotone_step(synthetic.resnet(50, seed, f), seed, shrink=0.5, removed=0.2, fixed=0.05), f
    ),
    "deit_b_monotone_step": lambda seed, f: _rebudget(
        synthetic.monotone_step(synthetic.deit(seed, f), seed, shrink=0.5, removed=0.2, fixed=0.05), f
    ),
    "resnet101_huge": lambda seed, f: synthetic.resnet(101, seed, f, hub_choices=64, mid_choices=128),
    "deit_b_groups_of_1": lambda seed, f: synthetic.deit(seed, f, groups=(1, 1, 1, 1, 1)),
}
CNN, DEIT, HUGE = (0.1, 0.5), (1.0, 1.0), (10.0, 10.0)
TARGETS = {
    name: HUGE if ("huge" in name or "groups_of_1" in name) else DEIT if name.startswith("deit") else CNN
    for name in FAMILIES
}
MILP_TOO_LARGE = {"resnet101_huge", "deit_b_groups_of_1"}  # building the Pyomo model alone exceeds minutes


def rel(a: float, b: float) -> str:
    return f"{(a - b) / abs(b):+.2e}" if b else "n/a"


def timed_default(problem, repeats=3):
    runs = [solve(problem, backend="auto") for _ in range(repeats)]
    return runs[0], statistics.median(r.solve_time_s for r in runs)


def table_per_problem(args):
    try:
        from mdp_hf.solver.pyomo_model import mindtpy_solvers

        mindtpy_solvers()
        have_mindtpy = True
    except BackendUnavailable as e:
        have_mindtpy = False
        print(f"MindtPy: not run ({e})\n")
    print(
        "| family | budget | auto s | backend | status | gap | objective | MILP s | MILP status | MILP gap | "
        "MILP obj - auto (rel) | greedy s | greedy obj - auto (rel) | MindtPy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for family in args.families:
        for fraction in args.budgets:
            problem = FAMILIES[family](0, fraction)
            huge = family in MILP_TOO_LARGE
            exact, t_exact = timed_default(problem, 1 if huge else 3)
            row = [
                family,
                f"{fraction:.2f}",
                f"{t_exact:.3f}",
                exact.backend,
                exact.status,
                f"{exact.gap:.1e}",
                f"{exact.objective:.3f}",
            ]
            milp_budgets = args.deit_milp_budgets if family.startswith("deit") else args.cnn_milp_budgets
            if huge:
                row += ["-", "not run (too large)", "-", "-"]
            elif args.milp and fraction in milp_budgets:
                limit = args.deit_milp_time_limit if family.startswith("deit") else args.milp_time_limit
                try:
                    milp = solve(problem, backend="milp", time_limit_s=limit)
                    row += [
                        f"{milp.solve_time_s:.1f}",
                        milp.status,
                        f"{milp.gap:.1e}",
                        rel(milp.objective, exact.objective),
                    ]
                except NoSolutionWithinTimeLimit:
                    row += [f"> {limit:.0f}", "no solution", "-", "-"]
            else:
                row += ["-", "not run", "-", "-"]
            if huge:
                row += ["-", "not run"]
            else:
                greedy = solve(problem, backend="greedy")
                row += [f"{greedy.solve_time_s:.2f}", rel(greedy.objective, exact.objective)]
            if have_mindtpy and not huge:
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
        huge = family in MILP_TOO_LARGE
        for seed in range(1 if huge else args.seeds):
            for fraction in (0.3, 0.5, 0.7, 0.9) if huge else (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
                solution = solve(FAMILIES[family](seed, fraction), backend="auto")
                times.append(solution.solve_time_s)
                optimal += solution.status == "optimal" and solution.gap == 0.0
        med, mx = statistics.median(times), max(times)
        target_med, target_max = TARGETS[family]
        met = med <= target_med and mx <= target_max and optimal == len(times)
        print(
            f"| {family} | {len(times)} | {optimal}/{len(times)} | {med:.3f} | {mx:.3f} | {target_med} / {target_max} "
            f"| {'yes' if met else 'NO'} |",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.6, 0.9])
    parser.add_argument("--cnn-milp-budgets", nargs="+", type=float, default=[0.3, 0.6, 0.9])
    parser.add_argument("--no-milp", dest="milp", action="store_false")
    parser.add_argument("--milp-time-limit", type=float, default=30.0)
    parser.add_argument("--deit-milp-time-limit", type=float, default=60.0)
    parser.add_argument("--deit-milp-budgets", nargs="+", type=float, default=[0.3, 0.9])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tables", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    args = parser.parse_args(argv)
    start = time.time()
    if 1 in args.tables:
        table_per_problem(args)
    if 2 in args.tables:
        table_per_family(args)
    print(f"\nbenchmark wall time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
