"""Paths users take that no other test walks (issue #19, point 5): a latency table shared through the Hub and the
installed `mdp-hf` command, resuming at the edges of a schedule, errors and checkpoints under two ranks, the `prune=`
ablations, `min_keep`, `dump_problems_dir` and the pruned ViT's eager attention.

Latency comes from a synthetic table (every cell costs the product of its widths, as in test_latency_check), so
which structure the solver picks never depends on how busy the machine is.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, TWO_PROCESS_LAUNCH, build, logits_of
from hub_standin import HubStandin
from test_hub import client_env
from test_trainer import RandomImages, StopAfter
from transformers import TrainingArguments

from mdp_hf import PruningChoice, build_space, slice_model
from mdp_hf.config import PrunableConfig
from mdp_hf.latency import LatencyTable, TableLatencyModel, build_table
from mdp_hf.pruning import prune
from mdp_hf.trainer import MDPTrainer

TESTS = Path(__file__).resolve().parent
# the console script pip installed next to this interpreter (not `python -m mdp_hf.cli`)
MDP_HF_COMMAND = str(Path(sys.executable).parent / "mdp-hf")


def width_product(table, widths) -> float:
    return 1e-4 * float(np.prod(widths)) + 1e-3


def config(**overrides) -> PrunableConfig:
    base = dict(budget_fraction=0.5, group_sizes=GROUPS, accumulation_steps=3, verify_latency=False)
    return PrunableConfig(**{**base, **overrides})


def synthetic_table(cfg: PrunableConfig) -> LatencyTable:
    """A table for the tiny ViT under ``cfg``'s timing settings and space, filled by :func:`width_product`."""
    model = build("vit")
    space = build_space(model, cfg.group_sizes, cfg.min_keep)
    return build_table(model, space=space, settings=cfg.timing_settings(), timer=width_product, progress=False)


def batches(n=3, seed=0):
    data = RandomImages(8 * n, seed)
    return [{"pixel_values": data.x[i : i + 8], "labels": data.y[i : i + 8]} for i in range(0, 8 * n, 8)]


# --- a latency table on the Hub, through the installed command ---------------------------------------------
def mdp_hf(env, *argv, cwd):
    return subprocess.run([MDP_HF_COMMAND, *map(str, argv)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_latency_table_pushed_with_mdp_hf_then_used_by_hub_id(tmp_path):
    """`mdp-hf latency push/pull` (the console script) against the loopback Hub, then `latency_table=<hub id>` in
    a fresh process: the run uses the pushed table; a run with other timing settings is refused, naming them."""
    cfg = config()
    table = synthetic_table(cfg)
    local = tmp_path / "table.json"
    table.save(local)
    with HubStandin(lifetime_s=300) as hub:
        env = client_env(hub, tmp_path)
        pushed = mdp_hf(env, "latency", "push", local, "org/vit-tables", cwd=tmp_path)
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        assert "uploaded to org/vit-tables" in pushed.stdout
        assert hub.files("org/vit-tables")["latency_table.json"] == local.read_bytes()
        pulled = mdp_hf(env, "latency", "pull", "org/vit-tables", "-o", tmp_path / "back.json", cwd=tmp_path)
        assert pulled.returncode == 0, pulled.stderr[-3000:]
        assert LatencyTable.load(tmp_path / "back.json").to_dict() == LatencyTable.load(local).to_dict()
        missing = mdp_hf(env, "latency", "pull", "org/no-such-repo", "-o", tmp_path / "x.json", cwd=tmp_path)
        assert missing.returncode == 7 and "Hugging Face Hub" in missing.stderr and "Traceback" not in missing.stderr

        script = textwrap.dedent(f"""
            import json, sys
            from conftest import GROUPS, build
            from mdp_hf.config import PrunableConfig
            from mdp_hf.latency import LatencyTableMismatchError
            from mdp_hf.pruning import check_budget, latency_model_for
            model = build("vit")
            cfg = PrunableConfig(budget_fraction=0.5, group_sizes=GROUPS, latency_table="org/vit-tables")
            latency = latency_model_for(model, cfg)
            check_budget(model, cfg, latency)
            print("TABLE", json.dumps(latency.table.to_dict(), sort_keys=True) == {json.dumps(json.dumps(LatencyTable.load(local).to_dict(), sort_keys=True))})
            other = PrunableConfig(budget_fraction=0.5, group_sizes=GROUPS, latency_table="org/vit-tables",
                                   latency_batch_size=cfg.latency_batch_size + 3)
            try:
                latency_model_for(model, other)
            except LatencyTableMismatchError as error:
                print("MISMATCH", sorted(error.differences), "batch_size" in str(error))
                print("MESSAGE", str(error).replace(chr(10), " "))
        """)  # fmt: skip
        used = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert used.returncode == 0, f"{used.stderr[-3000:]}\n{hub.requests()}"
        assert "TABLE True" in used.stdout
        assert "MISMATCH ['batch_size'] True" in used.stdout, used.stdout
        assert any("org/vit-tables" in path and "latency_table.json" in path for _, path, _ in hub.log)


def test_installed_mdp_hf_command_solves_a_dumped_problem(tmp_path):
    """`dump_problems_dir` writes the problem every solve saw; the installed `mdp-hf solve` gives the same answer
    from the file (the certificate), and the documented exit codes hold for the command itself."""
    cfg = config(dump_problems_dir=str(tmp_path / "problems"))
    pruned, result = prune(build("vit"), cfg, batches(), TableLatencyModel(synthetic_table(cfg)))
    assert sorted(os.listdir(tmp_path / "problems")) == ["problem_step1.json"]
    env = {**os.environ}
    solved = mdp_hf(env, "solve", tmp_path / "problems" / "problem_step1.json", cwd=tmp_path)
    assert solved.returncode == 0, solved.stderr
    lines = dict(line.split(":", 1) for line in solved.stdout.splitlines() if ":" in line)
    assert lines["status"].strip() == result.status == "optimal"
    assert float(lines["objective"]) == pytest.approx(result.objective, rel=1e-7)  # printed with 9 digits
    assert float(lines["latency_ms"].split()[0]) == pytest.approx(result.predicted_latency_ms, abs=1e-6)
    assert f"blocks kept: {len(build_space(build('vit'), GROUPS).blocks) - len(result.choice.removed_blocks)}/" in (
        solved.stdout
    )
    tight = mdp_hf(env, "solve", tmp_path / "problems" / "problem_step1.json", "--budget-ms", "-1000", cwd=tmp_path)
    assert tight.returncode == 3 and "infeasible budget" in tight.stderr  # EXIT_INFEASIBLE
    absent = mdp_hf(env, "solve", tmp_path / "nope.json", cwd=tmp_path)
    assert absent.returncode == 2 and "does not exist" in absent.stderr and "Traceback" not in absent.stderr
    assert mdp_hf(env, cwd=tmp_path).returncode == 2  # no sub-command: argparse's usage error


# --- resume at the edges of a schedule -------------------------------------------------------------------
ITERATIVE_TWO_STEPS = dict(schedule="iterative", num_pruning_steps=2, accumulation_steps=2, pruning_interval=2)
RESUME_CASES = {
    "one_shot_before_its_step": (dict(schedule="one_shot", accumulation_steps=3), 2),
    "one_shot_after_its_step": (dict(schedule="one_shot", accumulation_steps=3), 4),
    "iterative_before_the_first_step": (
        dict(schedule="iterative", num_pruning_steps=2, accumulation_steps=2, pruning_interval=2),
        1,
    ),
    "iterative_after_the_last_step": (
        dict(schedule="iterative", num_pruning_steps=2, accumulation_steps=2, pruning_interval=2),
        5,
    ),
    # gate-gradient scores and masked fine-tuning: the gates are live during pruning and must be frozen again when
    # a finished schedule is resumed (the default ViT score never needs gate gradients, the sliced model no gates)
    "iterative_after_the_last_step_masked_gates": (
        dict(ITERATIVE_TWO_STEPS, importance="taylor_gates", slice_after_pruning=False),
        5,
    ),
}


def gate_tensors(trainer):
    gates = trainer.mdp.gates
    return [*gates.dims.values(), *gates.blocks.values()]


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_at_the_edges_of_the_schedule_equals_an_uninterrupted_run(tmp_path, case):
    schedule, stop = RESUME_CASES[case]
    cfg = config(**schedule)
    steps = cfg.pruning_steps()
    assert stop < steps[0] if "before" in case else stop > steps[-1]
    latency = TableLatencyModel(synthetic_table(cfg))

    def trainer_for(out, **kw):
        args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
                                 report_to="none", logging_steps=1, seed=0, use_cpu=True, dataloader_num_workers=0,
                                 **{"save_strategy": "no", **kw})  # fmt: skip
        return MDPTrainer(model=build("vit"), args=args, prunable_config=cfg, latency_model=latency,
                          train_dataset=RandomImages(48))  # fmt: skip

    straight = trainer_for(tmp_path / "straight")
    straight.train()
    interrupted = trainer_for(tmp_path / "resumed", save_strategy="steps", save_steps=stop)
    interrupted.add_callback(StopAfter(stop))
    interrupted.train()
    assert len(interrupted.mdp.results) == sum(s <= stop for s in steps)
    assert (tmp_path / "resumed" / f"checkpoint-{stop}" / "mdp_state.json").is_file()
    resumed = trainer_for(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.mdp.finished and len(resumed.mdp.results) == len(steps)
    for a, b in zip(resumed.mdp.results, straight.mdp.results):
        assert a.budget_ms == pytest.approx(b.budget_ms) and a.choice.kept == b.choice.kept
        assert a.choice.removed_blocks == b.choice.removed_blocks
    for name, ema in straight.mdp.scores.ema.items():
        assert torch.allclose(resumed.mdp.scores.ema[name], ema, rtol=1e-6, atol=1e-15), name
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    # after the last step the gates are fixed masks: no gradient is computed for them, resumed or not
    assert not any(gate.requires_grad or gate.grad is not None for gate in gate_tensors(straight))
    assert [(g.requires_grad, g.grad is None) for g in gate_tensors(resumed)] == [(False, True)] * len(
        gate_tensors(straight)
    )
    x = RandomImages(4, seed=5).x
    outputs = []
    for trainer, folder in ((straight, "straight_export"), (resumed, "resumed_export")):
        trainer.save_model(str(tmp_path / folder))
        from mdp_hf.hub import load_pruned_model

        with torch.no_grad():
            outputs.append(logits_of(load_pruned_model(tmp_path / folder), x))
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5


# --- two ranks -------------------------------------------------------------------------------------------
def two_ranks(script: str, *argv, timeout=600):
    return subprocess.run(
        TWO_PROCESS_LAUNCH + [script, *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=timeout,  # an error that reaches only one rank leaves the other waiting in a collective
    )


MAIN_RANK_ERROR = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from mdp_hf.distributed import use_cpu_ranks_without_gpu
    use_cpu_ranks_without_gpu()
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=sys.argv[1], report_to="none")  # sets up the two ranks (gloo)
    from conftest import GROUPS, build
    from mdp_hf.config import PrunableConfig
    from mdp_hf.distributed import run_on_main_and_broadcast, world_size
    from mdp_hf.pruning import latency_model_for
    cfg = PrunableConfig(budget_fraction=0.5, group_sizes=GROUPS, latency_table=sys.argv[2])
    try:
        latency_model_for(build("vit"), cfg)  # the main rank loads the (damaged) table; the other waits for it
        message = "no error"
    except Exception as error:
        message = f"{{type(error).__name__}}: {{error}}"
    with open(os.path.join(sys.argv[1], f"rank{{args.process_index}}.txt"), "w") as f:
        f.write(f"{{world_size()}}\\n{{message}}")
""")


def test_an_error_on_the_main_rank_is_raised_on_every_rank(tmp_path):
    damaged = tmp_path / "damaged_table.json"
    damaged.write_text('{"format": "mdp_hf.latency_table", "tables": [')
    script = tmp_path / "main_rank_error.py"
    script.write_text(MAIN_RANK_ERROR.format(tests=str(TESTS)))
    result = two_ranks(script, tmp_path, damaged)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split("\n", 1) for r in (0, 1)]
    assert [size for size, _ in ranks] == ["2", "2"]
    assert ranks[0][1] == ranks[1][1] != "no error"
    assert "damaged_table.json" in ranks[0][1] and ranks[0][1].startswith("LatencyTableError"), ranks[0][1]


class ErrorWithAField(ValueError):
    """Any error whose __init__ takes more than its message (as LatencyBudgetError does)."""

    def __init__(self, message: str, floor_ms: float):
        super().__init__(message)
        self.floor_ms = floor_ms


def test_errors_with_their_own_fields_cross_ranks_whole():
    """The main rank's error reaches the other ranks pickled (torch.distributed.broadcast_object_list): errors
    carrying fields of their own must arrive with type, message and fields, where plain pickling makes the other
    ranks fail with a TypeError of the unpickler instead (seen: a LatencyBudgetError under two processes); an
    error whose fields do not pickle arrives as a RuntimeError naming it."""
    import pickle

    from mdp_hf.distributed import portable_error, rebuilt_error
    from mdp_hf.latency.table import LatencyTableMismatchError
    from mdp_hf.latency_check import LatencyBudgetError, LatencyCheck
    from mdp_hf.solver.problem import InfeasibleBudgetError

    errors = [
        LatencyBudgetError("over budget", LatencyCheck("failed", "fraction", 0.5, 0.01, reason="floor 0.61")),
        InfeasibleBudgetError("below the floor", 1.5, 1.2, [("stem", 1.3)]),
        LatencyTableMismatchError("other settings", {"batch_size": (1, 8)}),
        ErrorWithAField("below the floor", 2.5),
    ]
    for error in errors:
        with pytest.raises(TypeError):  # what broadcasting the error itself did on the other ranks
            pickle.loads(pickle.dumps(error))
        copy = rebuilt_error(pickle.loads(pickle.dumps(portable_error(error))))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert vars(copy) == vars(error), type(error)
    unpicklable = ErrorWithAField("with a lock", 1.0)
    unpicklable.lock = __import__("threading").Lock()
    copy = rebuilt_error(pickle.loads(pickle.dumps(portable_error(unpicklable))))
    assert type(copy) is RuntimeError and str(copy) == "ErrorWithAField: with a lock"


ACCUMULATING_RANKS = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from mdp_hf.distributed import use_cpu_ranks_without_gpu
    use_cpu_ranks_without_gpu()
    from transformers import TrainingArguments
    from mdp_hf.config import PrunableConfig
    from mdp_hf.trainer import MDPTrainer
    from conftest import GROUPS, build
    from test_user_paths import RandomImages, StopAfter
    out, per_device, accumulation, stop, table = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    cfg = PrunableConfig(budget_fraction=0.5, group_sizes=GROUPS, schedule="iterative", num_pruning_steps=2,
                         accumulation_steps=2, pruning_interval=2, latency_table=table, verify_latency=False)
    def trainer_for(**kw):
        # every optimizer step sees the whole dataset (16 images), whatever the ranks, micro-batches or order
        args = TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=per_device,
                                 gradient_accumulation_steps=accumulation, learning_rate=1e-3, report_to="none",
                                 seed=0, dataloader_num_workers=0, **{{"save_strategy": "no", **kw}})
        return MDPTrainer(model=build("vit"), args=args, prunable_config=cfg, train_dataset=RandomImages(16))
    if stop:
        first = trainer_for(save_strategy="steps", save_steps=stop)
        first.add_callback(StopAfter(stop))
        first.train()
        trainer = trainer_for()
        trainer.train(resume_from_checkpoint=True)
    else:
        trainer = trainer_for()
        trainer.train()
    rank = trainer.args.process_index
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"world_size": trainer.args.world_size, "steps": trainer.state.global_step,
                   "choices": [[r.choice.kept, r.choice.removed_blocks] for r in trainer.mdp.results],
                   "scores": {{k: v.tolist() for k, v in trainer.mdp.scores.ema.items()}},
                   "weights": {{k: v.tolist() for k, v in trainer.model.state_dict().items() if k.endswith("weight")}}}}, f)
""")  # fmt: skip


def test_two_ranks_with_gradient_accumulation_and_a_resumed_checkpoint_equal_one_process(tmp_path):
    """Two ranks, 2 micro-batches of 4 per step, killed after step 3 (between the two pruning steps) and resumed
    from its checkpoint: the same scores, choices and weights as one process taking the 16 images in one batch."""
    cfg = config(schedule="iterative", num_pruning_steps=2, accumulation_steps=2, pruning_interval=2)
    table = tmp_path / "table.json"
    synthetic_table(cfg).save(table)
    script = tmp_path / "accumulating_ranks.py"
    script.write_text(ACCUMULATING_RANKS.format(tests=str(TESTS)))
    (tmp_path / "two").mkdir()
    two = two_ranks(script, tmp_path / "two", 4, 2, 3, table)
    assert two.returncode == 0, two.stderr[-4000:]
    (tmp_path / "one").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "16", "1", "0", str(table)],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-4000:]
    assert (tmp_path / "two" / "checkpoint-3" / "mdp_state.json").is_file()
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert ranks[0]["steps"] == ranks[1]["steps"] == single["steps"] == 6
    assert ranks[0]["choices"] == ranks[1]["choices"] == single["choices"] and len(single["choices"]) == 2
    for name, values in single["scores"].items():
        assert ranks[0]["scores"][name] == ranks[1]["scores"][name], name
        assert np.allclose(ranks[0]["scores"][name], values, rtol=1e-3, atol=1e-12), name
    for name, values in single["weights"].items():
        assert ranks[0]["weights"][name] == ranks[1]["weights"][name], name
        assert np.allclose(ranks[0]["weights"][name], values, atol=1e-5), name


OUTPUT_DIR_CHECK = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from mdp_hf.distributed import use_cpu_ranks_without_gpu
    use_cpu_ranks_without_gpu()
    from transformers import TrainingArguments
    from mdp_hf.recipes import RUN_WORK_DIR, ScriptArguments, _work_dir, check_output_dir
    out, wait_s = sys.argv[1], float(sys.argv[2])
    args = TrainingArguments(output_dir=out, report_to="none")  # sets up the two ranks (gloo)
    rank = args.process_index

    def check():
        try:
            check_output_dir(ScriptArguments(), args)
            return "ok"
        except SystemExit as refusal:
            return f"refused: {{refusal}}"

    if rank == 1:  # a slower rank: it looks at the folder once the main rank has created its work folder there
        deadline = time.monotonic() + wait_s  # (the main rank may be waiting for this rank instead: then go on)
        while not os.path.isdir(os.path.join(out, RUN_WORK_DIR)) and time.monotonic() < deadline:
            time.sleep(0.05)
    first = check()
    if rank == 0 and first == "ok":
        _work_dir(args)  # what recipes.run does next on the main rank
    second = check()  # the folder now holds the run's work folder: a second run is refused
    with open(os.path.join(out, f"rank{{rank}}.txt"), "w") as f:
        f.write(first + "\\n" + second)
""")


def test_every_rank_takes_the_main_ranks_verdict_on_the_output_dir(tmp_path):
    """Every rank calls recipes.check_output_dir, but only the main rank creates `<output_dir>/_mdp_run` (right
    after, in recipes.run): a rank that looks at the folder later must not find it taken and stop a fresh run with
    "already holds other files". Rank 1 here looks once `_mdp_run` exists (or after 10 s: the main rank may be
    waiting for it in the check, which then holds its verdict for every rank)."""
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "output_dir_check.py"
    script.write_text(OUTPUT_DIR_CHECK.format(tests=str(TESTS)))
    result = two_ranks(script, out, 10)
    assert result.returncode == 0, result.stderr[-4000:]
    verdicts = [(out / f"rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert [first for first, _ in verdicts] == ["ok", "ok"], verdicts
    assert verdicts[0][1] == verdicts[1][1], verdicts
    assert verdicts[0][1].startswith(f"refused: error: --output_dir {out} already holds other files"), verdicts


# --- what may be pruned ----------------------------------------------------------------------------------
def one_shot(cfg):
    model = build("vit")
    pruned, result = prune(model, cfg, batches(), TableLatencyModel(synthetic_table(cfg)))
    return build_space(model, cfg.group_sizes, cfg.min_keep), result


def test_prune_lists_only_what_may_change():
    """Widths only (no "blocks"): every block stays, the listed kinds shrink, the others stay full. Blocks only:
    every width stays full and blocks go."""
    space, result = one_shot(config(prune=["heads", "mlp"], budget_fraction=0.6))
    assert result.predicted_latency_ms <= result.budget_ms * (1 + 1e-9)
    assert result.choice.removed_blocks == []
    kept = {name: len(result.choice.kept_indices(space, name)) for name in space.dimensions}
    for name, dim in space.dimensions.items():
        if dim.kind not in ("heads", "mlp"):
            assert kept[name] == dim.size, (name, kept[name])
    assert any(kept[n] < d.size for n, d in space.dimensions.items() if d.kind == "heads")
    assert any(kept[n] < d.size for n, d in space.dimensions.items() if d.kind == "mlp")

    space, result = one_shot(config(prune=["blocks"], budget_fraction=0.6))
    assert result.predicted_latency_ms <= result.budget_ms * (1 + 1e-9) and result.choice.removed_blocks
    assert all(len(result.choice.kept_indices(space, n)) == d.size for n, d in space.dimensions.items())


def test_min_keep_holds_under_a_budget_that_would_go_below_it():
    free_space, free = one_shot(config(budget_fraction=0.3, prune=["heads", "mlp", "qk", "v", "embed"]))
    kept = lambda space, result, kind: [  # noqa: E731
        len(result.choice.kept_indices(space, n)) for n, d in space.dimensions.items() if d.kind == kind
    ]
    assert min(kept(free_space, free, "heads")) < 2 and min(kept(free_space, free, "mlp")) < 48  # it would go below
    space, held = one_shot(config(budget_fraction=0.3, prune=["heads", "mlp", "qk", "v", "embed"],
                                  min_keep={"heads": 2, "mlp": 48}))  # fmt: skip
    assert min(kept(space, held, "heads")) >= 2 and min(kept(space, held, "mlp")) >= 48
    assert held.predicted_latency_ms <= held.budget_ms * (1 + 1e-9)


# --- the pruned ViT's eager attention ----------------------------------------------------------------------
def test_pruned_vit_eager_attention_computes_what_sdpa_computes(tmp_path):
    """qk and v widths cut differently per layer; the folder loaded with attn_implementation="eager" (the
    explicit softmax path) gives the logits of the default SDPA path."""
    from transformers import AutoModelForImageClassification

    from mdp_hf.hub import save_pruned_model

    model = build("vit")
    space = build_space(model, group_sizes=GROUPS)
    kept = {}
    for name, dim in space.dimensions.items():
        width = dim.widths()[1] if dim.kind == "qk" else dim.widths()[-2]  # qk 4, v 6 of 8 per head
        kept[name] = list(range(dim.size - width, dim.size))
    pruned = slice_model(model, space, PruningChoice(kept, ["layers.2.mlp"]))
    save_pruned_model(pruned, tmp_path / "pruned")
    sdpa = AutoModelForImageClassification.from_pretrained(tmp_path / "pruned").eval()
    eager = AutoModelForImageClassification.from_pretrained(tmp_path / "pruned", attn_implementation="eager").eval()
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    attentions = [m for m in eager.modules() if hasattr(m, "qk_head_dim")]
    assert attentions and all(m.qk_head_dim != m.v_head_dim for m in attentions)
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = logits_of(pruned, x)
        assert (logits_of(sdpa, x) - expected).abs().max() < 1e-5
        assert (logits_of(eager, x) - logits_of(sdpa, x)).abs().max() < 1e-5
