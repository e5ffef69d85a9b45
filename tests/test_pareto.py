"""Smoke test of benchmarks/pareto.py (evidence v2): tiny models, 512 images, every stage, resumable results files."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("pareto_bench", os.path.join(ROOT, "benchmarks", "pareto.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["pareto_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_pareto_smoke(tmp_path):
    from mdp_hf.data import FASHION_MNIST_DIR

    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    bench = _load_benchmark()
    methods = ["mdp", "halp", "uniform", "small_dense"]
    common = ["--smoke", "--out", str(tmp_path), "--family", "deit", "--docs", str(tmp_path), "--methods", *methods]
    bench.main(["--stage", "all", *common])
    shared = json.load(open(tmp_path / "shared" / "deit" / "results.json"))
    assert {"dense", "table", "small_grid", "measurement"} <= set(shared)
    assert len(shared["dense"]["validation_curve"]) == shared["dense"]["epochs"]
    results_path = tmp_path / "s0_n5" / "deit" / "results.json"
    results = json.load(open(results_path))
    # the smoke's table costs what the widths cost (benchmarks/pareto.py smoke_timer): the MDP family is pruned
    # on it, fine-tuned, evaluated, saved and timed at every budget, whatever the machine's load
    for budget in bench.BUDGETS:
        for method in ("mdp", "halp"):
            entry = results[f"{method}@{budget}"]
            assert entry["status"] == "ok", (method, budget, entry.get("error"))
            assert entry["predicted_ms"] <= entry["budget_ms"] * (1 + 1e-9), (method, budget)
            assert entry["params"] < shared["dense"]["params"], (method, budget)
            assert entry["train_steps"] == 5 and 0 <= entry["accuracy"] <= 1 and entry["finetune_s"] > 0
            assert (
                entry["measured_ms"] > 0 and (tmp_path / "s0_n5" / "deit" / entry["folder"] / "config.json").is_file()
            )
        # uniform and small_dense are placed by *measured* latency: a smoke-sized model's timing is noise, so
        # either outcome is possible, but each is recorded (a model trained for the same steps, or the error)
        for method in ("uniform", "small_dense"):
            entry = results[f"{method}@{budget}"]
            assert entry["status"] in ("ok", "failed"), entry
            assert entry["status"] == "ok" or "no " in entry["error"], entry
    report = (tmp_path / "report.md").read_text()
    assert "MDP minus the best alternative" in report and "| 50% | mdp |" in report
    # resumable: a second run finds everything done and changes nothing
    before = results_path.read_text()
    bench.main(["--stage", "run", *common])
    assert results_path.read_text() == before


@pytest.mark.parametrize("smaller_is_higher", [False, True])
def test_measured_bisection_returns_the_least_pruning_within_budget(smaller_is_higher):
    """uniform (kept fraction: more is slower) and Torch-Pruning (ratio: more is faster) bisect on measured
    latency; with a latency that is exactly the setting (or its complement), the result sits just inside 0.3."""
    bench = _load_benchmark()
    latency = (lambda x: 1 - x) if smaller_is_higher else (lambda x: x)
    model, info = bench.bisect_measured(
        lambda x: x, latency, 0.3, "test", lambda msg: None, steps=12, smaller_is_higher=smaller_is_higher
    )
    assert info["search_measured_fraction"] <= 0.3
    assert 0.3 - info["search_measured_fraction"] < 1e-3  # the least pruning that fits, not any that fits
    assert model == info["setting"]
    with pytest.raises(ValueError, match="no setting reached"):
        bench.bisect_measured(lambda x: x, lambda x: 2.0, 0.3, "test", lambda msg: None)
