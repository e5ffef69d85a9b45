"""Solver tests: exact backends == brute force, edge cases, JSON, CLI, no torch. Timing lives in benchmarks/."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mdp_hf.solver import (
    BackendUnavailable,
    Block,
    Dimension,
    InfeasibleBudgetError,
    LatencyTerm,
    ObjectiveTerm,
    Problem,
    ProblemError,
    solve,
    synthetic,
)
from mdp_hf.solver.brute_force import solve_brute_force

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def min_latency(problem: Problem) -> float:
    saved = problem.budget_ms
    problem.budget_ms = -1e12  # below anything (latency terms may be negative)
    try:
        solve_brute_force(problem)
    except InfeasibleBudgetError as e:
        return e.min_latency_ms
    finally:
        problem.budget_ms = saved
    raise AssertionError("a negative budget must be infeasible")


def budgets(problem: Problem, seed: int, n: int):
    """Budgets from exactly the minimum reachable latency up to the dense latency."""
    lo, hi = min_latency(problem), problem.dense_latency()
    rng = np.random.default_rng(seed + 12345)
    fractions = [0.0] + list(rng.uniform(0.0, 1.0, n - 1))
    return [lo + f * (hi - lo) for f in fractions]


def assert_same_optimum(solution, reference, problem):
    assert problem.within_budget(solution.latency_ms), (solution.latency_ms, problem.budget_ms)
    assert solution.objective == pytest.approx(reference.objective, rel=1e-9, abs=1e-9)
    assert solution.status == "optimal" and solution.gap == 0.0
    # the reported objective/latency are those of the returned assignment
    obj, lat = problem.evaluate(solution.choices, solution.blocks)
    assert obj == pytest.approx(solution.objective) and lat == pytest.approx(solution.latency_ms)


@pytest.mark.parametrize("chunk", range(6))
def test_chain_dp_equals_brute_force_on_random_problems(chunk):
    """300 random problems (ViT-like hub, ResNet-like hub chains, conv chains, arbitrary), 3 budgets each."""
    for seed in range(chunk * 50, chunk * 50 + 50):
        problem = synthetic.random_problem(seed)
        for budget in budgets(problem, seed, 3):
            problem.budget_ms = budget
            reference = solve_brute_force(problem)
            for backend in ("chain_dp", "auto"):
                assert_same_optimum(solve(problem, backend=backend), reference, problem)


def _split_with_negative_cells(problem: Problem, rng) -> Problem:
    """The same problem with every multi-dimensional term T of a block replaced by T + D and -D (D random):
    totals are unchanged but single terms have negative cells, as a decomposed latency table has."""
    terms = []
    for term in problem.latency_terms:
        if term.block is not None and len(term.dims) >= 2:
            d = rng.uniform(0.0, 2.0 * float(np.max(term.table)) + 1.0, size=term.table.shape)
            terms += [
                LatencyTerm(term.name, term.dims, term.table + d, term.block),
                LatencyTerm(term.name + ".correction", term.dims, -d, term.block),
            ]
        else:
            terms.append(term)
    return Problem(
        problem.dimensions,
        problem.blocks,
        problem.objective_terms,
        terms,
        problem.budget_ms,
        dict(problem.fixed_choices),
        dict(problem.fixed_blocks),
        dict(problem.metadata),
    )


def test_negative_cells_in_decomposed_terms_keep_backends_exact():
    rng = np.random.default_rng(7)
    checked = 0
    for seed in range(60):
        original = synthetic.random_problem(seed)
        split = _split_with_negative_cells(original, rng)
        if not any(np.any(t.table < 0) for t in split.latency_terms):
            continue
        for budget in budgets(original, seed, 2):
            original.budget_ms = split.budget_ms = budget
            reference = solve_brute_force(original)
            for backend in ("chain_dp", "auto") + (("milp",) if seed < 12 else ()):
                solution = solve(split, backend=backend)
                assert_same_optimum(solution, reference, split)
            checked += 1
    assert checked >= 40


def _variants(problem: Problem, seed: int):
    """Widths-only (every block fixed kept), a monotone iterative step (widths truncated, blocks already
    removed, some choices fixed) and both together."""
    mono = synthetic.monotone_step(problem, seed, shrink=0.6, removed=0.3, fixed=0.2)
    return {
        "widths_only": synthetic.widths_only(problem),
        "monotone": mono,
        "monotone_widths_only": synthetic.widths_only(mono),
    }


@pytest.mark.parametrize("chunk", range(3))
def test_widths_only_monotone_and_fixed_dims_equal_brute_force(chunk):
    """Kept blocks' local dimensions stay local and fixed dimensions are folded, so auto never needs the MILP."""
    for seed in range(chunk * 40, chunk * 40 + 40):
        for name, problem in _variants(synthetic.random_problem(seed), seed).items():
            for budget in budgets(problem, seed, 2):
                problem.budget_ms = budget
                reference = solve_brute_force(problem)
                for backend in ("chain_dp", "auto"):
                    solution = solve(problem, backend=backend)
                    assert_same_optimum(solution, reference, problem)
                    if problem.metadata["kind"] != "random":  # the trainer's shapes: structured, never the MILP
                        assert solution.backend in ("chain_dp", "dense"), (name, seed, solution.info)


def test_widths_only_paper_shapes_use_the_structured_dp():
    for problem in (
        synthetic.widths_only(synthetic.resnet(50, seed=0, fraction=0.5)),
        synthetic.widths_only(synthetic.deit(seed=0, fraction=0.5)),
        synthetic.monotone_step(synthetic.resnet(101, seed=1, fraction=0.5), seed=1, fixed=0.1),
    ):
        problem.budget_ms = 0.5 * problem.dense_latency()
        solution = solve(problem)
        assert solution.backend == "chain_dp" and solution.status == "optimal" and solution.gap == 0.0
        assert "auto_fallback" not in solution.info


def test_widths_only_small_deit_equals_milp():
    problem = synthetic.widths_only(
        synthetic.deit(seed=2, fraction=0.5, layers=2, embed=64, heads=3, head_dim=8, mlp=64, groups=(16, 1, 2, 2, 16))
    )
    problem.budget_ms = -1.0
    with pytest.raises(InfeasibleBudgetError) as err:
        solve(problem)
    lo, hi = err.value.min_latency_ms, problem.dense_latency()
    for fraction in (0.0, 0.3, 0.7):
        problem.budget_ms = lo + fraction * (hi - lo)
        exact, milp = solve(problem), solve(problem, backend="milp")
        assert exact.backend == "chain_dp" and milp.status == "optimal"
        assert exact.objective == pytest.approx(milp.objective, rel=1e-7)


def test_block_with_negative_total_latency_is_feasible():
    """A removable block whose latency terms sum to a negative value (decomposed tables): keeping it is cheaper
    than removing it. chain_dp used to report such budgets infeasible."""
    problem = Problem(
        dimensions=[Dimension("E", [1, 2]), Dimension("H", [1, 2])],
        blocks=[Block("b")],
        objective_terms=[ObjectiveTerm("E", [1.0, 2.0]), ObjectiveTerm("H", [0.0, 1.0], "b")],
        latency_terms=[
            LatencyTerm("e", ["E"], np.array([1.0, 2.0])),
            LatencyTerm("b", ["H", "E"], np.array([[-0.5, -0.2], [-0.1, 0.3]]), "b"),
        ],
        budget_ms=0.6,
    )
    reference = solve_brute_force(problem)
    assert reference.objective == pytest.approx(1.0) and reference.blocks["b"]
    for backend in ("chain_dp", "auto", "milp"):
        assert_same_optimum(solve(problem, backend=backend), reference, problem)
    rng = np.random.default_rng(3)
    checked = 0
    for seed in range(80):  # random problems whose blocks' totals are shifted below zero
        problem = synthetic.random_problem(seed)
        terms = []
        for term in problem.latency_terms:
            shift = rng.uniform(0.0, 3.0) if term.block is not None and rng.random() < 0.5 else 0.0
            terms.append(LatencyTerm(term.name, term.dims, term.table - shift, term.block))
        problem.latency_terms = terms
        for budget in budgets(problem, seed, 2):
            problem.budget_ms = budget
            reference = solve_brute_force(problem)
            for backend in ("chain_dp", "auto"):
                assert_same_optimum(solve(problem, backend=backend), reference, problem)
            checked += 1
    assert checked == 160


def test_feasibility_tolerance_is_the_same_for_every_backend():
    """A budget a hair (5e-10 relative) below the smallest latency is within the shared 1e-9 tolerance."""
    for seed in range(20):
        problem = synthetic.random_problem(seed)
        lo = min_latency(problem)
        problem.budget_ms = lo - 5e-10 * max(1.0, abs(lo))
        reference = solve_brute_force(problem)
        for backend in ("chain_dp", "auto"):
            assert_same_optimum(solve(problem, backend=backend), reference, problem)
        problem.budget_ms = lo - 1e-6 * max(1.0, abs(lo))
        for backend in ("chain_dp", "brute_force"):
            with pytest.raises(InfeasibleBudgetError) as err:
                solve(problem, backend=backend)
            budget_text, min_text = (
                str(err.value).split(" ms")[0].split()[-1],
                str(err.value).split("smallest reachable latency ")[1].split(" ms")[0],
            )
            assert budget_text != min_text  # the message never reads "budget 1 ms is below ... 1 ms"


@pytest.mark.parametrize("chunk", range(2))
def test_lagrangian_prefilter_equals_brute_force(chunk):
    """Every block made implicit (options enumerated only after exact Lagrangian filtering): still exact."""
    from mdp_hf.solver.chain_dp import ChainSolver
    from mdp_hf.solver.structure import NotApplicable, decompose

    checked = 0
    for seed in range(chunk * 30, chunk * 30 + 30):
        base = synthetic.random_problem(seed)
        for problem in [base] + list(_variants(base, seed).values()):
            for budget in budgets(problem, seed, 3):
                problem.budget_ms = budget
                reference = solve_brute_force(problem)
                try:
                    structure = decompose(problem, prefilter_cells=0)
                except NotApplicable:
                    continue
                assert_same_optimum(ChainSolver(problem, structure=structure).solve(), reference, problem)
                checked += 1
    assert checked >= 250


def test_huge_resnet101_is_exact_and_honours_the_time_limit():
    """ResNet-101 with 64 residual and 128 bottleneck choices (a 28 MB problem; 246M block cells)."""
    problem = synthetic.resnet(101, seed=0, fraction=0.5, hub_choices=64, mid_choices=128)
    limited = solve(problem, time_limit_s=1.0)
    assert limited.solve_time_s < 3.0 and problem.within_budget(limited.latency_ms)
    assert limited.status in ("time_limit", "optimal") and limited.bound >= limited.objective
    exact = solve(problem)
    assert exact.status == "optimal" and exact.gap == 0.0 and exact.backend == "chain_dp"
    assert exact.info["prefilter_options_kept"] < 0.001 * exact.info["prefilter_cells"]
    assert limited.objective <= exact.objective + 1e-9 and limited.bound >= exact.objective - 1e-6


def test_auto_fallback_answers_honestly_within_the_time_limit():
    """Hubs that form a triangle with 27000 joint choices: chain_dp does not apply, the MILP cannot even be built
    within 1e-4 s, so auto returns the greedy answer with status time_limit and a real bound (never advice to use
    another backend that refuses in turn)."""
    rng = np.random.default_rng(0)
    dims = [Dimension(n, list(range(1, 31))) for n in "ABC"]
    lat = [
        LatencyTerm(a + b, [a, b], np.add.outer(np.arange(30.0), np.arange(30.0)) + rng.random((30, 30)))
        for a, b in ("AB", "BC", "AC")
    ]
    obj = [ObjectiveTerm(n, list(np.cumsum(rng.random(30)))) for n in "ABC"]
    problem = Problem(dims, [], obj, lat, budget_ms=60.0)
    quick = solve(problem, time_limit_s=1e-4)
    assert quick.status == "time_limit" and quick.backend == "greedy" and problem.within_budget(quick.latency_ms)
    assert np.isfinite(quick.bound) and quick.bound >= quick.objective and quick.gap > 0
    assert "do not form a chain" in quick.info["auto_fallback"] and "time limit" in quick.info["milp"]
    full = solve(problem)
    assert full.backend == "milp" and full.status == "optimal" and full.objective >= quick.objective - 1e-9


def test_chain_dp_without_beam_equals_brute_force():
    from mdp_hf.solver.chain_dp import solve_chain_dp

    for seed in range(40):
        problem = synthetic.random_problem(seed)
        for budget in budgets(problem, seed, 2):
            problem.budget_ms = budget
            assert_same_optimum(solve_chain_dp(problem, beam=None), solve_brute_force(problem), problem)


def test_milp_equals_brute_force_on_random_problems():
    for seed in range(24):
        problem = synthetic.random_problem(seed)
        for budget in budgets(problem, seed, 2):
            problem.budget_ms = budget
            assert_same_optimum(solve(problem, backend="milp"), solve_brute_force(problem), problem)


def test_chain_dp_equals_milp_on_small_deit_shape():
    problem = synthetic.deit(
        seed=1, fraction=0.5, layers=2, embed=64, heads=3, head_dim=8, mlp=64, groups=(16, 1, 2, 2, 16)
    )
    problem.budget_ms = -1.0
    with pytest.raises(InfeasibleBudgetError) as err:
        solve(problem)
    lo, hi = err.value.min_latency_ms, problem.dense_latency()
    for fraction in (0.0, 0.2, 0.5, 0.8):
        problem.budget_ms = lo + fraction * (hi - lo)
        exact = solve(problem, backend="chain_dp")
        milp = solve(problem, backend="milp")
        assert exact.objective == pytest.approx(milp.objective, rel=1e-7)
        assert problem.within_budget(exact.latency_ms)


def test_greedy_is_feasible_and_never_beats_the_optimum():
    for seed in range(30):
        problem = synthetic.random_problem(seed)
        problem.budget_ms = budgets(problem, seed, 2)[1]
        greedy = solve(problem, backend="greedy")
        assert problem.within_budget(greedy.latency_ms)
        assert greedy.objective <= solve_brute_force(problem).objective + 1e-9
        assert greedy.status == "feasible"


def tiny_problem(budget=2.5) -> Problem:
    """E (hub, 2 choices) + one removable block with a local dim H; an always-on constant of 1 ms."""
    return Problem(
        dimensions=[Dimension("E", [8, 16]), Dimension("H", [1, 2])],
        blocks=[Block("attn")],
        objective_terms=[ObjectiveTerm("E", [1.0, 2.0]), ObjectiveTerm("H", [1.0, 3.0], "attn")],
        latency_terms=[
            LatencyTerm("const", [], np.asarray(1.0)),
            LatencyTerm("embed", ["E"], np.array([0.5, 1.0])),
            LatencyTerm("attn", ["H", "E"], np.array([[0.5, 1.0], [1.0, 2.0]]), "attn"),
        ],
        budget_ms=budget,
        metadata={"model": "tiny"},
    )


@pytest.mark.parametrize("backend", ["chain_dp", "milp", "brute_force", "greedy"])
def test_infeasible_budget_states_min_latency(backend):
    problem = tiny_problem(budget=1.2)  # min = const 1.0 + embed 0.5 with the block removed
    with pytest.raises(InfeasibleBudgetError) as err:
        solve(problem, backend=backend)
    assert err.value.min_latency_ms == pytest.approx(1.5)
    assert "smallest reachable latency 1.5" in str(err.value) and "const" in str(err.value)


def test_dense_budget_returns_dense_and_exact_budget_boundary():
    problem = tiny_problem(budget=10.0)
    solution = solve(problem)
    assert solution.backend == "dense" and solution.choices == {"E": 1, "H": 1} and solution.blocks["attn"]
    problem.budget_ms = problem.dense_latency()  # exactly dense: still dense
    assert solve(problem).backend == "dense"
    problem.budget_ms = 1.5  # exactly the minimum: feasible
    solution = solve(problem, backend="chain_dp")
    assert solution.latency_ms == pytest.approx(1.5) and not solution.blocks["attn"]


def test_fixed_choices_and_blocks_are_respected():
    problem = tiny_problem(budget=3.0)
    problem.fixed_choices = {"E": 0}
    problem.fixed_blocks = {"attn": True}
    for backend in ("chain_dp", "milp", "brute_force"):
        solution = solve(problem, backend=backend)
        assert solution.choices["E"] == 0 and solution.blocks["attn"]
        assert solution.objective == pytest.approx(1.0 + 3.0)
    problem.fixed_blocks = {"attn": False}
    solution = solve(problem, backend="chain_dp")
    assert solution.backend == "dense" and not solution.blocks["attn"]


def test_time_limit_reports_gap_never_silently():
    problem = synthetic.mobilenet_v1(seed=0, fraction=0.6)
    solution = solve(problem, backend="chain_dp", time_limit_s=0.0)
    assert solution.status == "time_limit"
    assert problem.within_budget(solution.latency_ms)
    assert solution.bound >= solution.objective and solution.gap >= 0.0


def test_json_round_trip(tmp_path):
    problem = synthetic.random_problem(5)
    problem.budget_ms = budgets(problem, 5, 2)[1]
    problem.metadata = {"model": "x/y", "step": 3, "nested": {"a": [1, 2]}}
    path = tmp_path / "p.json"
    text = problem.to_json(path)
    assert json.loads(text)["format_version"] == 1
    for loaded in (Problem.from_json(path), Problem.from_json(text)):
        assert loaded.to_dict() == problem.to_dict()
        assert solve(loaded).objective == pytest.approx(solve(problem).objective)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["objective_terms"][0].update(dim="nope"), "unknown dimension 'nope'"),
        (lambda d: d["latency_terms"][2].update(table=[[1.0, 2.0]]), "table shape"),
        (lambda d: d["dimensions"][0].update(widths=[16, 8]), "strictly increasing"),
        (lambda d: d["dimensions"][0].update(widths=[0, 8]), "positive integers"),
        (lambda d: d["latency_terms"][1].update(table=[0.5, float("nan")]), "NaN"),
        (lambda d: d["latency_terms"][2].update(block="ghost"), "unknown block 'ghost'"),
        (lambda d: d.update(fixed_choices={"E": 5}), "not a choice index"),
        (lambda d: d.update(format_version=99), "format_version"),
    ],
)
def test_validate_explains_errors(mutate, message):
    data = tiny_problem().to_dict()
    mutate(data)
    with pytest.raises(ProblemError, match=message):
        Problem.from_dict(data)


def test_cli_prints_certificate(tmp_path, capsys):
    import argparse

    from mdp_hf.solver import cli

    path = tmp_path / "problem.json"
    tiny_problem(budget=2.5).to_json(path)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out_path = tmp_path / "solution.json"
    assert cli.run(parser.parse_args([str(path), "--output", str(out_path)])) == 0
    printed = capsys.readouterr().out
    for field in ("objective:", "latency_ms:", "bound:", "gap:", "time_s:", "status:"):
        assert field in printed
    assert json.loads(out_path.read_text())["status"] == "optimal"
    assert cli.run(parser.parse_args([str(path), "--budget-ms", "0.1"])) == 3


def test_mdp_hf_solve_command(tmp_path):
    path = tmp_path / "problem.json"
    tiny_problem(budget=2.5).to_json(path)
    result = subprocess.run(
        [sys.executable, "-m", "mdp_hf.cli", "solve", str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "objective:" in result.stdout and "gap:" in result.stdout


def test_solver_package_imports_no_torch():
    """The solver itself (loaded without running mdp_hf/__init__) must not import torch."""
    code = (
        "import sys, types; pkg = types.ModuleType('mdp_hf'); pkg.__path__ = ['mdp_hf']; "
        "sys.modules['mdp_hf'] = pkg; import mdp_hf.solver, mdp_hf.solver.cli, mdp_hf.solver.chain_dp, "
        "mdp_hf.solver.greedy, mdp_hf.solver.brute_force, mdp_hf.solver.synthetic; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_mindtpy_unavailable_is_explained():
    from mdp_hf.solver.pyomo_model import mindtpy_solvers

    try:
        mindtpy_solvers()
    except BackendUnavailable as e:
        assert "ipopt" in str(e) or "glpk" in str(e)
        with pytest.raises(BackendUnavailable):
            solve(tiny_problem(budget=2.5), backend="mindtpy")
    else:
        pytest.skip("MindtPy solvers are installed; see the slow test")


@pytest.mark.slow
def test_mindtpy_on_small_problems():
    from mdp_hf.solver.pyomo_model import mindtpy_solvers

    try:
        mindtpy_solvers()
    except BackendUnavailable as e:
        pytest.skip(str(e))
    for seed in range(5):
        problem = synthetic.random_problem(seed)
        problem.budget_ms = budgets(problem, seed, 2)[1]
        solution = solve(problem, backend="mindtpy", time_limit_s=60)
        assert solution.objective <= solve_brute_force(problem).objective + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("family", ["resnet50", "mobilenet_v1"])
def test_chain_dp_equals_milp_on_paper_shapes(family):
    make = {
        "resnet50": lambda: synthetic.resnet(50, seed=3, fraction=0.5),
        "mobilenet_v1": lambda: synthetic.mobilenet_v1(seed=3, fraction=0.5),
    }[family]
    problem = make()
    exact = solve(problem, backend="chain_dp")
    milp = solve(problem, backend="milp", time_limit_s=300)
    assert milp.status == "optimal"
    assert exact.objective == pytest.approx(milp.objective, rel=1e-7)
