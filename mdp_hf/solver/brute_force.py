"""Enumerate every assignment (vectorised): the reference the exact backends are tested against."""

from __future__ import annotations

import itertools
import time

import numpy as np

from .chain_dp import infeasible_budget_error
from .problem import FEASIBILITY_RTOL, Problem, Solution, make_solution


def solve_brute_force(problem: Problem, max_assignments: int = 4_000_000, **_ignored) -> Solution:
    start = time.perf_counter()
    dims = [d.name for d in problem.dimensions]
    domains = [np.asarray(problem.allowed_choices(d)) for d in dims]
    free = [b.name for b in problem.blocks if problem.block_state(b.name) == "free"]
    n_choice = int(np.prod([len(x) for x in domains], dtype=np.float64))
    n_bits = 2 ** len(free)
    if n_choice * n_bits > max_assignments:
        raise ValueError(f"brute force would enumerate {n_choice * n_bits} assignments (> {max_assignments})")
    grid = np.indices([len(x) for x in domains]).reshape(len(dims), -1)
    choice = {d: dom[grid[i]] for i, (d, dom) in enumerate(zip(dims, domains))}  # (n_choice,) per dim
    bits = np.array(list(itertools.product((1.0, 0.0), repeat=len(free)))).reshape(n_bits, len(free))
    state = {b.name: problem.block_state(b.name) for b in problem.blocks}

    def keep_column(block):
        if block is None or state[block] == "kept":
            return np.ones(n_bits)
        if state[block] == "removed":
            return np.zeros(n_bits)
        return bits[:, free.index(block)]

    objective = np.zeros((n_choice, n_bits))
    latency = np.zeros((n_choice, n_bits))
    for t in problem.objective_terms:
        objective += np.outer(np.asarray(t.values)[choice[t.dim]], keep_column(t.block))
    for t in problem.latency_terms:
        values = t.table[tuple(choice[d] for d in t.dims)] if t.dims else np.full(n_choice, float(t.table))
        latency += np.outer(values, keep_column(t.block))
    feasible = latency <= problem.budget_ms + FEASIBILITY_RTOL * max(1.0, abs(problem.budget_ms))

    def assignment(flat):
        i, j = np.unravel_index(flat, objective.shape)
        choices = {d: int(choice[d][i]) for d in dims}
        blocks = {b: state[b] != "removed" for b in state}
        blocks.update({b: bool(bits[j, k]) for k, b in enumerate(free)})
        return choices, blocks

    if not feasible.any():
        raise infeasible_budget_error(problem, *assignment(int(np.argmin(latency))))
    masked = np.where(feasible, objective, -np.inf)
    choices, blocks = assignment(int(np.argmax(masked)))
    best = float(masked.max())
    return make_solution(
        problem,
        choices,
        blocks,
        bound=best,
        status="optimal",
        backend="brute_force",
        solve_time_s=time.perf_counter() - start,
        info={"assignments": n_choice * n_bits},
    )
