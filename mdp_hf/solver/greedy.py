"""Greedy heuristic: shrink the cheapest-importance-per-ms unit until the budget holds, then refill.

No optimality guarantee; it is the fallback when no exact backend applies in time and a baseline for the
benchmark. Moves jump to any smaller choice (latency tables have plateaus, where a one-step move saves
nothing) or remove a whole block.
"""

from __future__ import annotations

import time

import numpy as np

from .problem import Problem, Solution, make_solution


class _Incremental:
    """Assignment with per-dimension deltas computed from only the terms that touch the dimension."""

    def __init__(self, problem: Problem, choices, blocks):
        self.p = problem
        self.choices = dict(choices)
        self.blocks = dict(blocks)
        self.obj_terms_of = {d.name: [] for d in problem.dimensions}
        self.lat_terms_of = {d.name: [] for d in problem.dimensions}
        for t in problem.objective_terms:
            self.obj_terms_of[t.dim].append(t)
        for t in problem.latency_terms:
            for axis, d in enumerate(t.dims):
                self.lat_terms_of[d].append((t, axis))

    def kept(self, block):
        return block is None or self.blocks.get(block, True)

    def dim_deltas(self, d: str):
        """(delta objective, delta latency) arrays over every choice of d, relative to the current one."""
        c = self.choices[d]
        k = self.p.num_choices(d)
        dv = np.zeros(k)
        dt = np.zeros(k)
        for t in self.obj_terms_of[d]:
            if self.kept(t.block):
                dv += np.asarray(t.values) - t.values[c]
        for t, axis in self.lat_terms_of[d]:
            if self.kept(t.block):
                index = [self.choices[x] for x in t.dims]
                index[axis] = slice(None)
                row = t.table[tuple(index)]
                dt += row - row[c]
        return dv, dt

    def block_delta(self, b: str):
        sign = -1.0 if self.blocks[b] else 1.0
        dv = sum(t.values[self.choices[t.dim]] for t in self.p.objective_terms if t.block == b)
        dt = sum(t.table[tuple(self.choices[x] for x in t.dims)] for t in self.p.latency_terms if t.block == b)
        return sign * float(dv), sign * float(dt)


def solve_greedy(problem: Problem, time_limit_s: float | None = None, **_ignored) -> Solution:
    start = time.perf_counter()
    choices, blocks = problem.dense_choices()
    state = _Incremental(problem, choices, blocks)
    free_dims = [d.name for d in problem.dimensions if d.name not in problem.fixed_choices]
    free_blocks = [b.name for b in problem.blocks if problem.block_state(b.name) == "free"]
    _, latency = problem.evaluate(state.choices, state.blocks)
    budget = problem.budget_ms
    # Phase 1: remove latency at the smallest importance loss per ms saved.
    while latency > budget:
        best = None
        for d in free_dims:
            dv, dt = state.dim_deltas(d)
            lower = np.arange(state.choices[d])
            if lower.size == 0:
                continue
            saves = dt[lower] < 0
            if not saves.any():
                continue
            ratio = np.where(saves, -dv[lower] / np.maximum(-dt[lower], 1e-15), np.inf)
            i = int(np.argmin(ratio))
            if best is None or ratio[i] < best[0]:
                best = (ratio[i], "dim", d, int(lower[i]), dt[lower[i]])
        for b in free_blocks:
            if state.blocks[b]:
                dv, dt = state.block_delta(b)
                if dt < 0:
                    ratio = -dv / -dt
                    if best is None or ratio < best[0]:
                        best = (ratio, "block", b, False, dt)
        if best is None:
            raise RuntimeError("greedy could not reach the budget; use an exact backend (chain_dp or milp)")
        _, kind, name, value, dt = best
        (state.choices if kind == "dim" else state.blocks)[name] = value
        latency += dt
    # Phase 2: spend the slack on the best importance gain per ms.
    for _ in range(10000):
        slack = budget - latency
        best = None
        for d in free_dims:
            dv, dt = state.dim_deltas(d)
            ok = (dv > 0) & (dt <= slack)
            if ok.any():
                ratio = np.where(ok, dv / np.maximum(dt, 1e-15), -np.inf)
                i = int(np.argmax(ratio))
                if best is None or ratio[i] > best[0]:
                    best = (ratio[i], "dim", d, i, dt[i])
        for b in free_blocks:
            if not state.blocks[b]:
                dv, dt = state.block_delta(b)
                if dv > 0 and dt <= slack:
                    ratio = dv / max(dt, 1e-15)
                    if best is None or ratio > best[0]:
                        best = (ratio, "block", b, True, dt)
        if best is None:
            break
        _, kind, name, value, dt = best
        (state.choices if kind == "dim" else state.blocks)[name] = value
        latency += dt
    dense_obj = problem.evaluate(*problem.dense_choices())[0]
    bound = dense_obj if problem.is_dense_optimal_when_feasible() else float("inf")
    solution = make_solution(
        problem,
        state.choices,
        state.blocks,
        bound=bound,
        status="feasible",
        backend="greedy",
        solve_time_s=time.perf_counter() - start,
        info={"bound_is": "dense objective"},
    )
    if not problem.within_budget(solution.latency_ms):  # accumulated float drift; should not happen
        raise RuntimeError(f"greedy ended at {solution.latency_ms} ms above budget {budget}; please report")
    return solution
