"""PrunableConfig, the one-shot API and MDPTrainer: schedule, logging, export, resume, two ranks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, TWO_PROCESS_LAUNCH, VARIANTS, build, detection_targets, is_detector, logits_of
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainingArguments

from mdp_hf.config import PrunableConfig
from mdp_hf.hub import load_pruned_model
from mdp_hf.pruning import latency_model_for, prune
from mdp_hf.trainer import MDPTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_KEYS = {
    "budget_ms",
    "dense_latency_ms",
    "pruned_latency_ms",
    "predicted_latency_ms",
    "dense_params",
    "pruned_params",
    "device",
    "batch_size",
    "image_size",
    "num_threads",
    "dense_accuracy",
    "pruned_accuracy",
    "world_size",
}


class RandomImages(Dataset):
    """Fixed random images with labels that depend on them (so training has something to learn)."""

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        self.y = (self.x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (self.x[:, 0].mean(dim=(1, 2)) > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def config(**overrides):
    # verify_latency off: these tests are about scores, schedules and exports, and tiny models timed on a busy
    # machine cannot land on a measured budget (tests/test_latency_check.py tests the check)
    base = dict(
        budget_fraction=0.6,
        group_sizes=GROUPS,
        accumulation_steps=3,
        latency_repeats=3,
        latency_subgrid=2,
        verify_latency=False,
    )
    return PrunableConfig(**{**base, **overrides})


def args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**base, **overrides})


@pytest.fixture(scope="module")
def vit_latency(tmp_path_factory):
    """One measured table for the tiny ViT, shared so runs that must agree see the same latencies."""
    return latency_model_for(build("vit"), config(), str(tmp_path_factory.mktemp("lat") / "table.json"))


# --- PrunableConfig --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(), "budget_ms/budget_fraction"),
        (dict(budget_ms=3.0, budget_fraction=0.5), "budget_ms/budget_fraction"),
        (dict(budget_fraction=1.5), "budget_fraction"),
        (dict(budget_ms=-1.0), "budget_ms"),
        (dict(budget_fraction=0.5, prune=["heads", "wings"]), "prune"),
        (dict(budget_fraction=0.5, group_sizes={"mlp": 0}), "group_sizes"),
        (dict(budget_fraction=0.5, schedule="cosine"), "schedule"),
        (dict(budget_fraction=0.5, num_pruning_steps=3), "num_pruning_steps"),
        (dict(budget_fraction=0.5, latency_model="roofline"), "latency_model"),
        (dict(budget_fraction=0.5, ema_decay=1.0), "ema_decay"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PrunableConfig.{field}"):
        PrunableConfig(**kwargs)


def test_config_round_trip_and_unknown_keys(tmp_path, caplog):
    cfg = PrunableConfig(budget_ms=2.5, prune=["heads", "mlp", "blocks"], schedule="iterative", num_pruning_steps=3)
    cfg.save_pretrained(tmp_path)
    assert PrunableConfig.from_pretrained(tmp_path) == cfg
    data = json.loads((tmp_path / "pruning_config.json").read_text())
    data["from_the_future"] = 1
    (tmp_path / "pruning_config.json").write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        assert PrunableConfig.from_pretrained(tmp_path / "pruning_config.json") == cfg
    assert "from_the_future" in caplog.text


def test_iterative_schedule_is_exponential():
    cfg = PrunableConfig(
        budget_fraction=0.25, schedule="iterative", num_pruning_steps=4, accumulation_steps=10, pruning_interval=5
    )
    assert cfg.pruning_steps() == [10, 15, 20, 25]
    budgets = [cfg.step_budget(t, 8.0, 2.0) for t in range(1, 5)]
    assert budgets == pytest.approx([8.0 * (2.0 / 8.0) ** (t / 4) for t in range(1, 5)])


# --- one-shot API ------------------------------------------------------------------------------------------
def test_one_shot_prune_meets_budget_and_leaves_model_intact(vit_latency):
    model = build("vit")
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        before = logits_of(model, x)
    batches = [(RandomImages(8, s).x, RandomImages(8, s).y) for s in range(3)]
    pruned, result = prune(model, config(budget_fraction=0.5), batches, vit_latency)
    assert result.predicted_latency_ms <= result.budget_ms * (1 + 1e-9)
    assert result.status == "optimal" and result.gap == 0
    assert vit_latency.predict(pruned) == pytest.approx(result.predicted_latency_ms, rel=1e-6)
    with torch.no_grad():
        assert torch.equal(logits_of(model.eval(), x), before)  # gates removed again
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", [v for _, v in VARIANTS])
def test_magnitude_scores_follow_the_weights(family):
    from mdp_hf import build_space, get_adapter

    model = build(family)
    space = build_space(model, group_sizes=GROUPS)
    magnitudes = get_adapter(model).unit_magnitudes(model, space)
    assert set(magnitudes) == set(space.dimensions)
    for name, dim in space.dimensions.items():
        assert magnitudes[name].shape == (dim.size,) and (magnitudes[name] > 0).all(), name
    if family == "vit":  # zeroing head 1's weights of layer 0 makes it the least important head
        attn = model.vit.layers[0].attention
        with torch.no_grad():
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight[8:16] = 0
            attn.o_proj.weight[:, 8:16] = 0
        heads = get_adapter(model).unit_magnitudes(model, space)["layers.0.heads"]
        assert heads[1] == 0 and heads.argmin() == 1


def test_one_shot_prune_with_magnitude_importance(vit_latency):
    batches = [(RandomImages(8, s).x, RandomImages(8, s).y) for s in range(2)]
    pruned, result = prune(build("vit"), config(budget_fraction=0.5, importance="magnitude"), batches, vit_latency)
    assert result.status == "optimal" and result.predicted_latency_ms <= result.budget_ms * (1 + 1e-9)


# --- MDPTrainer ---------------------------------------------------------------------------------------------
def test_trainer_prunes_on_schedule_logs_and_exports(tmp_path, vit_latency):
    model = build("vit")
    trainer = MDPTrainer(
        model=model,
        args=args(tmp_path),
        prunable_config=config(),
        latency_model=vit_latency,
        train_dataset=RandomImages(48),
        eval_dataset=RandomImages(16, seed=1),
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    trainer.train()
    result = trainer.mdp.results[0]
    assert len(trainer.mdp.results) == 1 and result.predicted_latency_ms <= result.budget_ms * (1 + 1e-9)
    logged = [entry for entry in trainer.state.log_history if "mdp/predicted_latency_ms" in entry]
    assert len(logged) == 1 and logged[0]["step"] == 3
    # after pruning the gates are fixed 0/1 masks and training kept the pruned units switched off
    for name, gate in trainer.mdp.gates.dims.items():
        assert set(gate.unique().tolist()) <= {0.0, 1.0} and not gate.requires_grad
        assert int(gate.sum()) == len(result.choice.kept_indices(trainer.mdp.space, name))

    x = RandomImages(4, seed=5).x
    # fine-tuning went on on the sliced model (PrunableConfig.slice_after_pruning): the export is the model trained
    assert trainer.model is not model and trainer.model.config.model_type == "mdp_vit"
    with torch.no_grad():
        trained = logits_of(trainer.model.eval(), x)
    out = tmp_path / "pruned"
    trainer.save_model(str(out))
    report = json.loads((out / "pruning_report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["world_size"] == 1 and report["device"] == "cpu"
    assert report["pruned_params"] < report["dense_params"]
    assert report["predicted_latency_ms"] == pytest.approx(result.predicted_latency_ms)
    assert 0.0 <= report["dense_accuracy"] <= 1.0 and 0.0 <= report["pruned_accuracy"] <= 1.0
    for name in ("README.md", "pruning_config.json", "pruning_report.png", "model.safetensors", "config.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and f"{report['budget_ms']:.4g}" in card
    assert PrunableConfig.from_pretrained(out) == trainer.prunable_config
    reloaded = load_pruned_model(out)
    with torch.no_grad():
        assert (logits_of(reloaded, x) - trained).abs().max() < 1e-5
    assert reloaded.config.base_config["model_type"] == "vit"


class StopAfter(TrainerCallback):
    """Simulates a job killed right after step ``step`` (same max_steps, so the same LR schedule)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_continues_the_iterative_schedule_exactly(tmp_path, vit_latency):
    cfg = config(
        schedule="iterative", num_pruning_steps=2, accumulation_steps=2, pruning_interval=2, budget_fraction=0.5
    )

    def trainer_for(out, **kw):
        return MDPTrainer(
            model=build("vit"),
            args=args(tmp_path, output_dir=str(out), **kw),
            prunable_config=cfg,
            latency_model=vit_latency,
            train_dataset=RandomImages(48),
        )

    straight = trainer_for(tmp_path / "straight", max_steps=5)
    straight.train()
    interrupted = trainer_for(tmp_path / "resumed", max_steps=5, save_strategy="steps", save_steps=3)
    interrupted.add_callback(StopAfter(3))
    interrupted.train()  # killed after the first pruning step, checkpoint at step 3
    assert len(interrupted.mdp.results) == 1
    assert (tmp_path / "resumed" / "checkpoint-3" / "mdp_state.json").is_file()
    resumed = trainer_for(tmp_path / "resumed", max_steps=5)
    resumed.train(resume_from_checkpoint=True)
    assert [r.budget_ms for r in resumed.mdp.results] == pytest.approx([r.budget_ms for r in straight.mdp.results])
    for a, b in zip(resumed.mdp.results, straight.mdp.results):
        assert a.choice.kept == b.choice.kept and a.choice.removed_blocks == b.choice.removed_blocks
    for name, ema in straight.mdp.scores.ema.items():
        assert torch.allclose(resumed.mdp.scores.ema[name], ema, rtol=1e-6, atol=1e-15), name
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_with_another_config_is_refused(tmp_path, vit_latency):
    first = MDPTrainer(
        model=build("vit"),
        args=args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3),
        prunable_config=config(),
        latency_model=vit_latency,
        train_dataset=RandomImages(24),
    )
    first.train()
    other = MDPTrainer(
        model=build("vit"),
        args=args(tmp_path, max_steps=4),
        prunable_config=config(budget_fraction=0.7),
        latency_model=vit_latency,
        train_dataset=RandomImages(24),
    )
    # the message names the field that differs and both values
    with pytest.raises(ValueError, match=r"different PrunableConfig \(budget_fraction: checkpoint 0.6, now 0.7\)"):
        other.train(resume_from_checkpoint=True)


def test_checkpoint_of_an_earlier_version_lacking_a_new_field_resumes(tmp_path, vit_latency):
    # a checkpoint written before a PrunableConfig field existed (here: slice_after_pruning, added later) holds
    # the config without it; the field's default stands in, so the run resumes instead of being refused
    from mdp_hf.trainer import STATE_JSON

    first = MDPTrainer(
        model=build("vit"),
        args=args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3),
        prunable_config=config(),
        latency_model=vit_latency,
        train_dataset=RandomImages(24),
    )
    first.train()
    state_path = os.path.join(tmp_path, "run", "checkpoint-3", STATE_JSON)
    with open(state_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    del meta["prunable_config"]["slice_after_pruning"]
    with open(state_path, "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
    resumed = MDPTrainer(
        model=build("vit"),
        args=args(tmp_path, max_steps=4),
        prunable_config=config(),
        latency_model=vit_latency,
        train_dataset=RandomImages(24),
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4


def test_infeasible_budget_fails_before_training_and_leaves_the_model_alone(tmp_path):
    # an analytic, all-positive latency model: a measured table on a busy machine can hold negative decomposed
    # cells that make tiny predicted latencies reachable, and the test is about the check, not the table
    from test_fidelity import ProductLatency

    model = build("vit")
    with pytest.raises(ValueError, match="smallest reachable latency"):
        MDPTrainer(
            model=model,
            args=args(tmp_path),
            prunable_config=config(budget_ms=1e-6, budget_fraction=None),
            latency_model=ProductLatency(),
            train_dataset=RandomImages(48),
        )
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # no gates left behind


TWO_RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from mdp_hf.distributed import use_cpu_ranks_without_gpu
    use_cpu_ranks_without_gpu()
    from transformers import TrainerCallback, TrainingArguments
    from mdp_hf.config import PrunableConfig
    from mdp_hf.trainer import MDPTrainer
    from test_trainer import RandomImages
    from conftest import GROUPS, build
    out, per_device = sys.argv[1], int(sys.argv[2])
    cfg = PrunableConfig(budget_fraction=0.5, group_sizes=GROUPS, accumulation_steps=2, latency_table=sys.argv[3],
                         verify_latency=False)  # one process and two ranks must choose alike: no timing in the loop
    # one batch per step = the whole dataset, whatever the sampler order: ranks and one process see the same data
    args = TrainingArguments(output_dir=out, max_steps=3, per_device_train_batch_size=per_device, learning_rate=0.0,
                             report_to="none", save_strategy="no", seed=0)
    # distillation from the dense model too: each rank holds its own frozen teacher (KL is on after pruning)
    from mdp_hf.losses import DistillationSettings
    trainer = MDPTrainer(model=build("vit"), args=args, prunable_config=cfg, train_dataset=RandomImages(16),
                         distillation=DistillationSettings(teacher="dense", kl_weight=1.0))
    trainer.train()
    assert trainer.mdp_loss.phase == "finetuning" and trainer.mdp_loss.last_parts["kl"] >= 0
    rank = args.process_index
    result = trainer.mdp.results[0]
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"world_size": args.world_size, "kept": result.choice.kept, "removed": result.choice.removed_blocks,
                   "scores": {{k: v.tolist() for k, v in trainer.mdp.scores.ema.items()}}}}, f)
""")


# slow: two ranks == one process (scores, choices, weights) is test_user_paths'
# test_two_ranks_with_gradient_accumulation_and_a_resumed_checkpoint_equal_one_process, and distillation from the
# dense model on two ranks runs in test_main_job's deit_two_processes (the README's DeiT recipe under accelerate)
@pytest.mark.slow
def test_two_ranks_get_the_masks_of_one_process(tmp_path, vit_latency):
    table = tmp_path / "table.json"
    vit_latency.table.save(table)
    script = tmp_path / "two_rank.py"
    script.write_text(TWO_RANK_SCRIPT.format(tests=os.path.join(REPO, "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        TWO_PROCESS_LAUNCH + [str(script), str(tmp_path / "two"), "8", str(table)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), "16", str(table)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-4000:]
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert ranks[0]["kept"] == ranks[1]["kept"] == single["kept"]
    assert ranks[0]["removed"] == ranks[1]["removed"] == single["removed"]
    for name, values in single["scores"].items():
        assert ranks[0]["scores"][name] == ranks[1]["scores"][name]
        assert torch.allclose(torch.tensor(ranks[0]["scores"][name]), torch.tensor(values), rtol=1e-4, atol=1e-12), name


# --- distillation (the official DeiT loss) --------------------------------------------------------------
class RecordLoss(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.rows = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        loss = self.trainer.mdp_loss
        self.rows.append((state.global_step, loss.phase, loss.last_parts["kl"]))


def test_distillation_from_the_frozen_dense_model(tmp_path, vit_latency):
    from mdp_hf.losses import DistillationSettings

    model = build("vit")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = MDPTrainer(
        model=model,
        args=args(tmp_path, max_steps=6),
        prunable_config=config(accumulation_steps=3),
        latency_model=vit_latency,
        train_dataset=RandomImages(48),
        distillation=DistillationSettings(teacher="dense", kl_weight=10.0),
    )
    teacher = trainer.mdp_loss.teacher
    record = RecordLoss(trainer)
    trainer.add_callback(record)
    trainer.train()
    # no KL before the first pruning step (the student is the teacher), KL after it (official engine.py)
    assert [phase for _, phase, _ in record.rows] == ["warmup"] * 2 + ["finetuning"] * 4
    assert all(kl == 0 for step, _, kl in record.rows[:2]) and all(kl > 0 for _, _, kl in record.rows[3:])
    # frozen, outside the optimizer, unchanged, not saved with the student
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, dense[name]), name
    trainer.save_model(str(tmp_path / "pruned"))
    report = json.load(open(tmp_path / "pruned" / "pruning_report.json"))
    assert report["distillation"]["teacher"] == "dense" and report["distillation"]["teacher_forward_s"] > 0
    reloaded = load_pruned_model(tmp_path / "pruned")
    assert sum(p.numel() for p in reloaded.parameters()) == report["pruned_params"]


def test_deit_with_teacher_head_trains_with_hard_distillation(tmp_path):
    from mdp_hf.losses import DistillationSettings

    model = build("deit_distilled")  # returns no loss of its own
    latency = latency_model_for(model, config(), str(tmp_path / "table.json"))
    trainer = MDPTrainer(
        model=model,
        args=args(tmp_path, max_steps=4),
        prunable_config=config(accumulation_steps=2),
        latency_model=latency,
        train_dataset=RandomImages(32),
        distillation=DistillationSettings(teacher="dense", kl_weight=1.0, hard_distillation=True),
    )
    trainer.train()
    parts = trainer.mdp_loss.last_parts
    assert parts["hard"] > 0 and parts["kl"] > 0 and torch.isfinite(torch.tensor(parts["loss"]))
    # without distillation it still trains: plain CE on the labels
    plain = MDPTrainer(
        model=build("deit_distilled"),
        args=args(tmp_path, max_steps=3, output_dir=str(tmp_path / "plain")),
        prunable_config=config(accumulation_steps=2),
        latency_model=latency,
        train_dataset=RandomImages(32),
    )
    plain.train()
    assert plain.mdp_loss is not None and plain.mdp_loss.last_parts["ce"] > 0


def test_teacher_with_another_label_space_is_refused_before_training(tmp_path, vit_latency):
    from conftest import VIT_KW
    from transformers import ViTConfig, ViTForImageClassification

    from mdp_hf.losses import DistillationSettings

    ViTForImageClassification(ViTConfig(**{**VIT_KW, "num_labels": 3})).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="3.*5|5.*3"):
        MDPTrainer(
            model=build("vit"),
            args=args(tmp_path),
            prunable_config=config(),
            latency_model=vit_latency,
            train_dataset=RandomImages(8),
            distillation=DistillationSettings(teacher=str(tmp_path / "teacher")),
        )


def test_distillation_under_bf16_autocast(tmp_path, vit_latency):
    from mdp_hf.losses import DistillationSettings

    trainer = MDPTrainer(
        model=build("vit"),
        args=args(tmp_path, max_steps=4, bf16=True),
        prunable_config=config(accumulation_steps=2),
        latency_model=vit_latency,
        train_dataset=RandomImages(32),
        distillation=DistillationSettings(teacher="dense", kl_weight=1.0),
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.mdp_loss.last_parts.values())
    assert trainer.mdp_loss.last_parts["kl"] > 0


@pytest.mark.parametrize("family", [v for _, v in VARIANTS])
def test_one_shot_prune_runs_on_every_family(family):
    """prune() with the same (pixel_values, labels) batches for every family: the model's own loss, or
    cross-entropy for models without one (timm, DeiT with its teacher head), or a user's loss_fn."""
    from mdp_hf import build_space
    from mdp_hf.latency import TableLatencyModel, build_table

    model = build(family)
    space = build_space(model, group_sizes=GROUPS)
    # a synthetic, additive 'latency' (sum of the cell's widths): exact and machine-independent
    table = build_table(model, space=space, timer=lambda t, widths: float(sum(widths)), repeats=1, warmup=0,
                        progress=False, image_size=IMAGE_SIZE)  # fmt: skip
    latency = TableLatencyModel(table)
    data = RandomImages(8)
    batches = [(data.x[:4], data.y[:4]), (data.x[4:], data.y[4:])]
    if is_detector(family):  # a detector learns from boxes (its own Hungarian-matched loss)
        batches = [(data.x[:4], detection_targets(4, seed=0)), (data.x[4:], detection_targets(4, seed=1))]
    with torch.no_grad():
        out = model(data.x[:1])
    headless = not torch.is_tensor(out) and getattr(out, "logits", None) is None  # no labels to learn: own loss
    loss_fn = (lambda outputs, labels: outputs.pooler_output.pow(2).mean()) if headless else None
    pruned, result = prune(model, config(budget_fraction=0.7), batches, latency, loss_fn=loss_fn)
    assert result.predicted_latency_ms <= result.budget_ms * (1 + 1e-9)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(logits_of(pruned, data.x[:2])).all()


# --- the Hugging Face user path: best model, loggers, card, image processor ----------------------------------
@pytest.mark.parametrize("sliced", [True, False])
def test_load_best_model_at_end_exports_one_checkpoint_with_the_final_structure(tmp_path, vit_latency, sliced):
    """The best model is chosen among the evaluations after the final pruning step (step 3 here) only; the
    export is exactly that checkpoint's model (every tensor): the sliced model the checkpoint holds, or (masked
    fine-tuning) the checkpoint's dense-shaped model sliced to the final structure."""
    from transformers import ViTForImageClassification

    from mdp_hf import build_space, slice_model

    scores = {1: 0.97, 2: 0.99, 3: 0.5, 4: 0.9, 5: 0.6, 6: 0.7}  # the dense step 2 would win without the rule
    holder = {}

    def metrics(prediction):
        return {"score": scores.get(holder["trainer"].state.global_step, 0.0)}

    trainer = MDPTrainer(
        model=build("vit"),
        args=args(
            tmp_path,
            eval_strategy="steps",
            eval_steps=1,
            save_strategy="steps",
            save_steps=1,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
        ),  # fmt: skip
        prunable_config=config(slice_after_pruning=sliced),
        latency_model=vit_latency,
        train_dataset=RandomImages(48),
        eval_dataset=RandomImages(8, seed=1),
        compute_metrics=metrics,
    )
    holder["trainer"] = trainer
    trainer.train()
    best = os.path.join(str(tmp_path / "run"), "checkpoint-4")
    assert trainer.state.best_model_checkpoint == best and trainer.state.best_metric == 0.9
    out = tmp_path / "pruned"
    trainer.save_model(str(out))
    if sliced:  # the checkpoint holds the sliced model (pruned format) itself
        expected = load_pruned_model(best).state_dict()
    else:
        reference = ViTForImageClassification.from_pretrained(best)  # the checkpoint alone, converted as saved
        space = build_space(reference, group_sizes=GROUPS)
        expected = slice_model(reference, space, trainer.mdp.choice).state_dict()
    exported = load_pruned_model(out).state_dict()
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


class RecordEvents(TrainerCallback):
    """A logger as TensorBoard's callback is one: it opens its run in on_train_begin."""

    def __init__(self):
        self.events = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(("train_begin", args.output_dir))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", sorted(logs)))


def test_loggers_are_set_up_before_the_dense_evaluation_logs(tmp_path, vit_latency):
    early, late = RecordEvents(), RecordEvents()
    trainer = MDPTrainer(
        model=build("vit"),
        args=args(tmp_path, max_steps=4),
        prunable_config=config(),
        latency_model=vit_latency,
        train_dataset=RandomImages(32),
        eval_dataset=RandomImages(8, seed=1),
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
        callbacks=[early],  # as report_to's loggers: before MDPTrainer's own callback
    )
    trainer.add_callback(late)  # added after construction: set up before the dense evaluation too
    trainer.train()
    for recorder in (early, late):
        assert recorder.events[0] == ("train_begin", str(tmp_path / "run")), recorder.events[:2]
        logged = [keys for kind, keys in recorder.events if kind == "log"]
        assert any("dense_accuracy" in keys for keys in logged) and any("mdp/budget_ms" in keys for keys in logged)
    assert trainer.dense_metrics["dense_accuracy"] is not None


def test_export_saves_the_processing_class_and_merges_the_card(tmp_path, vit_latency):
    """A user script's image processor travels with the pruned model (pipeline / AutoImageProcessor offline),
    and its closing create_model_card() keeps the MDP card, adding Hub metadata written by ModelCardData."""
    from huggingface_hub import ModelCard
    from transformers import AutoImageProcessor, ViTImageProcessor, pipeline

    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3)  # fmt: skip
    trainer = MDPTrainer(
        model=build("vit"),
        args=args(tmp_path, max_steps=4),
        prunable_config=config(),
        latency_model=vit_latency,
        train_dataset=RandomImages(32),
        eval_dataset=RandomImages(8, seed=1),
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
        processing_class=processor,
    )
    trainer.train()
    out = tmp_path / "run"
    report = trainer.save_model()
    assert report == json.loads((out / "pruning_report.json").read_text()) == trainer.export_report
    card_before = ModelCard.load(out / "README.md")
    trainer.create_model_card(
        finetuned_from="google/vit-base-patch16-224", tasks="image-classification", dataset="beans",
        dataset_tags="beans", tags=["vision"], license="apache-2.0",
    )  # fmt: skip
    card = ModelCard.load(out / "README.md")
    assert card.text == card_before.text  # the MDP body stays: budget, latencies, kept dimensions
    assert f"{report['budget_ms']:.4g} ms" in card.text and "| dimension | kind | kept / size |" in card.text
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert data.base_model == "google/vit-base-patch16-224" and data.license == "apache-2.0"
    assert {"mdp_hf", "pruning", "vision"} <= set(data.tags) and data.datasets == ["beans"]
    (result,) = data.eval_results
    assert (result.metric_type, result.dataset_type) == ("accuracy", "beans")
    assert result.metric_value == pytest.approx(report["pruned_accuracy"])
    assert card_before.data.base_model is None  # a model built from a config: no base_model, never a path

    assert type(AutoImageProcessor.from_pretrained(out)).__name__ == "ViTImageProcessor"
    from PIL import Image

    image = Image.fromarray((RandomImages(1).x[0].permute(1, 2, 0).clamp(-1, 1).add(1).mul(127.5)).byte().numpy())
    predictions = pipeline("image-classification", model=str(out), trust_remote_code=True)(image)
    assert len(predictions) == 5 and {p["label"] for p in predictions} <= set(trainer.model.config.id2label.values())


USER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    mode, out, table = sys.argv[1:4]
    if mode == "refused":  # TrainingArguments set up before mdp_hf is imported: one single-process run per rank
        from transformers import TrainingArguments
        early = TrainingArguments(output_dir=out, report_to="none")
        print("device", early.device)  # (the standard example logs it): the process setup is decided now
    from mdp_hf.trainer import MDPTrainer  # a user's own script: no mdp_hf.distributed call, no use_cpu
    from transformers import TrainingArguments
    from mdp_hf.config import PrunableConfig
    from test_trainer import RandomImages
    from conftest import GROUPS, build
    cfg = PrunableConfig(budget_fraction=0.5, group_sizes=GROUPS, accumulation_steps=2, latency_table=table,
                         verify_latency=False)  # about the process setup; tests/test_latency_check.py times
    if mode == "refused":
        try:
            MDPTrainer(model=build("vit"), args=early, prunable_config=cfg, train_dataset=RandomImages(16))
        except ValueError as error:
            print("REFUSED", error)
        sys.exit(0)
    args = TrainingArguments(output_dir=out, max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3,
                             report_to="none", save_strategy="no", seed=0)
    trainer = MDPTrainer(model=build("vit"), args=args, prunable_config=cfg, train_dataset=RandomImages(16),
                         eval_dataset=RandomImages(8, seed=1))
    trainer.train()
    report = trainer.save_model()
    with open(os.path.join(out, f"rank{{args.process_index}}.json"), "w") as f:
        json.dump({{"world_size": args.world_size, "kept": trainer.mdp.choice.kept, "report": report}}, f)
""")


def test_a_users_script_under_two_processes_is_one_run_or_refused(tmp_path, vit_latency):
    """Under cpu_multiprocess.yaml (2 ranks) a user's script that imports mdp_hf.trainer before creating its
    TrainingArguments trains as one run of two ranks (one export, by rank 0); one whose TrainingArguments were
    set up for a single process is refused at construction, saying what to set."""
    table = tmp_path / "table.json"
    vit_latency.table.save(table)
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT.format(tests=os.path.join(REPO, "tests")))
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        os.path.join(REPO, "recipes", "accelerate_configs", "cpu_multiprocess.yaml"), str(script),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run(launch + ["train", str(tmp_path / "out"), str(table)], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["kept"] == ranks[1]["kept"]
    assert ranks[0]["report"]["world_size"] == 2 and ranks[1]["report"] is None  # rank 0 exported, alone
    assert load_pruned_model(tmp_path / "out").config.model_type == "mdp_vit"

    refused = subprocess.run(launch + ["refused", str(tmp_path / "refused"), str(table)], capture_output=True,
                             text=True, env=env, timeout=600)  # fmt: skip
    assert refused.returncode == 0, refused.stderr[-4000:]
    assert refused.stdout.count("REFUSED") == 2 and "use_cpu=True" in refused.stdout
    assert "WORLD_SIZE=2" in refused.stdout and "ACCELERATE_USE_CPU=true" in refused.stdout
