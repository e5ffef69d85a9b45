"""``solve(problem, backend=...)``: dispatch to a backend after the checks every backend shares."""

from __future__ import annotations

import time

from .problem import NoSolutionWithinTimeLimit, Problem, Solution, make_solution
from .structure import NotApplicable

BACKENDS = ("auto", "chain_dp", "milp", "mindtpy", "greedy", "brute_force")


def _backend(name: str):
    if name == "chain_dp":
        from .chain_dp import solve_chain_dp as fn
    elif name == "milp":
        from .pyomo_model import solve_milp as fn
    elif name == "mindtpy":
        from .pyomo_model import solve_mindtpy as fn
    elif name == "greedy":
        from .greedy import solve_greedy as fn
    elif name == "brute_force":
        from .brute_force import solve_brute_force as fn
    else:
        raise ValueError(f"unknown solver backend {name!r}; choose one of {BACKENDS}")
    return fn


def solve(problem: Problem, backend: str = "auto", time_limit_s: float | None = None, **options) -> Solution:
    """Maximise kept importance subject to latency <= problem.budget_ms.

    backend: 'auto' (chain_dp when the structure allows, else the MILP), 'chain_dp' (exact, structure-aware),
    'milp' (exact linearised MILP, Pyomo + HiGHS), 'mindtpy' (paper's MINLP; needs glpk/ipopt), 'greedy'
    (heuristic), 'brute_force' (tiny problems). Raises InfeasibleBudgetError when no sub-network fits.
    A budget at or above the dense latency returns the dense network (when importances are monotone).
    """
    start = time.perf_counter()
    problem.validate()
    if backend not in BACKENDS:
        raise ValueError(f"unknown solver backend {backend!r}; choose one of {BACKENDS}")
    choices, blocks = problem.dense_choices()
    objective, latency = problem.evaluate(choices, blocks)
    if problem.within_budget(latency) and problem.is_dense_optimal_when_feasible():
        return make_solution(
            problem,
            choices,
            blocks,
            bound=objective,
            status="optimal",
            backend="dense",
            solve_time_s=time.perf_counter() - start,
            info={"reason": f"budget {problem.budget_ms:.6g} ms >= dense latency {latency:.6g} ms"},
        )
    if backend == "auto":
        try:
            from .chain_dp import ChainSolver

            solver = ChainSolver(problem, time_limit_s)
        except NotApplicable as reason:
            return _milp_fallback(problem, time_limit_s, str(reason), start, **options)
        return solver.solve()
    try:
        return _backend(backend)(problem, time_limit_s=time_limit_s, **options)
    except RuntimeError:
        if backend == "greedy":
            _raise_if_infeasible(problem)  # say why the heuristic failed when the budget is unreachable
        raise


def _milp_fallback(problem: Problem, time_limit_s, reason: str, start: float, **options) -> Solution:
    """The MILP when chain_dp cannot decompose the problem. When the MILP has no solution within the time
    limit, the greedy answer is returned with status 'time_limit' and an honest bound (the dense objective
    when importances are monotone, else infinity); NoSolutionWithinTimeLimit only if greedy fails too."""
    try:
        solution = _backend("milp")(problem, time_limit_s=time_limit_s, **options)
    except NoSolutionWithinTimeLimit as milp_error:
        try:
            greedy = _backend("greedy")(problem)
        except RuntimeError:
            raise NoSolutionWithinTimeLimit(
                f"no solution within the time limit: {milp_error}; greedy found none either"
            ) from None
        bound = (
            problem.evaluate(*problem.dense_choices())[0] if problem.is_dense_optimal_when_feasible() else float("inf")
        )
        solution = make_solution(
            problem,
            greedy.choices,
            greedy.blocks,
            bound=bound,
            status="time_limit",
            backend="greedy",
            solve_time_s=time.perf_counter() - start,
            info={"milp": str(milp_error), "bound": "dense objective" if bound != float("inf") else "none"},
        )
    solution.info["auto_fallback"] = reason
    return solution


def _raise_if_infeasible(problem: Problem) -> None:
    """Raise InfeasibleBudgetError when the budget is below the exact smallest reachable latency."""
    try:
        from .chain_dp import ChainSolver

        ChainSolver(problem).solve()
    except NotApplicable:
        from .chain_dp import infeasible_budget_error
        from .pyomo_model import min_latency_assignment

        choices, blocks = min_latency_assignment(problem)
        if not problem.within_budget(problem.evaluate(choices, blocks)[1]):
            raise infeasible_budget_error(problem, choices, blocks) from None
