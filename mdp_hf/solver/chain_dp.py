"""Exact structure-aware backend: Pareto dynamic programming along the hub chain with Lagrangian bounds.

Why it is exact: the DP state is a set of partial solutions (latency, importance) per hub choice; a new
factor (a block's options, or the always-on terms of a hub or hub pair) is added to every state and
dominated states (more latency, no more importance, same hub choice) are dropped — that alone is an
exact algorithm working on the float latencies directly, with no rounding. What makes it fast is
bounding: for every multiplier lam >= 0, ``lam * (budget - t) + max(rest of the problem in v - lam * t)``
bounds what a partial state can still gain (the max over the rest is a Viterbi pass along the chain),
so every state, and every hub pair, that cannot beat the incumbent by more than a 1e-9 relative
tolerance is discarded. The incumbent comes from the Lagrangian solutions themselves, improved by a
heuristic pass of the same DP (hubs restricted to the Lagrangian solutions' choices, a beam of the
best-bounded states). When the exact pass ends with no better state, the incumbent is proven optimal;
otherwise its best final state is. A time limit returns the incumbent with the remaining bound as gap.
"""

from __future__ import annotations

import time

import numpy as np

from .prefilter import DEAD
from .problem import (
    FEASIBILITY_RTOL,
    InfeasibleBudgetError,
    NoSolutionWithinTimeLimit,
    Problem,
    Solution,
    make_solution,
)
from .structure import Factor, Structure, decompose

OPTIMALITY_RTOL = 1e-9


class _Suffix:
    """Best (max of v - lam t, or min t) of everything not yet added, for every DP step and key."""

    def __init__(self, S: Structure, per_factor, reduce, zero):
        m = len(S.positions)
        n = [S.position_size(j) for j in range(m)]
        self.node: list[list[np.ndarray]] = [None] * m
        self.edge: list[list[np.ndarray]] = [None] * max(m - 1, 0)
        self.edge_in: list[np.ndarray] = [None] * max(m - 1, 0)  # shape (L, n_j * n_j+1): edge j onwards
        L = zero.shape[0]
        after = np.zeros((L, n[m - 1])) + zero
        for j in range(m - 1, -1, -1):
            if j < m - 1:
                nxt = self.node[j + 1][0]
                acc = np.broadcast_to(nxt[:, None, :], (L, n[j], n[j + 1])).reshape(L, n[j] * n[j + 1])
                sufs = [acc]
                for f in reversed(S.edge_factors[j]):
                    acc = acc + per_factor(f)
                    sufs.append(acc)
                self.edge[j] = sufs[::-1]
                self.edge_in[j] = acc
                after = reduce(acc.reshape(L, n[j], n[j + 1]), axis=2)
            acc = after
            sufs = [acc]
            for f in reversed(S.node_factors[j]):
                acc = acc + per_factor(f)
                sufs.append(acc)
            self.node[j] = sufs[::-1]


def _expand(t, v, key, f: Factor):
    """Add every option of factor ``f`` (row chosen by the state's key) to every state."""
    rows = f.key_to_row[key]
    starts = f.row_start[rows]
    counts = f.row_start[rows + 1] - starts
    parent = np.repeat(np.arange(len(t)), counts)
    first = np.cumsum(counts) - counts
    opt = np.repeat(starts - first, counts) + np.arange(int(counts.sum()))
    return t[parent] + f.t[opt], v[parent] + f.v[opt], key[parent], parent, opt


def _pareto_by_key(t, v, key) -> np.ndarray:
    """Indices of states not dominated by a state with the same key (less-or-equal t, greater-or-equal v)."""
    n = len(t)
    if n <= 1:
        return np.arange(n)
    order = np.lexsort((t, key))
    vs = v[order]
    by_v = np.argsort(vs)
    sorted_v = vs[by_v]
    dense = np.empty(n, dtype=np.int64)  # equal importances get equal ranks, so exact ties are dropped
    dense[by_v] = np.concatenate([[0], np.cumsum(sorted_v[1:] != sorted_v[:-1])])
    code = key[order].astype(np.int64) * (n + 1) + dense
    running = np.maximum.accumulate(code)
    keep = np.ones(n, dtype=bool)
    keep[1:] = code[1:] > running[:-1]
    return order[keep]


class ChainSolver:
    def __init__(
        self,
        problem: Problem,
        time_limit_s: float | None = None,
        structure: Structure | None = None,
        beam: int | None = 64,
    ):
        self.start = time.perf_counter()
        self.problem = problem
        self.budget = float(problem.budget_ms)
        self.beam = beam
        self.restrict_rows = 4
        self.deadline = None if time_limit_s is None else time.perf_counter() + float(time_limit_s)
        self.S = structure or decompose(problem)
        self.m = len(self.S.positions)
        self.n = [self.S.position_size(j) for j in range(self.m)]
        self.info: dict = {
            "positions": [list(p) for p in self.S.positions],
            "merged_hubs": self.S.merged_hubs,
            "rounding_error_ms": 0.0,
            "states_generated": 0,
            "max_states": 0,
        }
        self.prefiltered = None
        if any(getattr(f, "implicit", False) for fs in self.S.node_factors + self.S.edge_factors for f in fs):
            from .prefilter import PrefilterTimeout, prefilter

            try:
                self.prefiltered = prefilter(problem, self.S, self.deadline, self.info)
            except PrefilterTimeout as stop:
                self.prefiltered = ("time_limit", stop.incumbent, stop.bound)

    # ----------------------------------------------------------------- assignments
    def _assignment(self, keys: list[int], options: dict[int, int]):
        S = self.S
        choices = {d: int(S.domains[d][0]) for d in S.domains}
        for j in range(self.m):
            choices.update(S.position_choices(j, keys[j]))
        blocks = {b.name: self.problem.block_state(b.name) != "removed" for b in self.problem.blocks}
        for f in self._factors:
            if not f.local_dims and not f.removable:
                continue
            local, kept = f.decode(options[id(f)])
            choices.update(local)
            if f.removable:
                blocks[f.block] = kept
        return choices, blocks

    def _scope_key(self, f: Factor, keys: list[int]) -> int:
        kind, j = f.scope
        return keys[j] if kind == "node" else keys[j] * self.n[j + 1] + keys[j + 1]

    def _decode_lagrangian(self, suffix: _Suffix, row: int, lam: float | None):
        """Viterbi argmax (lam given) or argmin-latency (lam None) path and per-factor options."""
        pick = np.argmin if lam is None else np.argmax
        keys = [int(pick(suffix.node[0][0][row]))]
        for j in range(self.m - 1):
            block = suffix.edge_in[j][row].reshape(self.n[j], self.n[j + 1])[keys[j]]
            keys.append(int(pick(block)))
        options = {}
        for f in self._factors:
            r = f.key_to_row[self._scope_key(f, keys)]
            lo, hi = f.row_start[r], f.row_start[r + 1]
            if lam is None:
                options[id(f)] = int(lo)
            else:
                options[id(f)] = int(lo + np.argmax(f.v[lo:hi] - lam * f.t[lo:hi]))
        return keys, options

    def warm_passes(self, allowed):
        """(beam, hub restriction) of the heuristic DP passes run before the exact one."""
        return [(self.beam, allowed)] if self.beam else []

    # ----------------------------------------------------------------- main
    def solve(self) -> Solution:
        start = self.start
        S, B, m, n = self.S, self.budget, self.m, self.n
        self._factors = [f for fs in S.node_factors for f in fs] + [f for fs in S.edge_factors for f in fs]
        pre_incumbent = None
        if self.prefiltered is not None and self.prefiltered[0] == "time_limit":
            _, incumbent, bound = self.prefiltered
            if incumbent is None:
                raise NoSolutionWithinTimeLimit(
                    "chain_dp found no feasible solution within the time limit "
                    "(pre-filtering of the large blocks was not finished)"
                )
            return make_solution(
                self.problem,
                incumbent[1],
                incumbent[2],
                bound=bound,
                status="time_limit",
                backend="chain_dp",
                solve_time_s=time.perf_counter() - start,
                info=self.info,
            )
        if self.prefiltered is not None:
            pre_incumbent = self.prefiltered[0]

        # Smallest reachable latency (exact min-sum along the chain).
        min_suffix = _Suffix(S, lambda f: f.min_latency()[None, :], np.min, np.zeros((1, 1)))
        min_latency = float(S.const_t + min_suffix.node[0][0][0].min())
        if not self.problem.within_budget(min_latency):  # the same tolerance as every backend
            keys, options = self._decode_lagrangian(min_suffix, 0, None)
            raise infeasible_budget_error(self.problem, *self._assignment(keys, options))

        # Lagrangian dual on a coarse, then a fine grid of multipliers.
        dense_t = max(self.problem.dense_latency(), 1e-12)
        v_scale = max(
            float(sum(np.abs(f.v[np.abs(f.v) < DEAD]).max(initial=0.0) for f in self._factors)) + abs(S.const_v), 1e-300
        )
        lam0 = v_scale / dense_t
        coarse = np.concatenate([[0.0], lam0 * np.geomspace(1e-4, 1e4, 25)])
        lag = lambda lams: lambda f: f.lagrangian(lams)
        suf_c = _Suffix(S, lag(coarse), np.max, np.zeros((len(coarse), 1)))
        dual_c = coarse * (B - S.const_t) + S.const_v + suf_c.node[0][0].max(axis=1)
        i = int(np.argmin(dual_c))
        fine = np.linspace(coarse[max(i - 1, 0)], coarse[min(i + 1, len(coarse) - 1)], 17)[1:-1]
        suf_f = _Suffix(S, lag(fine), np.max, np.zeros((len(fine), 1)))
        lams = np.concatenate([coarse, fine])
        self.n_coarse = len(coarse)
        suffix = _merge_suffixes(suf_c, suf_f)
        dual = lams * (B - S.const_t) + S.const_v + suffix.node[0][0].max(axis=1)
        i_star = int(np.argmin(dual))
        dual_bound = float(dual[i_star])
        self.info["lagrangian_bound"] = dual_bound
        self.info["lambda"] = float(lams[i_star])

        # Incumbent: best feasible Lagrangian solution near lam*; the min-latency solution as last resort.
        candidates = [self._decode_lagrangian(min_suffix, 0, None)]
        for row in np.argsort(dual)[:3]:
            candidates.append(self._decode_lagrangian(suffix, int(row), float(lams[row])))
        best = pre_incumbent
        for keys, options in candidates:
            choices, blocks = self._assignment(keys, options)
            obj, lat = self.problem.evaluate(choices, blocks)
            if self.problem.within_budget(lat) and (best is None or obj > best[0]):
                best = (obj, choices, blocks)
        inc_v, inc_choices, inc_blocks = best
        self.info["warm_start_objective"] = inc_v
        tol = OPTIMALITY_RTOL * max(abs(dual_bound), abs(inc_v), 1e-300)

        # Warm start 2: the exact DP restricted to the hub choices of the Lagrangian solutions around lam*
        # (the optimum's hubs are almost always among them), then a narrow beam; the exact pass that
        # follows only has to prove optimality.
        allowed = [np.zeros(n[j], dtype=bool) for j in range(m)]
        for row in np.argsort(dual)[: self.restrict_rows]:
            keys, _ = self._decode_lagrangian(suffix, int(row), float(lams[row]))
            for j, k in enumerate(keys):
                allowed[j][k] = True
        for beam, restriction in self.warm_passes(allowed):
            result = self._dp(suffix, min_suffix, lams, i_star, inc_v + tol, beam=beam, allowed=restriction)
            if result.get("best") is not None and result["best"][0] > inc_v:
                inc_v, inc_choices, inc_blocks = result["best"]
                tol = OPTIMALITY_RTOL * max(abs(dual_bound), abs(inc_v), 1e-300)
        self.info["beam_objective"] = inc_v
        result = self._dp(suffix, min_suffix, lams, i_star, inc_v + tol)
        elapsed = time.perf_counter() - start
        if result["timed_out"]:
            bound = max(result["bound"], inc_v)
            if result["best"] is not None and result["best"][0] > inc_v:
                inc_v, inc_choices, inc_blocks = result["best"]
            return make_solution(
                self.problem,
                inc_choices,
                inc_blocks,
                bound=bound,
                status="time_limit",
                backend="chain_dp",
                solve_time_s=elapsed,
                info=self.info,
            )
        if result["best"] is not None and result["best"][0] > inc_v:
            inc_v, inc_choices, inc_blocks = result["best"]
        return make_solution(
            self.problem,
            inc_choices,
            inc_blocks,
            bound=inc_v,
            status="optimal",
            backend="chain_dp",
            solve_time_s=elapsed,
            info=self.info,
        )

    def _dp(
        self,
        suffix: _Suffix,
        min_suffix: _Suffix,
        lams,
        i_star,
        threshold,
        beam: int | None = None,
        allowed: list[np.ndarray] | None = None,
    ):
        """Exact when beam and allowed are None. A beam keeps only the best-bounded states; ``allowed`` restricts
        each hub to a few choices (exact within that restriction). Both serve as fast warm starts."""
        S, B, m, n = self.S, self.budget, self.m, self.n
        B_dp = B + FEASIBILITY_RTOL * max(1.0, abs(B))  # = Problem.within_budget
        lam_star = lams[i_star]
        trace = []
        live_bound = [-np.inf]

        fine_rows = np.arange(self.n_coarse, len(lams))
        coarse_rows = np.arange(self.n_coarse)

        def bounds_of(t, v, key, rem, rows):
            out = np.empty(t.size)
            for lo in range(0, t.size, 20000):
                sl = slice(lo, lo + 20000)
                out[sl] = v[sl] + np.min(lams[rows, None] * (B - t[sl])[None, :] + rem[rows][:, key[sl]], axis=0)
            return out

        def prune(t, v, key, rem, rem_min, pareto=False):
            """Indices of states that fit, are not dominated (when ``pareto``) and whose bound beats the
            threshold; cheap tests first."""
            ok = t + rem_min[0, key] <= B_dp
            ok &= v + lam_star * (B - t) + rem[i_star, key] > threshold
            idx = np.flatnonzero(ok)
            if pareto and idx.size > 1:
                idx = idx[_pareto_by_key(t[idx], v[idx], key[idx])]
            for rows in (fine_rows, coarse_rows):
                if idx.size:
                    b = bounds_of(t[idx], v[idx], key[idx], rem, rows)
                    keep = b > threshold
                    idx, b = idx[keep], b[keep]
            if beam is not None and idx.size > beam:
                idx = idx[np.argpartition(-b, beam)[:beam]]
            return idx

        def state_bound(t, v, key, rem):
            if t.size == 0:
                return -np.inf
            return float(np.max(v + np.min(lams[:, None] * (B - t)[None, :] + rem[:, key], axis=0)))

        def out_of_time(t, v, key, rem):
            if self.deadline is not None and time.perf_counter() > self.deadline:
                live_bound[0] = state_bound(t, v, key, rem)
                return True
            return False

        def record(kind, j, factor, parent, opt, key):
            trace.append((kind, j, factor, parent, opt, key))
            self.info["states_generated"] += int(key.size)
            self.info["max_states"] = max(self.info["max_states"], int(key.size))

        def add_factors(t, v, key, factors, rem, rem_min, kind, j):
            """Expand the states by every option of each factor in turn, pruning after each; None on time-out."""
            for k, f in enumerate(factors):
                if out_of_time(t, v, key, rem[k]):
                    return None
                t, v, key, parent, opt = _expand(t, v, key, f)
                idx = prune(t, v, key, rem[k + 1], rem_min[k + 1], bool(f.removable or f.local_dims))
                t, v, key = t[idx], v[idx], key[idx]
                record(kind, j, f, parent[idx], opt[idx], key)
            return t, v, key

        # Start: one empty state per choice of the first hub.
        key = np.arange(n[0]) if allowed is None else np.flatnonzero(allowed[0])
        t = np.full(key.size, S.const_t)
        v = np.full(key.size, S.const_v)
        idx = prune(t, v, key, suffix.node[0][0], min_suffix.node[0][0])
        t, v, key = t[idx], v[idx], key[idx]
        record("node", 0, None, idx, None, key)
        for j in range(m):
            states = add_factors(t, v, key, S.node_factors[j], suffix.node[j], min_suffix.node[j], "node", j)
            if states is None:
                return {"timed_out": True, "bound": live_bound[0], "best": None}
            t, v, key = states
            if j == m - 1 or t.size == 0:
                break
            # Node j -> edge (j, j+1): pair every state with the next hub's choices that can still pay off.
            collapse = not S.edge_factors[j]
            n_from = 1 if collapse else n[j]
            if collapse:
                idx = _pareto_by_key(t, v, np.zeros_like(key))
                t, v, key = t[idx], v[idx], np.zeros(idx.size, dtype=np.int64)
                record("collapse", j, None, idx, None, key)
                rem, rem_min = suffix.node[j + 1][0], min_suffix.node[j + 1][0]
            else:
                rem, rem_min = suffix.edge[j][0], min_suffix.edge[j][0]
            L = len(lams)
            fwd = np.full((L, n_from), -np.inf)
            np.maximum.at(fwd, (slice(None), key), v[None, :] - lams[:, None] * t[None, :])
            fwd_min = np.full(n_from, np.inf)
            np.minimum.at(fwd_min, key, t)
            pair_bound = np.min(lams[:, None, None] * B + fwd[:, :, None] + rem.reshape(L, n_from, n[j + 1]), axis=0)
            pair_ok = (pair_bound > threshold) & (fwd_min[:, None] + rem_min.reshape(n_from, n[j + 1]) <= B_dp)
            if allowed is not None:
                pair_ok &= allowed[j + 1][None, :]
            counts = pair_ok.sum(axis=1)[key]
            parent = np.repeat(np.arange(key.size), counts)
            nxt = np.concatenate([np.flatnonzero(pair_ok[c]) for c in range(n_from)]) if n_from else np.zeros(0, int)
            row_first = np.concatenate([[0], np.cumsum(pair_ok.sum(axis=1))])
            first = np.cumsum(counts) - counts
            within = np.arange(int(counts.sum())) - np.repeat(first, counts)
            c_next = nxt[np.repeat(row_first[key], counts) + within]
            t, v = t[parent], v[parent]
            key = key[parent] * n[j + 1] + c_next
            idx = prune(t, v, key, rem, rem_min)
            t, v, key = t[idx], v[idx], key[idx]
            record("edge", j, None, parent[idx], None, key)
            if not collapse:
                states = add_factors(t, v, key, S.edge_factors[j], suffix.edge[j], min_suffix.edge[j], "edge", j)
                if states is None:
                    return {"timed_out": True, "bound": live_bound[0], "best": None}
                t, v, key = states
            # Edge -> node j+1: forget the previous hub choice.
            key = key % n[j + 1]
            idx = np.arange(key.size) if collapse else _pareto_by_key(t, v, key)
            t, v, key = t[idx], v[idx], key[idx]
            record("node", j + 1, None, idx, None, key)
        if t.size == 0:
            return {"timed_out": False, "best": None}
        best_state = int(np.argmax(v))
        return {"timed_out": False, "best": self._reconstruct(trace, best_state)}

    def _reconstruct(self, trace, state: int):
        keys = [0] * self.m
        options = {}
        for kind, j, factor, parent, opt, key in reversed(trace):
            if kind == "node":
                keys[j] = int(key[state])
            if factor is not None:
                options[id(factor)] = int(opt[state])
            state = int(parent[state])
        choices, blocks = self._assignment(keys, options)
        obj, lat = self.problem.evaluate(choices, blocks)
        if not self.problem.within_budget(lat):  # cannot happen unless float sums disagree wildly
            raise RuntimeError(f"chain_dp produced latency {lat} above budget {self.budget}; please report")
        return obj, choices, blocks


def _merge_suffixes(a: _Suffix, b: _Suffix) -> _Suffix:
    """Stack two suffix tables along the multiplier axis."""
    out = object.__new__(_Suffix)
    out.node = [[np.concatenate([x, y]) for x, y in zip(xs, ys)] for xs, ys in zip(a.node, b.node)]
    out.edge = [[np.concatenate([x, y]) for x, y in zip(xs, ys)] for xs, ys in zip(a.edge, b.edge)]
    out.edge_in = [np.concatenate([x, y]) for x, y in zip(a.edge_in, b.edge_in)]
    return out


def infeasible_budget_error(problem: Problem, choices: dict, blocks: dict) -> InfeasibleBudgetError:
    """Explain the smallest reachable latency: what remains at the minimum and why it cannot go lower."""
    _, min_latency = problem.evaluate(choices, blocks)
    contributions = []
    for term in problem.latency_terms:
        if term.block is None or blocks.get(term.block, True):
            ms = float(term.table[tuple(int(choices[d]) for d in term.dims)])
            if ms > 0:
                where = (
                    "outside blocks"
                    if term.block is None
                    else (
                        f"block {term.block!r} ({'never removable' if not problem.blocks[problem.block_index[term.block]].removable else 'fixed kept' if problem.fixed_blocks.get(term.block) else 'kept: removing it does not lower latency'})"
                    )
                )
                contributions.append((f"{term.name} [{where}]", ms))
    contributions.sort(key=lambda x: -x[1])
    top = ", ".join(f"{name} {ms:.4g} ms" for name, ms in contributions[:8])
    fixed = [d for d in problem.fixed_choices]
    at_min = [d.name for d in problem.dimensions if d.name not in problem.fixed_choices and choices[d.name] == 0]
    short = min_latency - problem.budget_ms
    message = (
        f"budget {problem.budget_ms:.9g} ms is below the smallest reachable latency {min_latency:.9g} ms "
        f"(short by {short:.3g} ms). "
        f"At that minimum {len(at_min)} dimensions sit at their smallest allowed width (min-keep), "
        f"{sum(1 for b in problem.blocks if not blocks[b.name])} blocks are removed"
        + (
            f", {len(fixed)} choices are fixed ({', '.join(fixed[:5])}{'...' if len(fixed) > 5 else ''})"
            if fixed
            else ""
        )
        + f". Largest remaining latency terms: {top}. Raise the budget to at least {min_latency:.9g} ms, or "
        f"lower min-keep / unfix choices or blocks."
    )
    return InfeasibleBudgetError(message, min_latency, problem.budget_ms, contributions)


def solve_chain_dp(problem: Problem, time_limit_s: float | None = None, beam: int | None = 64, **_ignored) -> Solution:
    return ChainSolver(problem, time_limit_s, beam=beam).solve()
