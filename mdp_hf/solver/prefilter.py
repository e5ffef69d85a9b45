"""Exact Lagrangian pre-filtering of large blocks, before their cell product is ever stored.

A block with many local choice combinations per hub choice (ResNet-101 with 64 residual and 128 bottleneck
choices: 4096 hub pairs x 16384 (C1, C2) cells for a stage's first block; DeiT-B with groups of 1: 768 E
choices x 49152 (H, QK, V) cells per attention block) is kept *implicit*: its Lagrangian ``max over local
choices of v - lam t`` and its smallest latency are computed per hub key by variable elimination over the local
dimensions (max-sum along C1 -> C2, H -> QK / V), never over the product.

With those, a search over the multiplier gives the dual bound D(lam*) and a feasible incumbent (decoded
Lagrangian solutions, or the min-latency one). Max-marginals along the hub chain give, for every key k of
an implicit block, the best Lagrangian value D_k of any solution using k. A solution better than the
incumbent has objective <= lam (B - t) + objective = its Lagrangian value, so it can only use keys with
D_k >= incumbent and, at key k, options whose ``v - lam t`` is within D_k - incumbent of the best one. Only
those options are enumerated (key by key) and Pareto-filtered; dead keys share a row that can never be
chosen. The exact DP then runs on the restricted problem, whose optimum (or the incumbent, when better)
is the optimum of the whole problem.
"""

from __future__ import annotations

import time

import numpy as np

DEAD = 1e30  # latency (and minus importance) of the shared row of keys no improving solution uses
_BATCH_CELLS = 1 << 22  # multipliers x intermediate cells per elimination batch (about 32 MB)


class PrefilterTimeout(Exception):
    """The time limit passed during pre-filtering."""


class ImplicitFactor:
    """A block (or kept component) whose options per key are only enumerated after Lagrangian filtering."""

    implicit = True

    def __init__(self, name, block, scope, scope_axes, local, lats, objs, v_const, removable, domains):
        self.name, self.block, self.scope, self.removable = name, block, scope, removable
        self.scope_axes, self.local_dims = list(scope_axes), list(local)
        self.local_domains = [domains[d] for d in local]
        self.size = {d: len(domains[d]) for d in self.scope_axes + self.local_dims}
        self.scope_shape = tuple(self.size[d] for d in self.scope_axes)
        self.local_shape = tuple(self.size[d] for d in self.local_dims)
        self.n_keys = int(np.prod(self.scope_shape, dtype=np.int64)) if self.scope_axes else 1
        self.n_local = int(np.prod(self.local_shape, dtype=np.int64)) if self.local_dims else 1
        self.lat = []
        for dims, table in lats:
            table = np.asarray(table, dtype=np.float64)
            self.lat.append((list(dims), table[np.ix_(*[domains[d] for d in dims])] if dims else table))
        self.v_local = {}
        v_hub = np.full(self.scope_shape, float(v_const))
        for dim, values in objs:
            vec = np.asarray(values, dtype=np.float64)[domains[dim]]
            if dim in self.v_local or dim in self.local_dims:
                self.v_local[dim] = self.v_local.get(dim, 0.0) + vec
            else:
                shape = [1] * len(self.scope_axes)
                shape[self.scope_axes.index(dim)] = len(vec)
                v_hub = v_hub + vec.reshape(shape)
        self.v_hub = np.broadcast_to(v_hub, self.scope_shape).reshape(self.n_keys)
        vl = np.zeros(self.local_shape)
        for dim, vec in self.v_local.items():
            shape = [1] * len(self.local_dims)
            shape[self.local_dims.index(dim)] = len(vec)
            vl = vl + vec.reshape(shape)
        self.v_local_flat = vl.reshape(self.n_local)
        self.order, self.max_intermediate = self._elimination_order()

    # ------------------------------------------------------------------ elimination
    def _elimination_order(self):
        """Greedy min-size order of the local dims, and a plan whose multiplier-free parts are pre-summed:
        each step's value is ``w_v * S_v - w_t * S_t + (messages of earlier steps)``, maximised over one dim."""
        items = [(list(dims), "t", table) for dims, table in self.lat] + [
            ([d], "v", vec) for d, vec in self.v_local.items()
        ]
        self.plan, order, largest, remaining = [], [], 1, list(self.local_dims)

        def union_of(group):
            union = []
            for dims, _, _ in group:
                union += [a for a in dims if a not in union]
            return union

        while remaining:

            def cost(d):
                return int(np.prod([self.size[a] for a in union_of([x for x in items if d in x[0]])], dtype=np.float64))

            d = min(remaining, key=cost)
            largest = max(largest, cost(d))
            group = [x for x in items if d in x[0]]
            items = [x for x in items if d not in x[0]]
            union = union_of(group)
            self.plan.append(
                (
                    union,
                    union.index(d),
                    self._static(group, union, "t"),
                    self._static(group, union, "v"),
                    [payload for dims, kind, payload in group if kind == "m"],
                    [a for a in union if a != d],
                )
            )
            items.append((self.plan[-1][5], "m", len(self.plan) - 1))
            order.append(d)
            remaining.remove(d)
        self.final = (
            self._static(items, self.scope_axes, "t"),
            self._static(items, self.scope_axes, "v"),
            [payload for dims, kind, payload in items if kind == "m"],
        )
        return order, largest

    def _static(self, group, union, kind):
        parts = [self._align(dims, arr[None], union)[0] for dims, k, arr in group if k == kind]
        if not parts:
            return None
        return np.asarray(sum(parts), dtype=np.float64)

    def _align(self, axes, arr, union):
        """arr has shape (L, *sizes of axes); return it broadcastable over (L, *union)."""
        perm = sorted(range(len(axes)), key=lambda i: union.index(axes[i]))
        arr = np.transpose(arr, [0] + [1 + i for i in perm])
        return arr.reshape([arr.shape[0]] + [self.size[u] if u in axes else 1 for u in union])

    def _values(self, w_v: np.ndarray, w_t: np.ndarray) -> np.ndarray:
        """max over local choices of (w_v * v - w_t * t) for each weight pair: shape (L, n_keys)."""
        L = len(w_t)
        messages = []

        def combine(union, S_t, S_v, inputs):
            ones = [1] * len(union)
            shape = [L] + [self.size[u] for u in union]
            if S_t is not None:  # in-place sums: about one pass over the table per input
                acc = np.multiply(S_t[None], (-w_t).reshape([L] + ones))
                if acc.shape != tuple(shape):
                    acc = np.ascontiguousarray(np.broadcast_to(acc, shape))
            else:
                acc = np.zeros(shape)
            if S_v is not None:
                acc += w_v.reshape([L] + ones) * S_v[None]
            for k in inputs:
                acc += self._align(self.plan[k][5], messages[k], union)
            return acc

        for union, axis, S_t, S_v, inputs, _ in self.plan:
            messages.append(combine(union, S_t, S_v, inputs).max(axis=1 + axis))
        S_t, S_v, inputs = self.final
        if self.scope_axes:
            out = (
                combine(self.scope_axes, S_t, S_v, inputs)
                if (S_t is not None or S_v is not None or inputs)
                else np.zeros((L,) + self.scope_shape)
            )
        else:
            out = combine([], S_t, S_v, inputs) if (S_t is not None or S_v is not None or inputs) else np.zeros(L)
        out = np.asarray(out).reshape(L, self.n_keys) + w_v[:, None] * self.v_hub[None, :]
        return np.maximum(out, 0.0) if self.removable else out  # "remove" = (0, 0)

    def lagrangian(self, lams: np.ndarray) -> np.ndarray:
        lams = np.asarray(lams, dtype=np.float64)
        step = max(1, _BATCH_CELLS // max(self.max_intermediate, 1))
        return np.concatenate(
            [self._values(np.ones(len(lams[i : i + step])), lams[i : i + step]) for i in range(0, len(lams), step)]
        )

    def min_latency(self) -> np.ndarray:
        return -self._values(np.zeros(1), np.ones(1))[0]

    # ------------------------------------------------------------------ enumeration of chosen keys
    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Latency of every local choice combination for each key: shape (len(keys), n_local)."""
        keys = np.asarray(keys, dtype=np.int64)
        idx = np.unravel_index(keys, self.scope_shape) if self.scope_axes else ()
        all_axes = self.scope_axes + self.local_dims
        t = np.zeros((len(keys),) + self.local_shape)
        for dims, table in self.lat:
            arr = self._align(dims, table[None], all_axes)[0] if dims else np.asarray(table)
            if not dims:
                t += float(arr)
                continue
            pick = tuple(
                idx[i] if arr.shape[i] > 1 else np.zeros(len(keys), dtype=np.int64) for i in range(len(self.scope_axes))
            )
            t += arr[pick] if self.scope_axes else arr[None]
        return t.reshape(len(keys), self.n_local)

    def best_option(self, key: int, lam: float | None):
        """(local choices, kept) maximising v - lam t at ``key`` (lam None: smallest latency)."""
        t = self.rows(np.array([key]))[0]
        if lam is None:
            i = int(np.argmin(t))
            if self.removable and t[i] > 0:
                return {}, False
        else:
            val = self.v_hub[key] + self.v_local_flat - lam * t
            i = int(np.argmax(val))
            if self.removable and val[i] < 0:
                return {}, False
        return self.decode_code(i), True

    def decode_code(self, code: int) -> dict[str, int]:
        if not self.local_dims:
            return {}
        idx = np.unravel_index(int(code), self.local_shape)
        return {d: int(dom[i]) for d, dom, i in zip(self.local_dims, self.local_domains, idx)}

    def materialize(self, alive: np.ndarray, threshold: np.ndarray, lam: float, deadline=None):
        """A regular Factor holding, for the ``alive`` keys, only options with v - lam t >= threshold[key]
        (Pareto-filtered); every other key maps to one dead row."""
        from .structure import Factor, _pareto_rows_separable

        alive = np.flatnonzero(alive)
        chunk = max(1, (1 << 21) // max(self.n_local, 1))
        parts, offset = [], 0
        for lo in range(0, len(alive), chunk):
            if deadline is not None and time.perf_counter() > deadline:
                raise PrefilterTimeout
            keys = alive[lo : lo + chunk]
            t = self.rows(keys)
            vh = self.v_hub[keys]
            thr = threshold[keys]
            allowed = (vh[:, None] + self.v_local_flat[None, :] - lam * t) >= thr[:, None]
            ft, fv, code, row_start = _pareto_rows_separable(
                t, vh, self.v_local_flat, removable=self.removable, allowed=allowed, remove_allowed=thr <= 0.0
            )
            parts.append((ft, fv, code, row_start[1:] + offset))
            offset += int(row_start[-1])
        ft = np.concatenate([p[0] for p in parts] + [[DEAD]])
        fv = np.concatenate([p[1] for p in parts] + [[-DEAD]])
        code = np.concatenate([p[2] for p in parts] + [[-1 if self.removable else 0]]).astype(np.int64)
        row_start = np.concatenate([[0]] + [p[3] for p in parts] + [[offset + 1]]).astype(np.int64)
        key_to_row = np.full(self.n_keys, len(alive), dtype=np.int64)
        key_to_row[alive] = np.arange(len(alive))
        return Factor(
            self.name,
            self.block,
            self.scope,
            key_to_row,
            ft,
            fv,
            code,
            row_start,
            self.local_dims,
            self.local_domains,
            removable=self.removable,
        )


# ---------------------------------------------------------------------------------------------- chain passes
def _potentials(S, lams, check=None):
    """Per-position node and edge sums of the factors' Lagrangians: lists of (L, n_j) / (L, n_j n_j+1)."""
    L = len(lams)
    m = len(S.positions)
    n = [S.position_size(j) for j in range(m)]
    nodes = [np.zeros((L, n[j])) for j in range(m)]
    edges = [np.zeros((L, n[j] * n[j + 1])) for j in range(m - 1)]
    for j in range(m):
        for f in S.node_factors[j]:
            if check is not None:
                check()
            nodes[j] = nodes[j] + f.lagrangian(lams)
    for j in range(m - 1):
        for f in S.edge_factors[j]:
            if check is not None:
                check()
            edges[j] = edges[j] + f.lagrangian(lams)
    return nodes, edges, n


def _forward_backward(nodes, edges, n, reduce=np.max):
    m = len(nodes)
    L = nodes[0].shape[0]
    alpha = [nodes[0]]
    for j in range(m - 1):
        M = alpha[j][:, :, None] + edges[j].reshape(L, n[j], n[j + 1])
        alpha.append(nodes[j + 1] + reduce(M, axis=1))
    beta = [None] * m
    beta[m - 1] = np.zeros((L, n[m - 1]))
    for j in range(m - 2, -1, -1):
        M = edges[j].reshape(L, n[j], n[j + 1]) + (nodes[j + 1] + beta[j + 1])[:, None, :]
        beta[j] = reduce(M, axis=2)
    return alpha, beta


def _path(nodes, edges, n, alpha, beta, row, pick):
    keys = [int(pick(alpha[0][row] + beta[0][row]))]
    for j in range(len(nodes) - 1):
        M = edges[j][row].reshape(n[j], n[j + 1])[keys[j]] + nodes[j + 1][row] + beta[j + 1][row]
        keys.append(int(pick(M)))
    return keys


def _factors(S):
    return [f for fs in S.node_factors for f in fs] + [f for fs in S.edge_factors for f in fs]


def _scope_key(f, keys, n):
    kind, j = f.scope
    return keys[j] if kind == "node" else keys[j] * n[j + 1] + keys[j + 1]


def _assignment(problem, S, keys, lam):
    """Choices and blocks of the Lagrangian solution along ``keys`` (lam None: smallest latency options)."""
    n = [S.position_size(j) for j in range(len(S.positions))]
    choices = {d: int(S.domains[d][0]) for d in S.domains}
    for j in range(len(S.positions)):
        choices.update(S.position_choices(j, keys[j]))
    blocks = {b.name: problem.block_state(b.name) != "removed" for b in problem.blocks}
    for f in _factors(S):
        key = _scope_key(f, keys, n)
        if getattr(f, "implicit", False):
            local, kept = f.best_option(key, lam)
        else:
            if not f.local_dims and not f.removable:
                continue
            r = f.key_to_row[key]
            lo, hi = f.row_start[r], f.row_start[r + 1]
            opt = lo if lam is None else lo + int(np.argmax(f.v[lo:hi] - lam * f.t[lo:hi]))
            local, kept = f.decode(int(opt))
        choices.update(local)
        if f.removable:
            blocks[f.block] = kept
    return choices, blocks


def prefilter(problem, S, deadline=None, info=None):
    """Replace the implicit factors of ``S`` by filtered regular ones (in place).

    Returns (incumbent or None, dual bound). Raises InfeasibleBudgetError when the budget is below the
    smallest reachable latency, PrefilterTimeout (with ``.incumbent`` / ``.bound``) when time runs out."""
    from .chain_dp import infeasible_budget_error

    info = info if info is not None else {}
    start = time.perf_counter()
    B = float(problem.budget_ms)

    def check_time(incumbent, bound):
        if deadline is not None and time.perf_counter() > deadline:
            err = PrefilterTimeout()
            err.incumbent, err.bound = incumbent, bound
            raise err

    # Smallest reachable latency (min-sum along the chain; implicit factors by min-sum elimination).
    class _MinView:
        def __init__(self, f):
            self.f = f

        def lagrangian(self, lams):
            return -self.f.min_latency()[None, :]

    from types import SimpleNamespace

    minS = SimpleNamespace(
        positions=S.positions,
        position_size=S.position_size,
        node_factors=[[_MinView(f) for f in fs] for fs in S.node_factors],
        edge_factors=[[_MinView(f) for f in fs] for fs in S.edge_factors],
    )
    nodes, edges, n = _potentials(minS, np.zeros(1))  # one cheap pass, not interrupted: a feasible answer
    alpha, beta = _forward_backward(nodes, edges, n)
    min_latency = S.const_t - float((alpha[-1][0]).max())
    keys = _path(nodes, edges, n, alpha, beta, 0, np.argmax)
    choices, blocks = _assignment(problem, S, keys, None)
    if not problem.within_budget(min_latency):
        raise infeasible_budget_error(problem, choices, blocks)
    obj, lat = problem.evaluate(choices, blocks)
    incumbent = (obj, choices, blocks) if problem.within_budget(lat) else None
    check_time(incumbent, float("inf"))

    # Dual search: a coarse geometric grid, then golden-section refinement (the dual is convex in lam). Every
    # multiplier's Lagrangian solution is decoded: the feasible ones improve the incumbent as the search goes.
    evaluated = {}
    best = [incumbent]

    def dual(lams):
        lams = np.asarray(lams, dtype=np.float64)
        nodes, edges, n = _potentials(S, lams, lambda: check_time(best[0], min(evaluated.values(), default=np.inf)))
        alpha, beta = _forward_backward(nodes, edges, n)
        values = lams * (B - S.const_t) + S.const_v + alpha[-1].max(axis=1)
        for row, (lam, value) in enumerate(zip(lams, values)):
            evaluated[float(lam)] = float(value)
            keys = _path(nodes, edges, n, alpha, beta, row, np.argmax)
            choices, blocks = _assignment(problem, S, keys, float(lam))
            obj, lat = problem.evaluate(choices, blocks)
            if problem.within_budget(lat) and (best[0] is None or obj > best[0][0]):
                best[0] = (obj, choices, blocks)
        return values

    dense_t = max(abs(problem.dense_latency()), 1e-12)
    v_scale = max(
        sum(
            float(np.abs(f.v_hub).max(initial=0.0) + np.abs(f.v_local_flat).max(initial=0.0))
            if getattr(f, "implicit", False)
            else float(np.abs(f.v).max(initial=0.0))
            for f in _factors(S)
        )
        + abs(S.const_v),
        1e-300,
    )
    lam0 = v_scale / dense_t
    grid = np.concatenate([[0.0], lam0 * np.geomspace(1e-4, 1e4, 9)])
    values = np.array([dual([lam])[0] for lam in grid[::-1]])[::-1]  # one at a time: a bound after the first
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    golden = (np.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = dual([a])[0], dual([b])[0]
    for _ in range(10):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = dual([a])[0]
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = dual([b])[0]
    lam_star = min(evaluated, key=evaluated.get)
    dual([lam_star * 1.001, lam_star * 1.01])  # slightly tighter multipliers: often the best feasible solution
    bound = min(evaluated.values())
    incumbent = best[0]
    info["prefilter_lambda"] = lam_star
    info["prefilter_dual_bound"] = bound

    check_time(incumbent, bound)
    inc_v = incumbent[0]
    info["prefilter_incumbent"] = inc_v
    tol = 1e-9 * max(abs(bound), abs(inc_v), 1.0)

    # Max-marginals at lam*: the best Lagrangian value of any solution through each key of each factor.
    nodes, edges, n = _potentials(S, np.array([lam_star]))
    alpha, beta = _forward_backward(nodes, edges, n)
    c = lam_star * (B - S.const_t) + S.const_v
    kept_options = total_cells = 0
    for j in range(len(S.positions)):
        for kind, lists in (("node", S.node_factors), ("edge", S.edge_factors)):
            if j >= len(lists):
                continue
            for idx, f in enumerate(lists[j]):
                if not getattr(f, "implicit", False):
                    continue
                if kind == "node":
                    marg = c + alpha[j][0] + beta[j][0]
                else:
                    marg = c + (
                        alpha[j][0][:, None]
                        + edges[j][0].reshape(n[j], n[j + 1])
                        + (nodes[j + 1][0] + beta[j + 1][0])[None, :]
                    ).reshape(-1)
                own = f.lagrangian(np.array([lam_star]))[0]
                alive = marg >= inc_v - tol
                threshold = own - (marg - inc_v) - tol
                lists[j][idx] = f.materialize(alive, threshold, lam_star, deadline)
                kept_options += int(lists[j][idx].row_start[-1])
                total_cells += f.n_keys * f.n_local
                check_time(incumbent, bound)
    info["prefilter_options_kept"] = kept_options
    info["prefilter_cells"] = total_cells
    info["prefilter_s"] = time.perf_counter() - start
    return incumbent, bound
