"""`mdp-hf solve problem.json`: solve a saved problem and print its certificate (no torch import).

Bad input never ends in a traceback: one line on stderr names the file and the problem, and the exit code
says what happened (docs/problem_format.md#exit-codes): 0 solved (also ``time_limit`` with its gap), 2 invalid
input (unreadable or invalid problem, bad option, ``--output`` into a missing folder), 3 infeasible budget,
4 backend not installed, 5 no solution within ``--time-limit``, 6 the chosen backend cannot handle the problem.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from .api import BACKENDS, solve
from .problem import InfeasibleBudgetError, NoSolutionWithinTimeLimit, Problem, ProblemError
from .pyomo_model import BackendUnavailable
from .structure import NotApplicable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("problem", help="problem JSON file (docs/problem_format.md); always read as a file")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="solver backend (default: auto)")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="wall-clock limit in seconds for reading and solving; returns the best solution found with its gap",
    )
    parser.add_argument("--budget-ms", type=float, default=None, help="override the problem's latency budget")
    parser.add_argument(
        "--output", default=None, help="write the solution (choices, widths, blocks, certificate) as JSON"
    )
    parser.add_argument("--show-choices", action="store_true", help="also print the width of every dimension")


EXIT_INVALID_INPUT = 2
EXIT_INFEASIBLE = 3
EXIT_BACKEND_UNAVAILABLE = 4
EXIT_NO_SOLUTION = 5
EXIT_NOT_APPLICABLE = 6


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _output_problem(output: str | None) -> str | None:
    """Why ``--output`` cannot be written (checked before solving), or None."""
    if not output:
        return None
    if os.path.isdir(output):
        return f"--output {output} is a directory; give a file name such as {os.path.join(output, 'solution.json')}"
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        return f"--output {output}: the folder {folder} does not exist; create it first"
    if not os.access(folder, os.W_OK):
        return f"--output {output}: the folder {folder} is not writable"
    return None


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()  # --time-limit covers reading the problem too
    if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
        return _error(f"--time-limit must be a positive number of seconds, got {args.time_limit}", EXIT_INVALID_INPUT)
    if args.budget_ms is not None and not math.isfinite(args.budget_ms):
        return _error(f"--budget-ms must be a finite number of ms, got {args.budget_ms}", EXIT_INVALID_INPUT)
    output_problem = _output_problem(args.output)
    if output_problem:
        return _error(output_problem, EXIT_INVALID_INPUT)
    try:
        problem = Problem.from_file(args.problem)
    except FileNotFoundError:
        return _error(f"problem file {args.problem} does not exist", EXIT_INVALID_INPUT)
    except IsADirectoryError:
        return _error(f"problem file {args.problem} is a directory; give the problem's JSON file", EXIT_INVALID_INPUT)
    except (OSError, UnicodeDecodeError) as e:
        return _error(f"cannot read problem file {args.problem}: {e}", EXIT_INVALID_INPUT)
    except ProblemError as e:
        return _error(f"invalid problem: {e}", EXIT_INVALID_INPUT)
    if args.budget_ms is not None:
        problem.budget_ms = args.budget_ms
    time_limit = None
    if args.time_limit is not None:
        time_limit = max(0.0, args.time_limit - (time.perf_counter() - start))
    try:
        solution = solve(problem, backend=args.backend, time_limit_s=time_limit)
    except InfeasibleBudgetError as e:
        print(f"error: infeasible budget: {e}", file=sys.stderr)
        print(f"min_latency_ms: {e.min_latency_ms:.6f}")
        return EXIT_INFEASIBLE
    except BackendUnavailable as e:
        return _error(str(e), EXIT_BACKEND_UNAVAILABLE)
    except NoSolutionWithinTimeLimit as e:
        return _error(
            f"no solution within the time limit of {args.time_limit} s (reading {args.problem} included): {e}",
            EXIT_NO_SOLUTION,
        )
    except NotApplicable as e:
        return _error(
            f"backend {args.backend!r} cannot solve this problem ({e}); --backend auto falls back to the MILP",
            EXIT_NOT_APPLICABLE,
        )
    except RuntimeError as e:
        if args.backend != "greedy":
            raise  # a bug, not bad input: keep the traceback for the report
        return _error(f"backend 'greedy' found no solution ({e}); --backend auto is exact", EXIT_NOT_APPLICABLE)
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
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(solution.to_dict(), f, indent=1, default=float)
        except OSError as e:
            return _error(f"cannot write --output {args.output}: {e}", EXIT_INVALID_INPUT)
        print(f"solution written to {args.output}")
    return 0
