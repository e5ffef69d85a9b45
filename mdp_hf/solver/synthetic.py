"""Synthetic problems: tiny random ones for tests, paper-shaped ones for the benchmark.

Paper shapes (DESIGN.md §1): ResNet-50/101 (residual width per stage is one hub shared by the stage's
bottlenecks and the never-removed stem/shortcut block; group sizes 2-128 channels), MobileNet-V1 (a chain
of convs, no blocks), DeiT-B (embed 768/16, 12 layers x heads 12, QK 64/2, V 64/2, MLP 3072/32).
Latency ~ FLOPs of the layer at the *tile-rounded* widths (GPU-like steps) + launch overhead + noise;
importance = cumulative sums of sorted, lognormal (Taylor-like) group scores.
"""

from __future__ import annotations

import numpy as np

from .problem import Block, Dimension, LatencyTerm, ObjectiveTerm, Problem


# ---------------------------------------------------------------------------------------------- helpers
def _importance(rng, n_groups: int, scale: float = 1.0) -> np.ndarray:
    scores = np.sort(rng.lognormal(0.0, 1.0, n_groups))[::-1] * scale
    return np.cumsum(scores)


def _tile(widths, tile: int) -> np.ndarray:
    w = np.asarray(widths, dtype=np.float64)
    return np.ceil(w / tile) * tile


def _lat(rng, flops: np.ndarray, ms_per_gflop: float, overhead_ms: float = 0.004, noise: float = 0.02):
    table = flops / 1e9 * ms_per_gflop + overhead_ms
    return table * (1.0 + noise * rng.standard_normal(table.shape)).clip(0.9, 1.1)


def _dim(name: str, channels: int, group: int, min_groups: int = 1) -> Dimension:
    return Dimension(name, [group * k for k in range(min_groups, channels // group + 1)])


def budget_between(problem: Problem, fraction: float) -> float:
    """Budget at ``fraction`` of the dense latency."""
    return fraction * problem.dense_latency()


# ---------------------------------------------------------------------------------------------- paper shapes
def resnet(
    depth: int = 50,
    seed: int = 0,
    fraction: float = 0.5,
    hub_choices: int = 16,
    mid_choices: int = 32,
    per_layer_groups: bool = False,
) -> Problem:
    """ResNet-50/101 bottlenecks at 224x224: hubs R_0..R_4, per layer C1/C2, one removable block per layer.

    Default groups: residual widths 64..2048 in groups of 4..128 (16 choices), bottleneck widths 64..512 in
    groups of 2..16 (32 choices) -- the paper's 2-128 channels per group. ``per_layer_groups``: every
    dimension draws its own group size (x0.5, x1 or x2 of the default), so the numbers of choices differ.
    """
    rng = np.random.default_rng(seed)
    jitter = np.random.default_rng(seed + 999)

    def _dim(name, channels, group, min_groups=1):
        if per_layer_groups:
            group = max(1, int(group * jitter.choice([0.5, 1.0, 2.0])))
        return Dimension(name, [group * k for k in range(min_groups, channels // group + 1)])

    layers = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    mid = (64, 128, 256, 512)
    out = (256, 512, 1024, 2048)
    spatial = (56, 28, 14, 7)
    hub_group = {c: max(1, c // hub_choices) for c in (64, 256, 512, 1024, 2048)}
    mid_group = {c: max(1, c // mid_choices) for c in (64, 128, 256, 512)}
    ms_per_gflop = 1.2
    dims = [_dim("R0", 64, hub_group[64])]
    blocks = [Block("stem_and_shortcuts", removable=False)]
    obj, lat = [], []

    def w(name):
        return np.asarray(next(d for d in dims if d.name == name).widths, dtype=np.float64)

    lat.append(
        LatencyTerm(
            "stem", ["R0"], _lat(rng, 112 * 112 * 49 * 3 * _tile(w("R0"), 8), ms_per_gflop) + 0.05, "stem_and_shortcuts"
        )
    )
    obj.append(ObjectiveTerm("R0", list(_importance(rng, len(w("R0")), 0.5)), "stem_and_shortcuts"))
    for s, n_layers in enumerate(layers):
        r_in, r_out = f"R{s}", f"R{s + 1}"
        dims.append(_dim(r_out, out[s], hub_group[out[s]]))
        hw = spatial[s]
        hw_in = hw * 2 if s > 0 else hw
        lat.append(
            LatencyTerm(
                f"shortcut{s + 1}",
                [r_out, r_in],
                _lat(rng, hw * hw * np.outer(_tile(w(r_out), 8), _tile(w(r_in), 8)), ms_per_gflop),
                "stem_and_shortcuts",
            )
        )
        share = _importance(rng, len(w(r_out)), 1.0)
        obj.append(ObjectiveTerm(r_out, list(share * 0.3), "stem_and_shortcuts"))
        for i in range(n_layers):
            b = f"layer{s + 1}.{i}"
            blocks.append(Block(b))
            c1, c2 = f"{b}.C1", f"{b}.C2"
            dims += [_dim(c1, mid[s], mid_group[mid[s]]), _dim(c2, mid[s], mid_group[mid[s]])]
            src = r_in if i == 0 else r_out
            hw1 = hw_in if i == 0 else hw
            lat.append(
                LatencyTerm(
                    f"{b}.conv1",
                    [c1, src],
                    _lat(rng, hw1 * hw1 * np.outer(_tile(w(c1), 16), _tile(w(src), 16)), ms_per_gflop),
                    b,
                )
            )
            lat.append(
                LatencyTerm(
                    f"{b}.conv2",
                    [c2, c1],
                    _lat(rng, hw * hw * 9 * np.outer(_tile(w(c2), 16), _tile(w(c1), 16)), ms_per_gflop),
                    b,
                )
            )
            lat.append(
                LatencyTerm(
                    f"{b}.conv3",
                    [r_out, c2],
                    _lat(rng, hw * hw * np.outer(_tile(w(r_out), 16), _tile(w(c2), 16)), ms_per_gflop),
                    b,
                )
            )
            scale = rng.uniform(0.5, 2.0)
            obj.append(ObjectiveTerm(c1, list(_importance(rng, len(w(c1)), scale)), b))
            obj.append(ObjectiveTerm(c2, list(_importance(rng, len(w(c2)), scale)), b))
            obj.append(ObjectiveTerm(r_out, list(share * 0.7 / n_layers), b))
    lat.append(
        LatencyTerm("fc", ["R4"], _lat(rng, 1000 * _tile(w("R4"), 8), ms_per_gflop) + 0.01, "stem_and_shortcuts")
    )
    problem = Problem(
        dims, blocks, obj, lat, budget_ms=0.0, metadata={"family": f"resnet{depth}", "seed": seed, "synthetic": True}
    )
    problem.budget_ms = budget_between(problem, fraction)
    return problem.validate()


def mobilenet_v1(seed: int = 0, fraction: float = 0.5) -> Problem:
    """MobileNet-V1: stem + 13 depthwise/pointwise pairs; every pointwise width is a chain dim, no blocks."""
    rng = np.random.default_rng(seed)
    widths = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    strides = [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    ms_per_gflop = 2.0
    dims = [_dim(f"D{i}", c, max(2, c // 32)) for i, c in enumerate(widths)]
    w = {d.name: np.asarray(d.widths, dtype=np.float64) for d in dims}
    obj = [ObjectiveTerm(d.name, list(_importance(rng, len(d.widths), rng.uniform(0.5, 2)))) for d in dims]
    hw = 112
    lat = [LatencyTerm("stem", ["D0"], _lat(rng, hw * hw * 27 * _tile(w["D0"], 8), ms_per_gflop))]
    for i in range(1, len(widths)):
        hw = hw // strides[i]
        lat.append(
            LatencyTerm(f"dw{i}", [f"D{i - 1}"], _lat(rng, hw * hw * 9 * _tile(w[f"D{i - 1}"], 32) * 4, ms_per_gflop))
        )
        lat.append(
            LatencyTerm(
                f"pw{i}",
                [f"D{i}", f"D{i - 1}"],
                _lat(rng, hw * hw * np.outer(_tile(w[f"D{i}"], 16), _tile(w[f"D{i - 1}"], 16)), ms_per_gflop),
            )
        )
    lat.append(LatencyTerm("fc", ["D13"], _lat(rng, 1000 * _tile(w["D13"], 8), ms_per_gflop)))
    problem = Problem(
        dims, [], obj, lat, budget_ms=0.0, metadata={"family": "mobilenet_v1", "seed": seed, "synthetic": True}
    )
    problem.budget_ms = budget_between(problem, fraction)
    return problem.validate()


def deit(
    seed: int = 0,
    fraction: float = 0.5,
    layers: int = 12,
    embed: int = 768,
    heads: int = 12,
    head_dim: int = 64,
    mlp: int = 3072,
    groups=(16, 1, 2, 2, 32),
    tokens: int = 197,
    per_layer_groups: bool = False,
) -> Problem:
    """DeiT-B: global E; per layer H, QK, V, M; blocks attn_i and mlp_i; T_qk[H,E,QK], T_vo[H,E,V], T_mlp[E,M].
    ``per_layer_groups``: each layer's QK, V and MLP dimensions draw their own group size (x0.5, x1 or x2)."""
    rng = np.random.default_rng(seed)
    jitter = np.random.default_rng(seed + 999)

    def _dim(name, channels, group, min_groups=1):
        if per_layer_groups and not name.endswith(".H") and name != "E":
            group = max(1, int(group * jitter.choice([0.5, 1.0, 2.0])))
        return Dimension(name, [group * k for k in range(min_groups, channels // group + 1)])

    gE, gH, gQK, gV, gM = groups
    ms_per_gflop = 0.08
    dims = [_dim("E", embed, gE)]
    E = _tile(dims[0].widths, 8)
    blocks, obj, lat = [], [], []
    n = tokens
    e_share = _importance(rng, len(E), 1.0)
    obj.append(ObjectiveTerm("E", list(e_share * 0.2)))
    lat.append(LatencyTerm("patch_embed", ["E"], _lat(rng, n * 768 * E, ms_per_gflop) + 0.02))
    lat.append(LatencyTerm("final_norm_and_head", ["E"], _lat(rng, 1000 * E + n * E * 5, ms_per_gflop)))
    lat.append(LatencyTerm("constants", [], np.asarray(0.03)))
    for i in range(layers):
        a, m = f"attn{i}", f"mlp{i}"
        blocks += [Block(a), Block(m)]
        H, QK, V, M = f"{i}.H", f"{i}.QK", f"{i}.V", f"{i}.M"
        dims += [_dim(H, heads, gH), _dim(QK, head_dim, gQK), _dim(V, head_dim, gV), _dim(M, mlp, gM)]
        h = np.asarray(dims[-4].widths, dtype=np.float64)[:, None, None]
        qk = _tile(dims[-3].widths, 8)[None, None, :]
        v = _tile(dims[-2].widths, 8)[None, None, :]
        e = E[None, :, None]
        lat.append(
            LatencyTerm(f"{a}.qk", [H, "E", QK], _lat(rng, 2 * n * e * h * qk + n * n * h * qk, ms_per_gflop), a)
        )
        lat.append(LatencyTerm(f"{a}.vo", [H, "E", V], _lat(rng, 2 * n * e * h * v + n * n * h * v, ms_per_gflop), a))
        lat.append(
            LatencyTerm(
                f"{m}.mlp", ["E", M], _lat(rng, 2 * n * np.outer(E, _tile(dims[-1].widths, 32)), ms_per_gflop), m
            )
        )
        scale = rng.uniform(0.5, 2.0)
        obj += [
            ObjectiveTerm(H, list(_importance(rng, len(dims[-4].widths), scale)), a),
            ObjectiveTerm(QK, list(_importance(rng, len(dims[-3].widths), scale * 0.5)), a),
            ObjectiveTerm(V, list(_importance(rng, len(dims[-2].widths), scale * 0.5)), a),
            ObjectiveTerm(M, list(_importance(rng, len(dims[-1].widths), scale)), m),
            ObjectiveTerm("E", list(e_share * 0.8 / (2 * layers)), a),
            ObjectiveTerm("E", list(e_share * 0.8 / (2 * layers)), m),
        ]
    problem = Problem(
        dims, blocks, obj, lat, budget_ms=0.0, metadata={"family": "deit_b", "seed": seed, "synthetic": True}
    )
    problem.budget_ms = budget_between(problem, fraction)
    return problem.validate()


# ---------------------------------------------------------------------------------------------- tiny random
def _rand_table(rng, shape, integer: bool):
    base = rng.uniform(0.1, 1.0, shape)
    for axis, k in enumerate(shape):  # latency tends to grow with width, with plateaus
        grow = np.cumsum(rng.choice([0.0, rng.uniform(0.1, 1.0)], size=k, p=[0.3, 0.7]))
        base = base + grow.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return np.round(base * 4) if integer else base


def _rand_values(rng, k):
    steps = rng.exponential(1.0, k) * (rng.random(k) > 0.2)  # some plateaus
    return list(np.cumsum(steps))


def random_problem(seed: int, kind: str | None = None) -> Problem:
    """A tiny problem (brute-forceable) of one of the kinds 'vit', 'resnet', 'chain', 'random'."""
    rng = np.random.default_rng(seed)
    kind = kind or ["vit", "resnet", "chain", "random"][seed % 4]
    integer = rng.random() < 0.25  # integer latencies create ties exactly at the budget
    dims, blocks, obj, lat = [], [], [], []

    def dim(name, k):
        g = int(rng.integers(1, 4))
        kmin = int(rng.integers(1, 3))  # min-keep
        dims.append(Dimension(name, [g * i for i in range(kmin, kmin + k)]))
        return name

    def nk(*names):
        return tuple(len(next(d for d in dims if d.name == n).widths) for n in names)

    def add_lat(name, ds, block):
        lat.append(LatencyTerm(name, list(ds), _rand_table(rng, nk(*ds), integer), block))

    def add_obj(d, block, scale=1.0):
        obj.append(ObjectiveTerm(d, [x * scale for x in _rand_values(rng, nk(d)[0])], block))

    if kind == "vit":
        E = dim("E", int(rng.integers(2, 4)))
        add_lat("embed", [E], None)
        add_obj(E, None, 0.3)
        lat.append(LatencyTerm("const", [], np.asarray(float(rng.uniform(0, 1))), None))
        for i in range(int(rng.integers(1, 3))):
            a, m = f"attn{i}", f"mlp{i}"
            blocks += [Block(a), Block(m)]
            H, QK, V, M = dim(f"H{i}", 2), dim(f"QK{i}", 2), dim(f"V{i}", int(rng.integers(1, 3))), dim(f"M{i}", 2)
            add_lat(f"qk{i}", [H, E, QK], a)
            add_lat(f"vo{i}", [H, E, V], a)
            add_lat(f"mlp{i}", [E, M], m)
            for d in (H, QK, V, E):
                add_obj(d, a)
            add_obj(M, m)
            add_obj(E, m)
    elif kind == "resnet":
        blocks.append(Block("stem", removable=False))
        R = [dim("R0", 2)]
        add_lat("stem", [R[0]], "stem")
        add_obj(R[0], "stem")
        for s in range(1, int(rng.integers(2, 4))):
            R.append(dim(f"R{s}", 2))
            add_lat(f"short{s}", [R[s], R[s - 1]], "stem")
            add_obj(R[s], "stem", 0.3)
            for i in range(int(rng.integers(1, 3)) if s < 2 else 1):
                b = f"l{s}.{i}"
                blocks.append(Block(b))
                C1, C2 = dim(f"{b}.C1", 2), dim(f"{b}.C2", int(rng.integers(1, 3)))
                add_lat(f"{b}.conv1", [C1, R[s - 1] if i == 0 else R[s]], b)
                add_lat(f"{b}.conv2", [C2, C1], b)
                add_lat(f"{b}.conv3", [R[s], C2], b)
                for d in (C1, C2, R[s]):
                    add_obj(d, b)
        add_lat("fc", [R[-1]], "stem")
    elif kind == "chain":
        n = int(rng.integers(3, 6))
        D = [dim(f"D{i}", int(rng.integers(2, 4))) for i in range(n)]
        add_lat("stem", [D[0]], None)
        for i in range(1, n):
            add_lat(f"conv{i}", [D[i], D[i - 1]], None)
        for d in D:
            add_obj(d, None)
        if rng.random() < 0.5:  # a removable side branch with a local dim
            blocks.append(Block("side"))
            S = dim("S", 2)
            add_lat("side", [S, D[1]], "side")
            add_obj(S, "side")
    else:
        D = [dim(f"D{i}", int(rng.integers(2, 4))) for i in range(int(rng.integers(3, 6)))]
        blocks += [Block(f"b{i}", removable=bool(rng.random() < 0.8)) for i in range(int(rng.integers(1, 4)))]
        owners = [None] + [b.name for b in blocks]
        for i in range(int(rng.integers(3, 7))):
            k = int(rng.integers(0, 4))
            ds = list(rng.choice([d for d in D], size=min(k, len(D)), replace=False))
            add_lat(f"t{i}", ds, owners[int(rng.integers(len(owners)))])
        for d in D:
            add_obj(d, owners[int(rng.integers(len(owners)))])
    removable = [b.name for b in blocks if b.removable]
    fixed_blocks = {b: bool(rng.random() < 0.5) for b in removable if rng.random() < 0.15}
    fixed_choices = {d.name: int(rng.integers(len(d.widths))) for d in dims if rng.random() < 0.1}
    problem = Problem(dims, blocks, obj, lat, 0.0, fixed_choices, fixed_blocks, {"kind": kind, "seed": seed})
    return problem.validate()


# ---------------------------------------------------------------------------------------------- problem variants
def widths_only(problem: Problem) -> Problem:
    """The same problem with every removable block fixed kept (pruning without blocks; the paper's ablations)."""
    fixed = {b.name: True for b in problem.blocks if b.removable}
    fixed.update({b: k for b, k in problem.fixed_blocks.items() if not k})  # already removed stays removed
    return Problem(
        problem.dimensions,
        problem.blocks,
        problem.objective_terms,
        problem.latency_terms,
        problem.budget_ms,
        dict(problem.fixed_choices),
        fixed,
        {**problem.metadata, "variant": "widths_only"},
    ).validate()


def monotone_step(
    problem: Problem, seed: int = 0, shrink: float = 0.5, removed: float = 0.2, fixed: float = 0.0
) -> Problem:
    """A later step of monotone iterative pruning: each dimension's widths are truncated to the currently active
    units (its largest allowed width drops below the original size, by up to ``shrink`` of its choices), a
    ``removed`` fraction of the removable blocks is already removed (fixed removed), and a ``fixed`` fraction of
    the dimensions has its choice fixed. Tables and importances are sliced accordingly; the budget is kept."""
    rng = np.random.default_rng(seed)
    keep = {}
    dims = []
    for d in problem.dimensions:
        k = len(d.widths)
        keep[d.name] = max(1, k - int(rng.integers(0, int(shrink * k) + 1)))
        dims.append(Dimension(d.name, list(d.widths[: keep[d.name]])))

    def sliced(table, term_dims):
        return np.asarray(table)[tuple(slice(0, keep[d]) for d in term_dims)]

    lat = [LatencyTerm(t.name, t.dims, sliced(t.table, t.dims), t.block) for t in problem.latency_terms]
    obj = [ObjectiveTerm(t.dim, list(np.asarray(t.values)[: keep[t.dim]]), t.block) for t in problem.objective_terms]
    fixed_blocks = {b: k for b, k in problem.fixed_blocks.items()}
    for b in problem.blocks:
        if b.removable and b.name not in fixed_blocks and rng.random() < removed:
            fixed_blocks[b.name] = False
    fixed_choices = {d: min(int(c), keep[d] - 1) for d, c in problem.fixed_choices.items()}
    for d in dims:
        if d.name not in fixed_choices and rng.random() < fixed:
            fixed_choices[d.name] = int(rng.integers(len(d.widths)))
    return Problem(
        dims,
        problem.blocks,
        obj,
        lat,
        problem.budget_ms,
        fixed_choices,
        fixed_blocks,
        {**problem.metadata, "variant": "monotone_step"},
    ).validate()
