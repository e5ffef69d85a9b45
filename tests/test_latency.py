"""Latency stage: table structure, file format, resume, mismatch errors, interpolation, latency models.

Table logic is tested with deterministic timers (real timing only in one order-of-magnitude comparison of a
dense and a heavily sliced model): the "FLOPs timer"
reports the FLOPs of the very module a cell would time, so the table model must reproduce the FLOPs of
the sliced model exactly (both are counted with torch's FlopCounterMode on the deployed modules).
"""

import json
import random
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, VARIANTS, build
from torch.utils.flop_counter import FlopCounterMode

from mdp_hf import PruningChoice, build_space, gate_model, slice_model
from mdp_hf.latency import (
    FlopsLatencyModel,
    IncompleteTableError,
    LatencyTable,
    LatencyTableError,
    LatencyTableMismatchError,
    LinearLatencyModel,
    Structure,
    TableLatencyModel,
    TimingSettings,
    build_table,
    measure_latency,
    pull_table,
    push_table,
    run_metadata,
)
from mdp_hf.latency.profiler import family_cells, subgrid_indices
from mdp_hf.latency.table import interpolate_grid

FAST = dict(repeats=1, warmup=0, progress=False, image_size=IMAGE_SIZE)


def flops_timer(model, space, settings=None):
    """A deterministic 'timer': ms := MFLOPs of the module the cell builds (exactly additive over the model)."""
    blocks = family_cells(model, space, settings or TimingSettings(image_size=IMAGE_SIZE))

    def timer(table, widths):
        module, x = blocks.build_cell(table, widths)
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            module(*(x if isinstance(x, tuple) else (x,)))
        return counter.get_total_flops() / 1e6

    return timer


def sliced_mflops(model):
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    # no_grad, not inference_mode: FlopCounterMode's module tracker cannot hook a module called with a parameter
    # as its input under inference_mode (transformers' YOLOS passes its position embeddings to a submodule)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e6


def random_choice(space, rng, remove=0.3):
    kept = {n: sorted(rng.sample(range(d.size), rng.choice(d.widths()))) for n, d in space.dimensions.items()}
    removed = [b for b in space.blocks if rng.random() < remove]
    return PruningChoice(kept, removed)


@pytest.fixture(scope="module")
def vit_table():
    model = build("vit")
    space = build_space(model, group_sizes=GROUPS)
    table = build_table(model, space=space, timer=flops_timer(model, space), **FAST)
    return model, space, table


@pytest.fixture(scope="module")
def resnet_table():
    model = build("resnet_bottleneck")
    space = build_space(model, group_sizes=GROUPS)
    table = build_table(model, space=space, timer=flops_timer(model, space), **FAST)
    return model, space, table


# ------------------------------------------------------------------------------------------ structure
def test_vit_terms_and_shared_tables(vit_table):
    model, space, table = vit_table
    # three identical layers share one grid per kind: qk, vo, core, mlp, out
    assert sorted(t.kind for t in table.tables.values()) == [
        "vit.attn_core",
        "vit.attn_qk",
        "vit.attn_vo",
        "vit.mlp",
        "vit.out",
    ]
    terms = {t.name: t for t in TableLatencyModel(table).solver_terms(space)}
    for i in range(3):
        qk, vo, core, mlp = (
            terms[f"layers.{i}.attention.qk"],
            terms[f"layers.{i}.attention.vo"],
            terms[f"layers.{i}.attention.qk_x_v"],
            terms[f"layers.{i}.mlp"],
        )
        assert qk.dims == [f"layers.{i}.heads", "embed", f"layers.{i}.qk_dim"] and qk.block == f"layers.{i}.attention"
        assert vo.dims == [f"layers.{i}.heads", "embed", f"layers.{i}.v_dim"] and vo.block == f"layers.{i}.attention"
        assert core.dims == [f"layers.{i}.heads", f"layers.{i}.qk_dim", f"layers.{i}.v_dim"]
        assert mlp.dims == ["embed", f"layers.{i}.mlp_dim"] and mlp.block == f"layers.{i}.mlp"
    out = [t for t in terms.values() if t.block is None]
    assert len(out) == 1 and out[0].dims == ["embed"]
    for t in terms.values():  # indexed by choice index of each dimension's widths()
        assert t.table.shape == tuple(len(space.dimensions[d].widths()) for d in t.dims)
        assert isinstance(t.table, np.ndarray) and t.table.dtype == np.float64


def test_resnet_terms(resnet_table):
    model, space, table = resnet_table
    terms = {t.name: t for t in TableLatencyModel(table).solver_terms(space)}
    assert terms["stem"].dims == ["stem"] and terms["stem"].block is None
    assert terms["stages.0.layers.0.conv1"].dims == ["stages.0.layers.0.conv1", "stem"]
    assert terms["stages.0.layers.0.conv2"].dims == ["stages.0.layers.0.conv2", "stages.0.layers.0.conv1"]
    assert terms["stages.0.layers.0.conv3"].dims == ["stages.0.residual", "stages.0.layers.0.conv2"]
    assert terms["stages.0.layers.1.conv1"].dims == ["stages.0.layers.1.conv1", "stages.0.residual"]
    assert terms["stages.1.layers.0.conv1"].dims == ["stages.1.layers.0.conv1", "stages.0.residual"]
    assert terms["stages.0.layers.0.shortcut"].dims == ["stages.0.residual", "stem"]
    assert terms["stages.0.layers.0.shortcut"].block is None
    assert terms["stages.0.layers.0.conv2"].block == "stages.0.layers.0"
    assert terms["pool+classifier"].dims == ["stages.2.residual"]
    # every conv of every kept layer is a term
    assert sum(1 for n in terms if ".conv" in n) == 3 * len(space.blocks)


def test_basic_resnet_stage_coupled_to_stem():
    model = build("resnet_basic")
    space = build_space(model, group_sizes=GROUPS)
    table = build_table(model, space=space, timer=flops_timer(model, space), **FAST)
    terms = {t.name: t for t in table.terms}
    assert terms["stages.0.layers.0.conv2"].dims == ["stem", "stages.0.layers.0.conv1"]  # identity shortcut couples
    rng = random.Random(3)
    lm = TableLatencyModel(table)
    for _ in range(3):
        choice = random_choice(space, rng)
        assert lm.predict(slice_model(model, space, choice)) == pytest.approx(
            sliced_mflops(slice_model(model, space, choice)), rel=1e-9
        )


# -------------------------------------------------------------------- exactness with a synthetic timer
@pytest.mark.parametrize("family", [v for _, v in VARIANTS])
@pytest.mark.parametrize("subgrid", [None, 2])
def test_table_model_exact_for_synthetic_measurement(family, subgrid):
    """Timer = FLOPs of each cell's module: table sums reproduce the sliced model's FLOPs exactly, on the full
    grid and on a sub-grid (FLOPs are multilinear in the widths, so interpolation is exact too)."""
    model = build(family)
    space = build_space(model, group_sizes=GROUPS)
    table = build_table(model, space=space, timer=flops_timer(model, space), subgrid=subgrid, **FAST)
    if subgrid:
        assert table.num_measured < sum(int(np.prod(t.shape)) for t in table.tables.values())
    lm = TableLatencyModel(table)
    assert lm.calibration == "none"  # no reference measurement with a synthetic timer
    rng = random.Random(0)
    for _ in range(4):
        choice = random_choice(space, rng)
        pruned = slice_model(model, space, choice)
        truth = sliced_mflops(pruned)
        assert lm.predict((space, choice)) == pytest.approx(truth, rel=1e-9)
        assert lm.predict(pruned) == pytest.approx(truth, rel=1e-9)
        assert lm.predict(pruned.config) == pytest.approx(truth, rel=1e-9)
    assert lm.predict(model) == pytest.approx(sliced_mflops(model), rel=1e-9)
    if hasattr(model, "config"):  # a transformers model's dense config, built on the meta device
        assert lm.predict(model.config) == pytest.approx(sliced_mflops(model), rel=1e-9)


def test_solver_terms_sum_equals_predict(vit_table, resnet_table):
    for model, space, table in (vit_table, resnet_table):
        lm = TableLatencyModel(table)
        terms = lm.solver_terms(space)
        rng = random.Random(1)
        for _ in range(5):
            choice = random_choice(space, rng)
            index = {
                n: space.dimensions[n].widths().index(len(choice.kept_indices(space, n))) for n in space.dimensions
            }
            removed = set(choice.removed_blocks)
            total = sum(float(t.table[tuple(index[d] for d in t.dims)]) for t in terms if t.block not in removed)
            assert total == pytest.approx(lm.predict((space, choice)), rel=1e-12)


def test_solver_terms_convert_to_solver_latency_terms(vit_table):
    from mdp_hf.solver.problem import LatencyTerm  # a broken import fails here, it is never skipped

    _, space, table = vit_table
    for spec in TableLatencyModel(table).solver_terms(space):
        term = LatencyTerm(**asdict(spec))
        assert term.table.shape == spec.table.shape


def test_breakdown_skips_removed_blocks(vit_table):
    _, space, table = vit_table
    lm = TableLatencyModel(table)
    choice = PruningChoice(removed_blocks=["layers.1.attention", "layers.2.mlp"])
    names = [n for n, _ in lm.breakdown((space, choice))]
    assert "layers.1.attention.qk" not in names and "layers.1.attention.qk_x_v" not in names
    assert "layers.2.mlp" not in names and "layers.1.mlp" in names
    full = lm.predict((space, space.full_choice()))
    assert lm.predict((space, choice)) < full
    assert lm.dense_ms() == pytest.approx(full)


# ------------------------------------------------------------------------- interpolation / sub-grid
def test_subgrid_indices_include_ends():
    assert subgrid_indices(10, 4) == [0, 4, 8, 9]
    assert subgrid_indices(9, 4) == [0, 4, 8]
    assert subgrid_indices(1, 3) == [0]


def test_interpolation_multilinear_exact_and_marks_measured():
    model = build("vit")
    space = build_space(model, group_sizes=GROUPS)

    def timer(table, widths):  # multilinear in the widths
        return 1.0 + float(np.prod(widths)) * 1e-3 + 0.5 * sum(widths)

    table = build_table(model, space=space, timer=timer, subgrid=3, **FAST)
    for t in table.tables.values():
        filled = t.filled()
        for cell in np.ndindex(*t.shape):
            assert filled[cell] == pytest.approx(timer(t, t.widths_at(cell)), rel=1e-9)
        assert t.measured.sum() == np.prod([len(s) for s in t.subgrid])
        if t.kind == "vit.attn_core":  # q/v axes are never sub-sampled (the SDPA diagonal)
            assert t.subgrid[1] == list(range(t.shape[1])) and t.subgrid[2] == list(range(t.shape[2]))
    # off-grid widths (not a multiple of the group) are interpolated within a term
    lm = TableLatencyModel(table, calibration="none")
    widths = {n: d.size for n, d in space.dimensions.items()}
    widths["layers.0.mlp_dim"] = 61  # between 56 and 64
    s = Structure(widths)
    mlp = dict(lm.breakdown(s))["layers.0.mlp"]
    grid = next(t for t in table.tables.values() if t.kind == "vit.mlp")
    assert mlp == pytest.approx(timer(grid, (32, 61)), rel=1e-9)
    widths["layers.0.mlp_dim"] = 65
    with pytest.raises(LatencyTableError, match="outside the table's range"):
        lm.predict(Structure(widths))


def test_interpolate_grid_matches_numpy():
    axes = [[1, 3, 5], [2, 4]]
    values = np.array([[1.0, 2.0], [3.0, 5.0], [4.0, 4.0]])
    out = interpolate_grid(axes, values, [[2], [3]])
    assert out.shape == (1, 1) and out[0, 0] == pytest.approx((1 + 2 + 3 + 5) / 4)


def test_incomplete_table_is_an_error(tmp_path, vit_table):
    _, space, table = vit_table
    data = table.to_dict()
    key = next(iter(data["tables"]))
    data["tables"][key]["values_ms"] = _knock_out(data["tables"][key]["values_ms"])
    broken = LatencyTable.from_dict(data)
    assert not broken.complete
    with pytest.raises(IncompleteTableError, match="resume the build"):
        TableLatencyModel(broken).predict((space, space.full_choice()))


def _knock_out(nested):
    array = np.array(nested, dtype=float)
    array.reshape(-1)[0] = np.nan
    return np.where(np.isnan(array), None, array).tolist()


# ----------------------------------------------------------------------------------------- file format
def test_save_load_roundtrip(tmp_path, vit_table):
    _, space, table = vit_table
    path = table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(path)
    assert loaded.metadata == json.loads(json.dumps(table.metadata))
    for key, t in table.tables.items():
        assert np.allclose(loaded.tables[key].values, t.values, rtol=1e-6, atol=1e-6)
        assert np.array_equal(loaded.tables[key].measured, t.measured)
        assert loaded.tables[key].subgrid == t.subgrid
    a, b = TableLatencyModel(table), TableLatencyModel(loaded)
    choice = random_choice(space, random.Random(5))
    assert a.predict((space, choice)) == pytest.approx(b.predict((space, choice)), rel=1e-6)
    raw = json.loads(path.read_text())
    assert raw["format"] == "mdp_hf.latency_table" and raw["format_version"] == 1
    for field in (
        "device",
        "device_name",
        "batch_size",
        "image_size",
        "dtype",
        "threads",
        "attn_implementation",
        "torch_version",
        "transformers_version",
        "model_shapes",
        "space_fingerprint",
        "group_sizes",
        "date",
    ):
        assert field in raw["metadata"], field


def test_bad_files(tmp_path, vit_table):
    _, _, table = vit_table
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LatencyTableError, match="damaged"):
        LatencyTable.load(tmp_path / "bad.json")
    data = table.to_dict()
    data["format_version"] = 99
    (tmp_path / "new.json").write_text(json.dumps(data))
    with pytest.raises(LatencyTableError, match="newer"):
        LatencyTable.load(tmp_path / "new.json")
    data = table.to_dict()
    data["format"] = "something else"
    with pytest.raises(LatencyTableError, match="not an mdp_hf latency table"):
        LatencyTable.from_dict(data)


# ------------------------------------------------------------------------------------- mismatch errors
def test_metadata_mismatch_names_fields(tmp_path, vit_table):
    model, space, table = vit_table
    path = table.save(tmp_path / "t.json")
    run = run_metadata(model, space, TimingSettings(batch_size=8, dtype="bfloat16"))
    with pytest.raises(LatencyTableMismatchError) as info:
        LatencyTable.load(path, expect=run)
    assert set(info.value.differences) == {"batch_size", "dtype"}
    assert "batch_size: table 1 vs run 8" in str(info.value) and "allow_mismatch" in str(info.value)
    with pytest.warns(UserWarning, match="does not match"):
        LatencyTable.load(path, expect=run, allow_mismatch=True)
    # same settings: no error
    LatencyTable.load(path, expect=run_metadata(model, space, TimingSettings()))


def test_space_mismatch(vit_table):
    model, space, table = vit_table
    other = build_space(model, group_sizes={**GROUPS, "mlp": 16})
    with pytest.raises(LatencyTableMismatchError, match="mlp_dim.group_size table 8 vs run 16"):
        TableLatencyModel(table, space=other)
    with pytest.warns(UserWarning):
        lm = TableLatencyModel(table, space=other, allow_mismatch=True)
    terms = {t.name: t for t in lm.solver_terms(other)}  # resampled onto the other space's widths
    assert terms["layers.0.mlp"].table.shape == (
        len(other.dimensions["embed"].widths()),
        len(other.dimensions["layers.0.mlp_dim"].widths()),
    )


# ----------------------------------------------------------------------------------------------- resume
def test_interrupted_build_resumes(tmp_path):
    model = build("vit")
    space = build_space(model, group_sizes=GROUPS)
    base = flops_timer(model, space)
    calls = {"n": 0}

    def flaky(table, widths):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return base(table, widths)

    path = tmp_path / "table.json"
    with pytest.raises(KeyboardInterrupt):
        build_table(model, path, space=space, timer=flaky, chunk_size=16, subgrid=2, **FAST)
    partial = LatencyTable.load(path)
    done = partial.num_measured
    assert 0 < done < partial.num_cells and not partial.complete
    calls["n"] = -(10**9)  # never interrupt again
    table = build_table(model, path, space=space, timer=flaky, chunk_size=16, subgrid=2, **FAST)
    assert table.complete
    assert calls["n"] + 10**9 == table.num_cells - done  # only the missing cells were measured
    fresh = build_table(model, space=space, timer=base, subgrid=2, **FAST)
    for key, t in fresh.tables.items():
        assert np.allclose(np.nan_to_num(t.values), np.nan_to_num(table.tables[key].values))
    # resuming with other settings is refused
    with pytest.raises(LatencyTableMismatchError, match="batch_size"):
        build_table(model, path, space=space, timer=base, batch_size=2, **FAST)


# ------------------------------------------------------------------------------------------- models
def test_linear_model_is_first_order(vit_table):
    _, space, table = vit_table
    table_model, linear = TableLatencyModel(table), LinearLatencyModel(table)
    assert linear.dense_ms() == pytest.approx(table_model.dense_ms())
    # one output dimension pruned alone: its marginal curve (input widths frozen) is exact there
    for dim in ("layers.0.mlp_dim", "layers.1.heads"):
        smallest = space.dimensions[dim].widths()[0]
        choice = PruningChoice({dim: list(range(smallest))})
        assert linear.predict((space, choice)) == pytest.approx(table_model.predict((space, choice)), rel=1e-9)
    # the embedding is the q/k projections' input: HALP charges them nothing for it (frozen input width)
    smallest = PruningChoice({"embed": list(range(space.dimensions["embed"].widths()[0]))})
    assert linear.predict((space, smallest)) > table_model.predict((space, smallest)) * (1 + 1e-6)
    # re-linearised at a pruned point: exact there, and exact for one output dimension moved from it
    point = PruningChoice({"embed": list(range(8)), "layers.0.mlp_dim": list(range(16))})
    around = {n: d.widths().index(len(point.kept_indices(space, n))) for n, d in space.dimensions.items()}
    terms = linear.solver_terms(space, around=around)
    from mdp_hf.latency.models import dense_latency_ms

    def summed(choice_indices):
        return sum(
            float(t.table[tuple(choice_indices[d] for d in t.dims)]) if t.dims else float(t.table) for t in terms
        )

    assert summed(around) == pytest.approx(table_model.predict((space, point)), rel=1e-9)
    moved = {**around, "layers.0.mlp_dim": 0}
    moved_choice = PruningChoice(
        {"embed": list(range(8)), "layers.0.mlp_dim": list(range(space.dimensions["layers.0.mlp_dim"].widths()[0]))}
    )
    assert summed(moved) == pytest.approx(table_model.predict((space, moved_choice)), rel=1e-9)
    assert dense_latency_ms(linear.solver_terms(space)) == pytest.approx(table_model.dense_ms())
    # two interacting dims pruned together: the linear model misses the product
    choice = PruningChoice({"embed": list(range(8)), "layers.0.mlp_dim": list(range(8))})
    assert linear.predict((space, choice)) != pytest.approx(table_model.predict((space, choice)), rel=1e-3)
    # removed blocks save their dense cost
    only = PruningChoice(removed_blocks=["layers.0.mlp"])
    assert linear.predict((space, only)) == pytest.approx(table_model.predict((space, only)), rel=1e-9)
    terms = linear.solver_terms(space)
    assert all(len(t.dims) <= 1 for t in terms)


def test_flops_proxy(vit_table):
    model, space, table = vit_table
    proxy = FlopsLatencyModel(table, dense_ms=10.0)
    assert proxy.dense_ms() == pytest.approx(10.0)
    choice = random_choice(space, random.Random(2))
    expected = 10.0 * sliced_mflops(slice_model(model, space, choice)) / sliced_mflops(model)
    assert proxy.predict((space, choice)) == pytest.approx(expected, rel=1e-9)
    params = FlopsLatencyModel(table, metric="params", dense_ms=1.0)
    assert 0 < params.predict((space, choice)) < 1.0


def test_calibration_modes(vit_table):
    _, space, table = vit_table
    raw = TableLatencyModel(table).dense_ms()
    ref = LatencyTable.from_dict({**table.to_dict(), "reference": {"dense_measured_ms": 2 * raw}})
    scaled, offset = TableLatencyModel(ref, calibration="scale"), TableLatencyModel(ref, calibration="offset")
    assert scaled.dense_ms() == pytest.approx(2 * raw) and offset.dense_ms() == pytest.approx(2 * raw)
    assert scaled.calibration_factor == pytest.approx(2.0)
    choice = random_choice(space, random.Random(4))
    base = TableLatencyModel(table).predict((space, choice))
    assert scaled.predict((space, choice)) == pytest.approx(2 * base)
    assert offset.predict((space, choice)) == pytest.approx(base + raw)


def test_structure_errors(vit_table):
    _, _, table = vit_table
    with pytest.raises(TypeError, match="structure must be"):
        TableLatencyModel(table).predict(42)


# ----------------------------------------------------------------------------------------------- hub
def test_push_pull_local_directory(tmp_path, vit_table):
    _, space, table = vit_table
    repo = tmp_path / "repo"
    repo.mkdir()
    where = push_table(table, str(repo))
    assert (repo / "latency_table.json").exists() and where.endswith("latency_table.json")
    pulled = pull_table(str(repo))
    assert pulled.to_dict() == LatencyTable.load(repo / "latency_table.json").to_dict()
    with pytest.raises(FileNotFoundError):
        pull_table(str(repo), filename="other.json")


# ---------------------------------------------------------------------------------- real timing (smoke)
class ThreadProbe(torch.nn.Module):
    """Runs ``model`` and records torch's intra-op thread count during each forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.threads_seen = model, set()

    def forward(self, x):
        self.threads_seen.add(torch.get_num_threads())
        return self.model(x)


class FailingForward(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("forward failed")


def test_measure_latency_dense_gated_sliced():
    """Dense, gated and heavily sliced (every width at its minimum, 5 of 6 sub-blocks removed) timed interleaved:
    the sliced model is clearly the fastest, the gated one (dense compute + masks) not faster than the dense one.
    One order-of-magnitude comparison, no tight timing: a 1.5x margin where several times is expected. The thread
    count is the one asked for while timing and exactly the caller's afterwards, also after a failing forward."""
    import copy

    from mdp_hf.latency import measure_latencies

    model = build("vit")
    space = build_space(model, group_sizes=GROUPS)
    blocks = sorted(space.blocks)
    smallest = PruningChoice({n: list(range(d.widths()[0])) for n, d in space.dimensions.items()}, blocks[1:])
    sliced = slice_model(model, space, smallest)
    assert sliced_mflops(sliced) < sliced_mflops(model) / 5  # the premise: a fraction of the dense work
    gated = copy.deepcopy(model)
    probe = ThreadProbe(sliced)
    callers = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with gate_model(gated, space, smallest):
            # the fastest of 15 rounds: what another process's load does not inflate
            timed = measure_latencies([model, gated, sliced, probe], repeats=15, warmup=2, statistic="min")
        dense_m, gated_m, sliced_m, _ = timed
        for m in (dense_m, gated_m, sliced_m):
            assert len(m.samples_ms) == 15 and 0 < m.ms == m.min_ms <= m.median_ms
        assert sliced_m.ms * 1.5 < dense_m.ms, (sliced_m.ms, dense_m.ms)
        assert sliced_m.ms * 1.5 < gated_m.ms, (sliced_m.ms, gated_m.ms)
        assert gated_m.ms * 1.5 > dense_m.ms, (gated_m.ms, dense_m.ms)
        assert probe.threads_seen == {1}  # TimingSettings.threads, default 1
        assert torch.get_num_threads() == 3  # the caller's count, exactly
        with pytest.raises(RuntimeError, match="forward failed"):
            measure_latency(FailingForward(), inputs=torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), threads=2)
        assert torch.get_num_threads() == 3
        measure_latency(probe, inputs=torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), threads=None, repeats=1)
        assert probe.threads_seen == {1, 3}  # threads=None leaves the caller's count
    finally:
        torch.set_num_threads(callers)


@pytest.mark.filterwarnings("ignore:the dense reference timing is noisy")
def test_real_timing_build_smoke(tmp_path):
    model = build("resnet_basic")
    table = build_table(
        model,
        tmp_path / "t.json",
        group_sizes={"channels": 2, "residual": 2},
        repeats=2,
        warmup=1,
        progress=False,
        validate=1,
        subgrid=2,
        image_size=IMAGE_SIZE,
    )
    assert table.complete and table.reference["dense_measured_ms"] > 0
    assert len(table.validation) > 0
    lm = TableLatencyModel(LatencyTable.load(tmp_path / "t.json"), calibration="scale")
    assert lm.calibration == "scale" and lm.dense_ms() == pytest.approx(table.reference["dense_measured_ms"])


# ------------------------------------------------------------------------------------------------- cli
def test_cli_build_show_predict_push_pull(tmp_path, capsys):
    import argparse

    from mdp_hf.hub import save_pruned_model
    from mdp_hf.latency import cli

    def run(*argv):
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        return cli.run(parser.parse_args(list(argv)))

    out = tmp_path / "tiny.json"
    assert (
        run(
            "build",
            "tiny-vit",
            "-o",
            str(out),
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--subgrid",
            "embed=2,mlp=2",
            "--group-sizes",
            "embed=8,heads=1,qk=4,v=4,mlp=16",
            "--no-progress",
            "--no-calibrate",
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert run("show", str(out)) == 0
    assert "grids" in capsys.readouterr().out
    # a saved pruned model predicted from its config
    model = cli.load_model("tiny-vit")
    space = build_space(model, group_sizes={"embed": 8, "heads": 1, "qk": 4, "v": 4, "mlp": 16})
    pruned = slice_model(
        model,
        space,
        PruningChoice({"embed": list(range(16)), "layers.0.mlp_dim": list(range(32))}, ["layers.2.attention"]),
    )
    save_pruned_model(pruned, tmp_path / "pruned")
    assert run("predict", str(out), str(tmp_path / "pruned"), "--breakdown") == 0
    text = capsys.readouterr().out
    assert "ms predicted" in text and "layers.2.attention" not in text
    repo = tmp_path / "hub"
    repo.mkdir()
    assert run("push", str(out), str(repo)) == 0
    assert run("pull", str(repo), "-o", str(tmp_path / "back.json")) == 0
    assert LatencyTable.load(tmp_path / "back.json").to_dict() == LatencyTable.load(out).to_dict()
    assert run("measure", "tiny-resnet", "--repeats", "2", "--warmup", "0") == 0
    assert "ms (median" in capsys.readouterr().out
