"""benchmarks/gpu_check.py in tiny CPU mode: the script the GPU run uses, exercised end to end.

Structure and correctness only (every phase ran, every budget solved to optimality, every sliced model
gives logits of the right shape, predictions are within budget); no timing assertions. The run happens
with pyomo / highspy / datasets / evaluate made unimportable, as on the GPU machine, which has none of them.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ABSENT_ON_GPU_MACHINE = ("pyomo", "highspy", "datasets", "evaluate")

RUNNER = f"""
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT_ON_GPU_MACHINE!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machine")
sys.meta_path.insert(0, Block())
sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""


def _run(args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", RUNNER, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run([str(out), "--device", "cpu", "--tiny"])
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return out, proc, json.loads((out / "gpu_check.json").read_text())


def test_tiny_run_writes_report(tiny_run):
    out, proc, report = tiny_run
    assert report["schema"] == "mdp_hf.gpu_check/1"
    assert report["finished"] and report["tiny"] and report["device"] == "cpu"
    assert report["batch_sizes"] == [2, 8]
    env = report["environment"]
    for key in ("torch", "transformers", "python", "cpu"):
        assert env[key]
    assert report["date"] and report["elapsed_s"] > 0
    assert set(report["importance"]) == {"deit-tiny", "resnet-tiny"}
    assert all(v["status"] == "ok" for v in report["importance"].values())
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# MDP GPU check — CPU tiny mode")
    assert "| model | batch | budget | latency model |" in md
    assert md.count("| deit-tiny |") == 12 and md.count("| resnet-tiny |") == 12
    assert "| model | batch | budget" in proc.stdout  # the table is printed too


def test_tiny_run_every_phase_solved_sliced_and_measured(tiny_run):
    out, _, report = tiny_run
    phases = report["phases"]
    assert [(p["model"], p["batch_size"]) for p in phases] == [
        ("deit-tiny", 2),
        ("resnet-tiny", 2),
        ("deit-tiny", 8),
        ("resnet-tiny", 8),
    ]
    for phase in phases:
        # "partial" only when a 30% budget is below what the tiny model can reach on this (noisy) host: then the
        # solver must have proved it (checked below)
        assert phase["status"] in ("ok", "partial"), phase
        table = phase["table"]
        assert (out / table["path"]).is_file()
        assert table["cells_measured"] == table["cells_planned"] < table["cells_full_grid"]  # a sub-grid
        assert table["interpolation"]["cells"] > 0  # off-grid validation cells were timed
        assert table["dense_reference_ms"] > 0 and phase["dense_measured_ms"] > 0 and phase["hf_dense_measured_ms"] > 0
        assert set(phase["timings_s"]) == {"probe", "table", "solve", "slice", "measure"}
        rows = phase["results"]
        assert sorted((r["latency_model"], r["budget_fraction"]) for r in rows) == sorted(
            (m, f) for m in ("table", "linear") for f in (0.7, 0.5, 0.3)
        )
        for r in rows:
            if r["status"] == "infeasible" and r["budget_fraction"] == 0.3:
                assert r["min_latency_ms"] > r["budget_ms"], r
                continue
            assert r["status"] == "ok", r
            assert r["solver_status"] == "optimal" and r["within_budget_predicted"]
            assert r["predicted_ms"] <= r["budget_ms"] * (1 + 1e-9)
            assert r["model_predict_ms"] == pytest.approx(r["predicted_ms"], rel=1e-6)
            assert r["output_shape_ok"] and r["output_finite"]
            assert r["measured_ms"] > 0 and r["speedup"] > 0
            assert r["error_pct"] == pytest.approx(100 * (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"])
            if r["latency_model"] == "table":
                assert r["table_model_predicted_ms"] == pytest.approx(r["predicted_ms"], rel=1e-6)


def test_tiny_run_solves_without_the_gpu_machines_missing_packages(tiny_run):
    """The run above had pyomo / highspy / datasets / evaluate blocked, as on the GPU machine: it recorded the
    solver packages as absent and solved every budget with the pure-numpy chain DP (the MILP needs them)."""
    _, _, report = tiny_run
    assert report["environment"]["optional_packages_present"] == {"pyomo": False, "highspy": False}
    solved = [r for p in report["phases"] for r in p["results"] if r["status"] == "ok"]
    assert solved and {r["solver_backend"] for r in solved} == {"chain_dp"}


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (in this process)."""
    spec = importlib.util.spec_from_file_location("gpu_check_module", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_out_of_time_skips_phases_and_still_reports(gpu_check, tmp_path):
    import torch

    threads = torch.get_num_threads()
    # the budget counts from the module's import, so 0 s is already spent: every phase must be skipped
    rc = gpu_check.main(
        [str(tmp_path), "--device", "cpu", "--tiny", "--models", "deit", "--batch-sizes", "2", "--time-budget-s", "0"]
    )
    assert rc == 0
    assert torch.get_num_threads() == threads  # the thread count is restored
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["finished"]
    [phase] = report["phases"]
    assert phase["status"] == "skipped" and "time" in phase["reason"]
    assert "skipped for time" in (tmp_path / "gpu_check.md").read_text()
    assert (tmp_path / "gpu_check.log").read_text().count("skipped") >= 1


def test_wallclock_fallback_and_cell_counts(gpu_check):
    calls = [lambda: sum(range(100)), lambda: sum(range(1000))]
    timed = gpu_check.wallclock_time_interleaved(calls, "cpu", warmup=1, repeats=4)
    assert len(timed) == 2 and all(len(m.samples_ms) == 4 and m.ms > 0 for m in timed)

    import mdp_hf
    from mdp_hf.latency import TimingSettings
    from mdp_hf.latency.profiler import _planned, family_cells, subgrid_indices

    tiny = gpu_check.model_specs(True)["deit"]
    model = tiny.build()
    space = mdp_hf.build_space(model, group_sizes=tiny.groups)
    tables, _ = _planned(family_cells(model, space, TimingSettings()))
    full = gpu_check.subgrid_sizes(tables, None)
    assert sum(full.values()) == sum(int(np.prod(t.shape)) for t in tables)
    strides = {"embed": 3, "heads": 3, "qk": 3, "v": 3, "mlp": 3}
    core = next(t for t in tables if t.kind == "vit.attn_core")
    heads, qk, v = core.shape
    kept = gpu_check.subgrid_sizes(tables, strides)[core.key]
    assert kept == len(subgrid_indices(heads, 3)) * qk * v  # the library measures the full QK x V grid
    assert gpu_check.subgrid_sizes(tables, strides, core_full=False)[core.key] < kept


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the run on a machine without CUDA")
def test_cuda_run_without_cuda_measures_nothing_and_says_why(gpu_check, tmp_path):
    """`--device cuda` (what gpu_check.sh runs) where torch has no CUDA: exit code 2 before any model is built,
    and a report whose notes say why nothing was measured."""
    import torch

    threads = torch.get_num_threads()
    assert gpu_check.main([str(tmp_path), "--device", "cuda", "--models", "deit", "--batch-sizes", "2"]) == 2
    assert torch.get_num_threads() == threads
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["phases"] == [] and report["importance"] == {} and not report["finished"]
    assert any("CUDA is not available" in note and "nothing was measured" in note for note in report["notes"])
    assert "CUDA is not available" in (tmp_path / "gpu_check.md").read_text()
