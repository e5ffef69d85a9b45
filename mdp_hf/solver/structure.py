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
    removable: bool = False  # True for a free block (its rows include "remove"); False: always counted

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
    positions: list[list[str]]  # hub dims at each chain position
    domains: dict[str, np.ndarray]  # allowed choice indices per dim
    node_factors: list[list[Factor]]
    edge_factors: list[list[Factor]]  # edge j joins positions j and j+1
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


def _pareto_rows_separable(
    t: np.ndarray,
    v_hub: np.ndarray,
    v_local: np.ndarray,
    removable: bool = True,
    allowed: np.ndarray | None = None,
    remove_allowed: np.ndarray | None = None,
    chunk_cells: int = 1 << 15,
):
    """Per-row Pareto filter when importance is v_hub[row] + v_local[option]: options are ordered by v once,
    and an option survives when its latency is below that of every option with more importance (a reverse
    running minimum) -- no per-row sort. With ``removable`` every row also offers "remove" (0, 0): options it
    dominates (t >= 0, v <= 0) are dropped, and it is dropped itself when an option dominates it (t <= 0,
    v >= 0; a block whose terms sum to a negative latency). Any sign of t and v is handled. ``allowed``
    (n_rows, n_opts) and ``remove_allowed`` (n_rows,) restrict the candidates (Lagrangian pre-filtering).
    Returns flat t, v, code (option index, -1 = remove), row_start; each row sorted by latency (and importance)."""
    n_rows, n_opts = t.shape
    order = np.argsort(v_local, kind="stable")
    v_sorted = v_local[order]
    rows_per_chunk = max(1, chunk_cells // max(n_opts, 1))
    parts_t, parts_v, parts_c, counts, remove_kept, remove_pos = [], [], [], [], [], []
    for lo in range(0, n_rows, rows_per_chunk):
        ts = t[lo : lo + rows_per_chunk][:, order]
        if allowed is not None:
            ok = allowed[lo : lo + rows_per_chunk][:, order]
            ts = np.where(ok, ts, np.inf)
        keep = np.empty(ts.shape, dtype=bool)
        keep[:, -1] = True
        if n_opts > 1:
            later_min = np.minimum.accumulate(ts[:, :0:-1], axis=1)[:, ::-1]  # min t over options with more v
            np.less(ts[:, :-1], later_min, out=keep[:, :-1])
        if allowed is not None:
            keep &= ok
        vh = v_hub[lo : lo + rows_per_chunk]
        if removable:
            vs = v_sorted[None, :] + vh[:, None]
            keep &= ~((ts >= 0) & (vs <= 0))  # dominated by "remove"
            r_ok = ~np.any(keep & (ts <= 0) & (vs >= 0), axis=1)
            if remove_allowed is not None:
                r_ok &= remove_allowed[lo : lo + rows_per_chunk]
            remove_kept.append(r_ok)
            remove_pos.append(np.sum(keep & (ts < 0), axis=1))  # kept options cheaper than removing
        rows, cols = np.nonzero(keep)
        parts_t.append(ts[rows, cols])
        parts_v.append(vh[rows] + v_sorted[cols])
        parts_c.append(order[cols])
        counts.append(keep.sum(axis=1))
    n_kept = np.concatenate(counts).astype(np.int64)
    opt_t, opt_v, opt_c = np.concatenate(parts_t), np.concatenate(parts_v), np.concatenate(parts_c).astype(np.int64)
    if not removable:
        return opt_t, opt_v, opt_c, np.concatenate([[0], np.cumsum(n_kept)]).astype(np.int64)
    r_kept = np.concatenate(remove_kept)
    r_pos = np.concatenate(remove_pos).astype(np.int64)
    row_start = np.concatenate([[0], np.cumsum(n_kept + r_kept)]).astype(np.int64)
    total = int(row_start[-1])
    out_t, out_v = np.zeros(total), np.zeros(total)
    out_c = np.full(total, -1, dtype=np.int64)
    row_of = np.repeat(np.arange(n_rows), n_kept)
    rank = np.arange(opt_t.size) - np.repeat(np.cumsum(n_kept) - n_kept, n_kept)
    at = row_start[row_of] + rank + (r_kept[row_of] & (rank >= r_pos[row_of]))
    out_t[at], out_v[at], out_c[at] = opt_t, opt_v, opt_c  # "remove" rows keep (0, 0, -1)
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


def decompose(
    problem: Problem,
    max_merged_hub_choices: int = 20000,
    max_factor_cells: int = 20_000_000,
    threads: int | None = None,
    prefilter_cells: int = 1_000_000,
) -> Structure:
    """Split the problem into chain positions and factors (raises NotApplicable with the reason).

    Fixed dimensions (one allowed choice) are folded into the tables first. A dimension is local to a group
    when only that group's terms use it; groups are the free blocks and the *kept* blocks (never removable or
    fixed kept), so widths-only problems (every block kept) keep their per-block dimensions local. A kept
    block becomes one factor per connected set of its local dimensions, without a "remove" option; its terms
    over hubs only are always-on terms. Terms outside blocks make their dimensions hubs.

    A group with more than ``prefilter_cells`` (hub key, local combination) cells becomes an ImplicitFactor
    (prefilter.py): its options are only enumerated after exact Lagrangian filtering. ``max_factor_cells``
    now bounds the largest intermediate table of its variable elimination."""
    threads = threads or 1  # a thread pool measured no faster (the Pareto filters hold the GIL)
    domains = {d.name: np.asarray(problem.allowed_choices(d.name), dtype=np.int64) for d in problem.dimensions}
    fixed = {d: int(dom[0]) for d, dom in domains.items() if len(dom) == 1}
    state = {b.name: problem.block_state(b.name) for b in problem.blocks}

    def group_of(block):
        if block is None:
            return ALWAYS
        return ("kept", block) if state[block] == "kept" else block

    # Terms of active blocks with fixed dimensions sliced away: (name, dims, table, group) / (dim, values, group).
    lat_terms, obj_terms, group_const_v = [], [], {}
    for term in problem.latency_terms:
        if term.block is not None and state[term.block] == "removed":
            continue
        table, dims = np.asarray(term.table, dtype=np.float64), []
        for d in term.dims:
            if d in fixed:
                table = np.take(table, fixed[d], axis=len(dims))
            else:
                dims.append(d)
        lat_terms.append((term.name, dims, table, group_of(term.block)))
    for term in problem.objective_terms:
        if term.block is not None and state[term.block] == "removed":
            continue
        g = group_of(term.block)
        if term.dim in fixed:
            group_const_v[g] = group_const_v.get(g, 0.0) + float(term.values[fixed[term.dim]])
        else:
            obj_terms.append((term.dim, np.asarray(term.values, dtype=np.float64), g))

    usage: dict[str, set] = {d.name: set() for d in problem.dimensions}
    for _, dims, _, g in lat_terms:
        for d in dims:
            usage[d].add(g)
    for d, _, g in obj_terms:
        usage[d].add(g)
    outer_set = {d for d, gs in usage.items() if d not in fixed and (ALWAYS in gs or len(gs) >= 2)}
    unused = [d.name for d in problem.dimensions if not usage[d.name]]
    groups = [b.name for b in problem.blocks if state[b.name] == "free"]
    local_of = {d: next(iter(gs)) for d, gs in usage.items() if len(gs) == 1 and d not in outer_set}

    def n_choices(dims) -> int:
        return int(np.prod([len(domains[d]) for d in dims], dtype=np.float64)) if dims else 1

    # Kept blocks: one factor ("component") per connected set of local dimensions; too large ones fall back
    # to hub dimensions (the old behaviour), their terms then being always-on.
    components = []  # (block, local dims, hub dims, lat terms, obj terms)
    kept_groups = {g for _, _, _, g in lat_terms if isinstance(g, tuple)} | {
        g for _, _, g in obj_terms if isinstance(g, tuple)
    }
    for kg in sorted(kept_groups, key=lambda g: g[1]):
        local = [d.name for d in problem.dimensions if local_of.get(d.name) == kg]
        parent = {d: d for d in local}

        def find(d):
            while parent[d] != d:
                parent[d] = parent[parent[d]]
                d = parent[d]
            return d

        for _, dims, _, g in lat_terms:
            if g == kg:
                ds = [d for d in dims if d in parent]
                for a in ds[1:]:
                    parent[find(a)] = find(ds[0])
        by_root: dict[str, list] = {}
        for d in local:
            by_root.setdefault(find(d), []).append(d)
        for comp in by_root.values():
            comp_set = set(comp)
            lats = [t for t in lat_terms if t[3] == kg and comp_set & set(t[1])]
            hubs = sorted({d for t in lats for d in t[1]} - comp_set)
            if len(hubs) > 2:
                outer_set |= comp_set
                continue
            components.append((kg[1], comp, hubs, lats))
    component_of = {d: i for i, c in enumerate(components) for d in c[1]}
    outer = [d.name for d in problem.dimensions if d.name in outer_set]
    group_outer = {g: set() for g in groups}
    group_local = {g: [] for g in groups}
    for d in problem.dimensions:
        for g in usage[d.name]:
            if g in group_outer:
                (group_outer[g].add(d.name) if d.name in outer_set else group_local[g].append(d.name))

    def always_on(term_group, dims) -> bool:
        return term_group is ALWAYS or (isinstance(term_group, tuple) and not any(d in component_of for d in dims))

    # Hub interaction edges.
    edges, too_wide = set(), False
    scopes_of_factors = [set(dims) for _, dims, _, g in lat_terms if always_on(g, dims)]
    scopes_of_factors += [group_outer[g] for g in groups] + [set(c[2]) for c in components]
    for dims in scopes_of_factors:
        dims = sorted(dims)
        if len(dims) > 2:
            too_wide = True
        elif len(dims) == 2:
            edges.add((dims[0], dims[1]))
    order = None if too_wide else _chain_order(outer, edges)
    merged = False
    if order is None:
        total = n_choices(outer)
        if total > max_merged_hub_choices:
            raise NotApplicable(
                f"the {len(outer)} shared (hub) dimensions do not form a chain and have {total} "
                f"joint choices (> {max_merged_hub_choices})"
            )
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
        return n_choices(scope_axes(scope))

    node_factors: list[list[Factor]] = [[] for _ in range(n_pos)]
    edge_factors: list[list[Factor]] = [[] for _ in range(max(n_pos - 1, 0))]

    def add(factor: Factor):
        kind, j = factor.scope
        (node_factors if kind == "node" else edge_factors)[j].append(factor)

    # Always-on terms: one base factor per scope (sum of its terms), constants folded in.
    const_t = 0.0
    const_v = sum(v for g, v in group_const_v.items() if g is ALWAYS or isinstance(g, tuple))
    base: dict[tuple, list] = {}
    for _, dims, table, g in lat_terms:
        if not always_on(g, dims):
            continue
        if not dims:
            const_t += float(table)
            continue
        base.setdefault(scope_of(set(dims)), []).append(("t", dims, table))
    for d, values, g in obj_terms:
        if always_on(g, [d]):
            base.setdefault(scope_of({d}), []).append(("v", [d], values))
    for scope in sorted(base, key=lambda s: (s[1], s[0] == "edge")):
        axes = scope_axes(scope)
        t = np.zeros([len(domains[d]) for d in axes])
        v = np.zeros_like(t)
        for kind, dims, table in base[scope]:
            if kind == "t":
                t = t + _broadcast_table(table, dims, axes, domains)
            else:
                v = v + _broadcast_table(table, dims, axes, domains)
        n = scope_keys(scope)
        t, v = t.reshape(n), v.reshape(n)
        add(
            Factor(
                f"always-on {scope[0]} {scope[1]}",
                None,
                scope,
                np.arange(n),
                t.astype(np.float64).copy(),
                v.astype(np.float64).copy(),
                np.zeros(n, dtype=np.int64),
                np.arange(n + 1, dtype=np.int64),
            )
        )

    def options_factor(name, block, hub_dims, local, lats, objs, v_const, removable) -> Factor:
        """Pareto options (over the local dims) of a group's terms for every key of its scope."""
        scope = scope_of(set(hub_dims))
        axes = scope_axes(scope)
        n_keys = scope_keys(scope)
        if n_keys * n_choices(local) > prefilter_cells:
            from .prefilter import ImplicitFactor

            factor = ImplicitFactor(name, block, scope, axes, local, lats, objs, v_const, removable, domains)
            if factor.max_intermediate > max_factor_cells:
                raise NotApplicable(
                    f"block {block!r}: eliminating its {len(local)} local dimensions needs a "
                    f"{factor.max_intermediate}-cell table (> {max_factor_cells})"
                )
            return factor
        all_axes = axes + local
        t = np.zeros([len(domains[d]) for d in all_axes])
        for dims, table in lats:
            t += _broadcast_table(table, dims, all_axes, domains)
        # Importance terms are 1-D, so v = v_hub(key) + v_local(option): one ordering serves every key.
        v_hub = np.full([len(domains[d]) for d in axes], float(v_const))
        v_local = np.zeros([len(domains[d]) for d in local])
        for dim, values in objs:
            if dim in local:
                v_local += _broadcast_table(values, [dim], local, domains)
            else:
                v_hub += _broadcast_table(values, [dim], axes, domains)
        ft, fv, code, row_start = _pareto_rows_separable(
            t.reshape(n_keys, n_choices(local)), v_hub.reshape(n_keys), v_local.reshape(-1), removable=removable
        )
        return Factor(
            name,
            block,
            scope,
            np.arange(n_keys),
            ft,
            fv,
            code,
            row_start,
            list(local),
            [domains[d] for d in local],
            removable=removable,
        )

    # Removable blocks: Pareto options per scope key, "remove" included.
    sizes = {g: scope_keys(scope_of(group_outer[g])) * n_choices(group_local[g]) for g in groups}

    def block_factor(g: str) -> Factor:
        return options_factor(
            g,
            g,
            group_outer[g],
            group_local[g],
            [(dims, table) for _, dims, table, tg in lat_terms if tg == g],
            [(d, values) for d, values, tg in obj_terms if tg == g],
            group_const_v.get(g, 0.0),
            True,
        )

    if threads > 1 and sum(sizes.values()) > 200_000:
        with ThreadPoolExecutor(threads) as pool:
            factors = list(pool.map(block_factor, sorted(groups, key=lambda g: -sizes[g])))
        order = {g: i for i, g in enumerate(groups)}
        factors.sort(key=lambda f: order[f.block])
    else:
        factors = [block_factor(g) for g in groups]
    for block, comp, hubs, lats in components:
        comp_set = set(comp)
        factors.append(
            options_factor(
                f"{block} (kept) {'/'.join(comp)}",
                block,
                hubs,
                comp,
                [(dims, table) for _, dims, table, _ in lats],
                [(d, values) for d, values, g in obj_terms if d in comp_set],
                0.0,
                False,
            )
        )
    for factor in factors:
        add(factor)

    return Structure(positions, domains, node_factors, edge_factors, const_t, const_v, unused, merged)
