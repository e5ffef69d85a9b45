"""Smoke test of benchmarks/pareto.py: tiny models, 512 images, every stage and method, resumable results file."""

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
    # the smoke's table costs what the widths cost (benchmarks/pareto.py smoke_timer): every method is pruned,
    # fine-tuned, evaluated, saved and timed at every budget, whatever the machine's load
    for budget in bench.BUDGETS:
        for method in methods:
            entry = results[f"{method}@{budget}"]
            assert entry["status"] == "ok", (method, budget, entry.get("error"))
            assert entry["predicted_ms"] <= entry["budget_ms"] * (1 + 1e-9), (method, budget)
            assert entry["params"] < results["dense"]["params"], (method, budget)
            assert 0 <= entry["accuracy_before_ft"] <= 1 and 0 <= entry["accuracy"] <= 1 and entry["finetune_s"] > 0
            assert entry["measured_ms"] > 0 and (tmp_path / "deit" / entry["folder"] / "config.json").is_file()
    # resumable: a second run finds everything done and changes nothing
    before = (tmp_path / "deit" / "results.json").read_text()
    bench.main(["--smoke", "--stage", "run", "--out", str(tmp_path), "--family", "deit", "--methods", *methods])
    assert (tmp_path / "deit" / "results.json").read_text() == before
