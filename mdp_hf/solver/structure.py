"""Decompose a Problem into hub positions and factors — the structure the exact chain solver works on.

*Hub* (outer) dimensions are shared between groups: they appear in an always-on term (outside blocks,
in a never-removed or fixed-kept block) or in terms of two or more removable blocks (ViT embed width E,
a ResNet stage's residual width). Every other dimension is *local* to one removable block. Once the hubs
are fixed, removable blocks are independent: each offers a Pareto set of (latency, importance) options
plus "remove" (0, 0), and the problem is a multiple-choice knapsack.

Hubs are laid out on a chain of *positions* (one hub per position) such that every factor touches at
most two consecutive positions; a factor is then attached to a *node* (one position) or an *edge*
(positions j, j+1). ViT: one position (E). ResNet: R_0 - R_1 - ... - R_4. MobileNet: the conv chain.
When the hubs do not form a chain but their joint choices are few, they are merged into one position.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .problem import Problem

ALWAYS = None  # group id of always-on terms


class NotApplicable(Exception):
    """The exact chain solver cannot handle this structure (it says why); use the MILP instead."""


@dataclass
class Factor:
    """Options of one group for every key of its scope, stored as ragged Pareto-sorted rows.

    Row r holds options row_start[r]:row_start[r+1], sorted by latency with increasing importance (dominated options
    removed; a few exact ties may remain, which is harmless). ``code`` is the flat index into the product of ``local_domains`` (-1 =
    remove the block). Base factors (always-on terms of a scope) have one option per key and no remove.
    """

    name: str
    block: str | None
    scope: tuple[str, int]
    key_to_row: np.ndarray
    t: np.ndarray
    v: np.ndarray
    code: np.ndarray
    row_start: np.ndarray
    local_dims: list[str] = field(default_factory=list)
    local_domains: list[np.ndarray] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return len(self.row_start) - 1

    def lagrangian(self, lams: np.ndarray) -> np.ndarray:
        """max over options of (v - lam * t) for every lam and every key: shape (L, n_keys)."""
        values = self.v[None, :] - lams[:, None] * self.t[None, :]
        per_row = np.maximum.reduceat(values, self.row_start[:-1], axis=1)
        return per_row[:, self.key_to_row]

    def min_latency(self) -> np.ndarray:
        """Smallest option latency per key (rows are sorted by latency)."""
        return self.t[self.row_start[:-1]][self.key_to_row]

    def decode(self, option: int) -> tuple[dict[str, int], bool]:
        """Local dim choices and keep bit of a global option index."""
        code = int(self.code[option])
        if code < 0:
            return {}, False
        if not self.local_dims:
            return {}, True
        idx = np.unravel_index(code, tuple(len(d) for d in self.local_domains))
        return {d: int(dom[i]) for d, dom, i in zip(self.local_dims, self.local_domains, idx)}, True


@dataclass
class Structure:
    positions: list[list[str]]            # hub dims at each chain position
    domains: dict[str, np.ndarray]        # allowed choice indices per dim
    node_factors: list[list[Factor]]
    edge_factors: list[list[Factor]]      # edge j joins positions j and j+1
    const_t: float
    const_v: float
    unused_dims: list[str]
    merged_hubs: bool

    def position_size(self, j: int) -> int:
        return int(np.prod([len(self.domains[d]) for d in self.positions[j]])) if self.positions[j] else 1

    def position_choices(self, j: int, key: int) -> dict[str, int]:
        dims = self.positions[j]
        if not dims:
            return {}
        idx = np.unravel_index(int(key), tuple(len(self.domains[d]) for d in dims))
        return {d: int(self.domains[d][i]) for d, i in zip(dims, idx)}


def _pareto_rows_separable(t: np.ndarray, v_hub: np.ndarray, v_local: np.ndarray, chunk_cells: int = 1 << 15):
    """Per-row Pareto filter (with the "remove" option (0, 0) first in every row) when importance is
    v_hub[row] + v_local[option]: options are ordered by v once, and an option survives when its latency is
    below that of every option with more importance (a reverse running minimum) -- no per-row sort.
    Returns flat t, v, code (option index, -1 = remove), row_start; rows sorted by latency."""
    n_rows, n_opts = t.shape
    order = np.argsort(v_local, kind="stable")
    v_sorted = v_local[order]
    rows_per_chunk = max(1, chunk_cells // max(n_opts, 1))
    parts_t, parts_v, parts_c, counts = [], [], [], []
    for lo in range(0, n_rows, rows_per_chunk):
        ts = t[lo:lo + rows_per_chunk][:, order]
        keep = np.empty(ts.shape, dtype=bool)
        keep[:, -1] = True
        if n_opts > 1:
            later_min = np.minimum.accumulate(ts[:, :0:-1], axis=1)[:, ::-1]  # min t over options with more v
            np.less(ts[:, :-1], later_min, out=keep[:, :-1])
        vh = v_hub[lo:lo + rows_per_chunk]
        keep &= (v_sorted[None, :] + vh[:, None]) > 0  # not dominated by "remove"
        rows, cols = np.nonzero(keep)
        parts_t.append(ts[rows, cols])
        parts_v.append(vh[rows] + v_sorted[cols])
        parts_c.append(order[cols])
        counts.append(keep.sum(axis=1))
    counts = np.concatenate(counts) + 1
    row_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(row_start[-1])
    is_option = np.ones(total, dtype=bool)
    is_option[row_start[:-1]] = False
    out_t, out_v = np.zeros(total), np.zeros(total)
    out_c = np.full(total, -1, dtype=np.int64)
    out_t[is_option] = np.concatenate(parts_t)
    out_v[is_option] = np.concatenate(parts_v)
    out_c[is_option] = np.concatenate(parts_c)
    return out_t, out_v, out_c, row_start


def _broadcast_table(table: np.ndarray, term_dims: list[str], axes: list[str], domains: dict[str, np.ndarray]):
    """Slice ``table`` to the allowed choices and lay it out over ``axes`` (broadcastable)."""
    sliced = table[np.ix_(*[domains[d] for d in term_dims])] if term_dims else table
    order = sorted(range(len(term_dims)), key=lambda i: axes.index(term_dims[i]))
    sliced = np.transpose(sliced, order) if term_dims else sliced
    shape = [1] * len(axes)
    for d in term_dims:
        shape[axes.index(d)] = len(domains[d])
    return np.reshape(sliced, shape)


def _chain_order(outer: list[str], edges: set[tuple[str, str]]) -> list[str] | None:
    """Order hubs so that every edge joins consecutive hubs, or None when they do not form paths."""
    neighbours = {d: set() for d in outer}
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    if any(len(n) > 2 for n in neighbours.values()):
        return None
    order, seen = [], set()
    for start in outer:
        if start in seen or len(neighbours[start]) == 2:
            continue
        current, previous = start, None
        while current is not None:
            order.append(current)
            seen.add(current)
            nxt = [n for n in neighbours[current] if n != previous and n not in seen]
            previous, current = current, (nxt[0] if nxt else None)
    if len(order) != len(outer):  # a cycle remains
        return None
    return order


def decompose(problem: Problem, max_merged_hub_choices: int = 20000, max_factor_cells: int = 20_000_000,
              threads: int | None = None) -> Structure:
    """Split the problem into chain positions and factors (raises NotApplicable with the reason)."""
    threads = threads or 1  # a thread pool measured no faster (the Pareto filters hold the GIL)
    domains = {d.name: np.asarray(problem.allowed_choices(d.name), dtype=np.int64) for d in problem.dimensions}
    state = {b.name: problem.block_state(b.name) for b in problem.blocks}

    def group_of(block):
        if block is None or state[block] == "kept":
            return ALWAYS
        return block

    obj_terms = [t for t in problem.objective_terms if t.block is None or state[t.block] != "removed"]
    lat_terms = [t for t in problem.latency_terms if t.block is None or state[t.block] != "removed"]
    usage: dict[str, set] = {d.name: set() for d in problem.dimensions}
    for term in obj_terms:
        usage[term.dim].add(group_of(term.block))
    for term in lat_terms:
        for d in term.dims:
            usage[d].add(group_of(term.block))
    outer = [d.name for d in problem.dimensions if ALWAYS in usage[d.name] or len(usage[d.name]) >= 2]
    outer_set = set(outer)
    unused = [d.name for d in problem.dimensions if not usage[d.name]]
    groups = [b.name for b in problem.blocks if state[b.name] == "free"]
    group_outer = {g: set() for g in groups}
    group_local = {g: [] for g in groups}
    for d in problem.dimensions:
        for g in usage[d.name]:
            if g is ALWAYS:
                continue
            (group_outer[g].add(d.name) if d.name in outer_set else group_local[g].append(d.name))

    # Hub interaction edges.
    edges, too_wide = set(), False
    scopes_of_factors = [set(t.dims) for t in lat_terms if group_of(t.block) is ALWAYS]
    scopes_of_factors += [group_outer[g] for g in groups]
    for dims in scopes_of_factors:
        dims = sorted(dims)
        if len(dims) > 2:
            too_wide = True
        elif len(dims) == 2:
            edges.add((dims[0], dims[1]))
    order = None if too_wide else _chain_order(outer, edges)
    merged = False
    if order is None:
        total = int(np.prod([len(domains[d]) for d in outer], dtype=np.float64)) if outer else 1
        if total > max_merged_hub_choices:
            raise NotApplicable(f"the {len(outer)} shared (hub) dimensions do not form a chain and have {total} "
                                f"joint choices (> {max_merged_hub_choices}); use the MILP backend")
        positions = [outer]
        merged = True
    else:
        positions = [[d] for d in order]
    if not positions:
        positions = [[]]
    pos_of = {d: j for j, dims in enumerate(positions) for d in dims}
    n_pos = len(positions)

    def scope_of(dims: set) -> tuple[str, int]:
        js = sorted({pos_of[d] for d in dims})
        if not js:
            return ("node", 0)
        if len(js) == 1:
            return ("node", js[0])
        assert len(js) == 2 and js[1] == js[0] + 1, (dims, js)
        return ("edge", js[0])

    def scope_axes(scope):
        kind, j = scope
        return list(positions[j]) + (list(positions[j + 1]) if kind == "edge" else [])

    def scope_keys(scope):
        return int(np.prod([len(domains[d]) for d in scope_axes(scope)], dtype=np.int64)) if scope_axes(scope) else 1

    node_factors: list[list[Factor]] = [[] for _ in range(n_pos)]
    edge_factors: list[list[Factor]] = [[] for _ in range(max(n_pos - 1, 0))]

    def add(factor: Factor):
        kind, j = factor.scope
        (node_factors if kind == "node" else edge_factors)[j].append(factor)

    # Always-on terms: one base factor per scope (sum of its terms), constants folded in.
    const_t, const_v = 0.0, 0.0
    base: dict[tuple, list] = {}
    for term in lat_terms:
        if group_of(term.block) is not ALWAYS:
            continue
        if not term.dims:
            const_t += float(term.table)
            continue
        base.setdefault(scope_of(set(term.dims)), []).append(("t", term))
    for term in obj_terms:
        if group_of(term.block) is ALWAYS:
            base.setdefault(scope_of({term.dim}), []).append(("v", term))
    for scope in sorted(base, key=lambda s: (s[1], s[0] == "edge")):
        axes = scope_axes(scope)
        t = np.zeros([len(domains[d]) for d in axes])
        v = np.zeros_like(t)
        for kind, term in base[scope]:
            if kind == "t":
                t = t + _broadcast_table(term.table, term.dims, axes, domains)
            else:
                v = v + _broadcast_table(np.asarray(term.values, dtype=np.float64), [term.dim], axes, domains)
        n = scope_keys(scope)
        t, v = t.reshape(n), v.reshape(n)
        add(Factor(f"always-on {scope[0]} {scope[1]}", None, scope, np.arange(n), t.astype(np.float64).copy(),
                   v.astype(np.float64).copy(), np.zeros(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64)))

    # Removable blocks: Pareto options per scope key.
    lat_by_block: dict[str, list] = {g: [] for g in groups}
    obj_by_block: dict[str, list] = {g: [] for g in groups}
    for term in lat_terms:
        if term.block in lat_by_block:
            lat_by_block[term.block].append(term)
    for term in obj_terms:
        if term.block in obj_by_block:
            obj_by_block[term.block].append(term)

    def block_factor(g: str) -> Factor:
        scope = scope_of(group_outer[g])
        axes = scope_axes(scope)
        local = group_local[g]
        n_keys = scope_keys(scope)
        n_local = int(np.prod([len(domains[d]) for d in local], dtype=np.int64)) if local else 1
        all_axes = axes + local
        shape = [len(domains[d]) for d in all_axes]
        t = np.zeros(shape)
        for term in lat_by_block[g]:
            t += _broadcast_table(term.table, term.dims, all_axes, domains)
        # Importance terms are 1-D, so v = v_hub(key) + v_local(option): one ordering serves every key.
        v_hub = np.zeros([len(domains[d]) for d in axes])
        v_local = np.zeros([len(domains[d]) for d in local])
        for term in obj_by_block[g]:
            values = np.asarray(term.values, dtype=np.float64)
            if term.dim in local:
                v_local += _broadcast_table(values, [term.dim], local, domains)
            else:
                v_hub += _broadcast_table(values, [term.dim], axes, domains)
        ft, fv, code, row_start = _pareto_rows_separable(t.reshape(n_keys, n_local), v_hub.reshape(n_keys),
                                                         v_local.reshape(n_local))
        return Factor(g, g, scope, np.arange(n_keys), ft, fv, code, row_start, list(local),
                      [domains[d] for d in local])

    sizes = {}
    for g in groups:
        n_local = int(np.prod([len(domains[d]) for d in group_local[g]], dtype=np.int64)) if group_local[g] else 1
        sizes[g] = scope_keys(scope_of(group_outer[g])) * n_local
        if sizes[g] > max_factor_cells:
            raise NotApplicable(f"block {g!r} has {n_local} local choice combinations for each hub choice "
                                f"({sizes[g]} cells > {max_factor_cells}); use the MILP backend")
    if threads > 1 and sum(sizes.values()) > 200_000:
        with ThreadPoolExecutor(threads) as pool:
            factors = list(pool.map(block_factor, sorted(groups, key=lambda g: -sizes[g])))
        order = {g: i for i, g in enumerate(groups)}
        factors.sort(key=lambda f: order[f.block])
    else:
        factors = [block_factor(g) for g in groups]
    for factor in factors:
        add(factor)

    return Structure(positions, domains, node_factors, edge_factors, const_t, const_v, unused, merged)
