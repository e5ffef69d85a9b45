"""`mdp-hf solve problem.json`: solve a saved problem and print its certificate (no torch import)."""

from __future__ import annotations

import argparse
import json
import sys

from .api import BACKENDS, solve
from .problem import InfeasibleBudgetError, NoSolutionWithinTimeLimit, Problem, ProblemError
from .pyomo_model import BackendUnavailable
from .structure import NotApplicable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("problem", help="problem JSON file (docs/problem_format.md)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="solver backend (default: auto)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S", help="time limit in seconds")
    parser.add_argument("--budget-ms", type=float, default=None, help="override the problem's latency budget")
    parser.add_argument(
        "--output", default=None, help="write the solution (choices, widths, blocks, certificate) as JSON"
    )
    parser.add_argument("--show-choices", action="store_true", help="also print the width of every dimension")


def run(args: argparse.Namespace) -> int:
    try:
        problem = Problem.from_json(args.problem)
    except (OSError, ProblemError, json.JSONDecodeError) as e:
        print(f"error: cannot read problem {args.problem}: {e}", file=sys.stderr)
        return 2
    if args.budget_ms is not None:
        problem.budget_ms = args.budget_ms
    try:
        solution = solve(problem, backend=args.backend, time_limit_s=args.time_limit)
    except InfeasibleBudgetError as e:
        print(f"error: infeasible budget: {e}", file=sys.stderr)
        print(f"min_latency_ms: {e.min_latency_ms:.6f}")
        return 3
    except BackendUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except NoSolutionWithinTimeLimit as e:
        print(f"error: no solution within the time limit: {e}", file=sys.stderr)
        return 5
    except NotApplicable as e:
        print(
            f"error: backend {args.backend!r} cannot solve this problem ({e}); --backend auto falls back to the MILP",
            file=sys.stderr,
        )
        return 6
    kept = sum(solution.blocks.values())
    print(
        f"problem:     {args.problem} ({len(problem.dimensions)} dims, {len(problem.blocks)} blocks, "
        f"{len(problem.latency_terms)} latency terms)"
    )
    print(f"status:      {solution.status}")
    print(f"backend:     {solution.backend}")
    print(f"objective:   {solution.objective:.9g}")
    print(f"bound:       {solution.bound:.9g}")
    print(f"gap:         {solution.gap:.3g}")
    print(
        f"latency_ms:  {solution.latency_ms:.6f} (budget {problem.budget_ms:.6f}, dense {problem.dense_latency():.6f})"
    )
    print(f"time_s:      {solution.solve_time_s:.4f}")
    print(f"blocks kept: {kept}/{len(solution.blocks)}")
    if args.show_choices:
        for d in problem.dimensions:
            print(f"  {d.name}: {solution.widths[d.name]} / {d.widths[-1]}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(solution.to_dict(), f, indent=1, default=float)
        print(f"solution written to {args.output}")
    return 0
