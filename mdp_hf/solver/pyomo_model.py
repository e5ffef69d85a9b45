"""The problem as a Pyomo model: an exact linearised MILP (HiGHS) and the paper's MINLP (MindtPy).

Linearisation (DESIGN.md §2): x[d, c] one-hot per dimension, y[b] keep bit per removable block.
u[b, d, c] = x[d, c] * y[b] exactly, via sum_c u[b, d, c] = y[b] and u <= x. Each latency table over
two or more dimensions gets a one-hot over its cells, z[cell] >= 0, whose marginals along every axis
equal u (or x outside removable blocks) and whose total equals y[b]: with one-hot marginals the only
feasible z is the single selected cell, so the MILP is the problem exactly, not a relaxation.

The paper-faithful model keeps the products instead (latency = sum y * T[c1, c2] * x * x') and is solved
with MindtPy (outer approximation, feasibility-pump start) when an MIP and an NLP solver are installed.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from .problem import NoSolutionWithinTimeLimit, Problem, Solution, make_solution


class BackendUnavailable(RuntimeError):
    """A backend's external solver is not installed; the message says what to install."""


def _pyo():
    import pyomo.environ as pyo  # imported lazily: Pyomo import costs ~0.3 s

    return pyo


def _choice_variables(pyo, model, problem: Problem):
    """One-hot x[d, c] over each dimension's allowed choices and a keep bit y[b] per free block (shared by
    the MILP and the paper's MINLP). Returns (block states, allowed choices)."""
    state = {b.name: problem.block_state(b.name) for b in problem.blocks}
    allowed = {d.name: problem.allowed_choices(d.name) for d in problem.dimensions}
    model.x = pyo.Var([(d, c) for d in allowed for c in allowed[d]], domain=pyo.Binary)
    model.one_hot = pyo.Constraint(list(allowed), rule=lambda m, d: sum(m.x[d, c] for c in allowed[d]) == 1)
    free = [b for b in state if state[b] == "free"]
    model.y = pyo.Var(free, domain=pyo.Binary)
    return state, allowed


def build_milp(problem: Problem, objective: str = "importance", deadline: float | None = None):
    """Pyomo model of ``problem``. objective='importance' (max, budget constrained) or 'latency' (min, no budget).
    ``deadline`` (a time.perf_counter() value): raise NoSolutionWithinTimeLimit when building takes longer."""
    pyo = _pyo()
    model = pyo.ConcreteModel(name="mdp_pruning")
    state, allowed = _choice_variables(pyo, model, problem)

    def active(block):
        return block is None or state[block] != "removed"

    def keep(block):
        return model.y[block] if block is not None and state[block] == "free" else 1

    # u[b, d, c] = x[d, c] * y[b] for every (free block, dim) pair its terms use.
    pairs = set()
    for term in problem.objective_terms:
        if term.block is not None and state[term.block] == "free":
            pairs.add((term.block, term.dim))
    for term in problem.latency_terms:
        if term.block is not None and state[term.block] == "free":
            pairs.update((term.block, d) for d in term.dims)
    pairs = sorted(pairs)
    model.u = pyo.Var([(b, d, c) for b, d in pairs for c in allowed[d]], bounds=(0, 1))
    model.u_sum = pyo.Constraint(pairs, rule=lambda m, b, d: sum(m.u[b, d, c] for c in allowed[d]) == m.y[b])
    model.u_le_x = pyo.Constraint(
        [(b, d, c) for b, d in pairs for c in allowed[d]], rule=lambda m, b, d, c: m.u[b, d, c] <= m.x[d, c]
    )

    def marginal(block, d, c):
        return model.u[block, d, c] if block is not None and state[block] == "free" else model.x[d, c]

    importance = sum(
        float(term.values[c]) * marginal(term.block, term.dim, c)
        for term in problem.objective_terms
        if active(term.block)
        for c in allowed[term.dim]
    )
    latency_parts = []
    model.z = pyo.VarList(bounds=(0, 1))
    model.cells = pyo.ConstraintList()
    for i, term in enumerate(problem.latency_terms):
        if deadline is not None and time.perf_counter() > deadline:
            raise NoSolutionWithinTimeLimit(
                f"the time limit passed while building the MILP model ({i} of "
                f"{len(problem.latency_terms)} latency tables done); no solution yet"
            )
        if not active(term.block):
            continue
        table = np.asarray(term.table, dtype=np.float64)
        if not term.dims:
            latency_parts.append(float(table) * keep(term.block))
        elif len(term.dims) == 1:
            d = term.dims[0]
            latency_parts.append(sum(float(table[c]) * marginal(term.block, d, c) for c in allowed[d]))
        else:
            cells = list(itertools.product(*[allowed[d] for d in term.dims]))
            z = {cell: model.z.add() for cell in cells}
            model.cells.add(sum(z.values()) == keep(term.block))
            for axis, d in enumerate(term.dims):
                for c in allowed[d]:
                    model.cells.add(sum(z[cell] for cell in cells if cell[axis] == c) == marginal(term.block, d, c))
            latency_parts.append(sum(float(table[cell]) * z[cell] for cell in cells))
    latency = sum(latency_parts)
    model.latency_expr = pyo.Expression(expr=latency)
    model.importance_expr = pyo.Expression(expr=importance)
    if objective == "latency":
        model.obj = pyo.Objective(expr=model.latency_expr, sense=pyo.minimize)
    else:
        model.obj = pyo.Objective(expr=model.importance_expr, sense=pyo.maximize)
        model.budget = pyo.Constraint(expr=model.latency_expr <= float(problem.budget_ms))
    return model


def _read_assignment(problem: Problem, model) -> tuple[dict[str, int], dict[str, bool]]:
    choices = {}
    for d in problem.dimensions:
        options = problem.allowed_choices(d.name)
        values = [model.x[d.name, c].value or 0.0 for c in options]
        choices[d.name] = int(options[int(np.argmax(values))])
    blocks = {}
    for b in problem.blocks:
        s = problem.block_state(b.name)
        blocks[b.name] = (model.y[b.name].value or 0.0) > 0.5 if s == "free" else s == "kept"
    return choices, blocks


def _highs_solver():
    try:
        from pyomo.contrib.solver.common.factory import SolverFactory

        solver = SolverFactory("highs")
        if solver.available():
            return solver
    except Exception:  # pragma: no cover - older Pyomo
        pass
    raise BackendUnavailable("Pyomo's HiGHS interface is not available: pip install highspy")


HIGHS_OPTIONS = {
    "mip_rel_gap": 1e-9,
    "mip_abs_gap": 1e-12,
    "primal_feasibility_tolerance": 1e-9,
    "mip_feasibility_tolerance": 1e-9,
}


def solve_highs(model, time_limit_s: float | None, threads: int | None = None):
    """Solve a Pyomo model with HiGHS; returns the Pyomo results (solution loaded when one exists)."""
    solver = _highs_solver()
    results = solver.solve(
        model,
        time_limit=time_limit_s,
        load_solutions=False,
        threads=threads,
        raise_exception_on_nonoptimal_result=False,
        solver_options=dict(HIGHS_OPTIONS),
    )
    if results.incumbent_objective is not None:
        results.solution_loader.load_vars()
    return results


def min_latency_assignment(problem: Problem, time_limit_s: float | None = None):
    """Exact smallest reachable latency by MILP (used to explain an infeasible budget)."""
    model = build_milp(problem, objective="latency")
    solve_highs(model, time_limit_s)
    return _read_assignment(problem, model)


def solve_milp(problem: Problem, time_limit_s: float | None = None, threads: int | None = None, **_ignored) -> Solution:
    """Exact linearised MILP under HiGHS, with HiGHS's proven bound and gap."""
    from pyomo.contrib.solver.common.results import TerminationCondition

    from .chain_dp import infeasible_budget_error

    start = time.perf_counter()
    model = build_milp(problem, deadline=None if time_limit_s is None else start + float(time_limit_s))
    build_s = time.perf_counter() - start
    remaining = None if time_limit_s is None else max(time_limit_s - build_s, 0.1)
    results = solve_highs(model, remaining, threads)
    tc = results.termination_condition
    if tc in (TerminationCondition.provenInfeasible, TerminationCondition.infeasibleOrUnbounded):
        raise infeasible_budget_error(problem, *min_latency_assignment(problem))
    if results.incumbent_objective is None:
        raise NoSolutionWithinTimeLimit(
            f"HiGHS found no feasible solution ({tc.name}) within {time_limit_s} s "
            f"(model built in {build_s:.1f} s); raise the time limit, or use "
            f"backend='greedy' for a heuristic answer without a useful bound"
        )
    choices, blocks = _read_assignment(problem, model)
    bound = results.objective_bound if results.objective_bound is not None else float("inf")
    status = (
        "optimal"
        if tc == TerminationCondition.convergenceCriteriaSatisfied
        else ("time_limit" if tc == TerminationCondition.maxTimeLimit else "feasible")
    )
    info = {
        "termination": tc.name,
        "build_s": build_s,
        "n_vars": model.nvariables(),
        "n_constraints": model.nconstraints(),
    }
    solution = make_solution(
        problem,
        choices,
        blocks,
        bound=float(bound),
        status=status,
        backend="milp",
        solve_time_s=time.perf_counter() - start,
        info=info,
    )
    if not problem.within_budget(solution.latency_ms):
        # HiGHS accepts violations up to its feasibility tolerance: tighten the budget by the violation.
        tightened = Problem(
            **{**problem.__dict__, "budget_ms": problem.budget_ms - 2 * (solution.latency_ms - problem.budget_ms)}
        )
        retry = solve_milp(tightened, time_limit_s, threads)
        return make_solution(
            problem,
            retry.choices,
            retry.blocks,
            bound=solution.bound,
            status=retry.status,
            backend="milp",
            solve_time_s=time.perf_counter() - start,
            info={**retry.info, "retried": True},
        )
    return solution


# ---------------------------------------------------------------------------------------------- MindtPy
def mindtpy_solvers() -> tuple[str, str]:
    """(mip_solver, nlp_solver) MindtPy can use here, or raise BackendUnavailable saying what is missing."""
    pyo = _pyo()
    mip = next(
        (s for s in ("glpk", "appsi_highs", "cbc") if pyo.SolverFactory(s).available(exception_flag=False)), None
    )
    nlp = next((s for s in ("ipopt", "appsi_ipopt") if pyo.SolverFactory(s).available(exception_flag=False)), None)
    if mip is None or nlp is None:
        missing = [
            name
            for name, found in (("an MIP solver (glpk/highspy)", mip), ("an NLP solver (ipopt)", nlp))
            if found is None
        ]
        raise BackendUnavailable(
            f"MindtPy needs {' and '.join(missing)}; none is installed. Install the `ipopt` "
            f"executable (e.g. conda install -c conda-forge ipopt) and glpk (apt install "
            f"glpk-utils), or use backend='chain_dp' / 'milp', which are exact."
        )
    return mip, nlp


def build_minlp(problem: Problem):
    """The paper's nonconvex formulation: latency = sum_b y_b * sum_cells T[cell] * prod x (products kept)."""
    pyo = _pyo()
    model = pyo.ConcreteModel(name="mdp_pruning_minlp")
    state, allowed = _choice_variables(pyo, model, problem)

    def keep(block):
        return model.y[block] if block is not None and state[block] == "free" else 1

    def active(block):
        return block is None or state[block] != "removed"

    importance = sum(
        keep(t.block) * sum(float(t.values[c]) * model.x[t.dim, c] for c in allowed[t.dim])
        for t in problem.objective_terms
        if active(t.block)
    )
    latency = 0
    for term in problem.latency_terms:
        if not active(term.block):
            continue
        table = np.asarray(term.table, dtype=np.float64)
        cell_sum = 0
        for cell in itertools.product(*[allowed[d] for d in term.dims]):
            product = float(table[cell])
            for d, c in zip(term.dims, cell):
                product = product * model.x[d, c]
            cell_sum = cell_sum + product
        latency = latency + keep(term.block) * cell_sum
    model.obj = pyo.Objective(expr=importance, sense=pyo.maximize)
    model.budget = pyo.Constraint(expr=latency <= float(problem.budget_ms))
    return model


def solve_mindtpy(
    problem: Problem, time_limit_s: float | None = None, strategy: str = "OA", init_strategy: str = "FP", **_ignored
) -> Solution:
    """Paper-faithful MindtPy (OA + feasibility pump). Its bound is not trustworthy on this nonconvex
    model (the NLP subsolver is local), so the status is 'feasible' unless MindtPy claims optimality."""
    pyo = _pyo()
    mip, nlp = mindtpy_solvers()
    start = time.perf_counter()
    model = build_minlp(problem)
    results = pyo.SolverFactory("mindtpy").solve(
        model,
        strategy=strategy,
        init_strategy=init_strategy,
        mip_solver=mip,
        nlp_solver=nlp,
        time_limit=time_limit_s or 1800,
    )
    choices, blocks = _read_assignment(problem, model)
    tc = str(results.solver.termination_condition)
    bound = results.problem.upper_bound
    solution = make_solution(
        problem,
        choices,
        blocks,
        bound=float(bound) if bound is not None else float("inf"),
        status="feasible",
        backend="mindtpy",
        solve_time_s=time.perf_counter() - start,
        info={
            "termination": tc,
            "mip_solver": mip,
            "nlp_solver": nlp,
            "note": "MindtPy's bound is only valid for convex models",
        },
    )
    if not problem.within_budget(solution.latency_ms):
        solution.status = "infeasible"
    return solution
