"""Smoke test of benchmarks/pareto.py: tiny models, 512 images, every stage, resumable results file."""

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
    methods = ["mdp", "uniform", "halp"]
    argv = ["--smoke", "--stage", "all", "--out", str(tmp_path), "--family", "deit", "--methods", *methods]
    bench.main(argv)
    results = json.load(open(tmp_path / "deit" / "results.json"))
    assert "dense" in results and "measurement" in results
    for budget in bench.BUDGETS:
        for method in methods:
            entry = results[f"{method}@{budget}"]
            assert entry["status"] in ("ok", "failed")  # an infeasible budget is recorded, not hidden
            if entry["status"] == "ok":
                assert 0 <= entry["accuracy"] <= 1 and entry["measured_ms"] > 0
    assert any(results[f"mdp@{b}"]["status"] == "ok" for b in bench.BUDGETS)
    # resumable: a second run finds everything done and changes nothing
    before = (tmp_path / "deit" / "results.json").read_text()
    bench.main(["--smoke", "--stage", "run", "--out", str(tmp_path), "--family", "deit", "--methods", *methods])
    assert (tmp_path / "deit" / "results.json").read_text() == before
