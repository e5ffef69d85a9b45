"""Fine-tuning at the pruned model's speed: after the last pruning step MDPTrainer continues on the sliced model
(PrunableConfig.slice_after_pruning), with the optimizer state sliced along; it must train exactly as masked
fine-tuning does, checkpoint and resume the sliced model, and fall back to masks (saying why) when the optimizer
state cannot be sliced exactly."""

import json
import logging
import os
import random
import subprocess
import textwrap

import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, TWO_PROCESS_LAUNCH, VARIANTS, build, logits_of
from safetensors.torch import load_file
from test_trainer import REPO, RandomImages, args, config
from transformers import TrainerCallback

from mdp_hf import build_space, slice_model
from mdp_hf.adapters import PruningChoice
from mdp_hf.hub import load_pruned_model
from mdp_hf.optimizer_state import torch_optimizer
from mdp_hf.pruning import latency_model_for
from mdp_hf.surgery import parameter_sources
from mdp_hf.trainer import MDPTrainer

PRUNE_AT = 3  # config(): accumulation_steps=3, one-shot
PROBE = RandomImages(4, seed=5).x


@pytest.fixture(scope="module")
def vit_latency(tmp_path_factory):
    return latency_model_for(build("vit"), config(), str(tmp_path_factory.mktemp("lat") / "table.json"))


def random_choice(space, seed=0):
    rng = random.Random(seed)
    kept = {}
    for name, dim in space.dimensions.items():
        width = rng.choice(dim.widths())
        kept[name] = sorted(rng.sample(range(dim.size), width))
    return PruningChoice(kept=kept)


@pytest.mark.parametrize("variant", [v for _, v in VARIANTS])
def test_parameter_sources_name_the_entries_every_sliced_parameter_is_cut_from(variant):
    """The optimizer state follows the weights through the family's own slicing: each sliced parameter is the
    gather, by the reported indices, of one gated parameter, for every registered family."""
    model = build(variant)
    space = build_space(model, group_sizes=GROUPS)
    choice = random_choice(space)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sources = parameter_sources(model, space, choice)
    sliced = slice_model(model, space, choice)
    params = dict(model.named_parameters())
    assert sources.keys() == dict(sliced.named_parameters()).keys()
    for name, param in sliced.named_parameters():
        source, index = sources[name]
        assert index.shape == param.shape, name
        assert torch.equal(params[source].detach().flatten()[index], param.detach()), name
    for name, param in model.named_parameters():  # the model comes back as it was, dtype included
        assert torch.equal(param, before[name]) and param.dtype == before[name].dtype, name


def train(tmp_path, latency, sliced, out="run", optimizers=None, model=None, pruning=None, **overrides):
    """An MDPTrainer on the tiny ViT (or ``model``); ``pruning``: PrunableConfig fields over test_trainer's config();
    ``overrides``: TrainingArguments fields."""
    settings = dict(max_steps=7, weight_decay=0.05, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer = MDPTrainer(
        model=model if model is not None else build("vit"),
        args=args(tmp_path, output_dir=str(tmp_path / out), disable_tqdm=True, **{**settings, **overrides}),
        prunable_config=config(slice_after_pruning=sliced, **(pruning or {})),
        latency_model=latency,
        train_dataset=RandomImages(96),
        optimizers=optimizers or (None, None),
    )
    return trainer


def logits(model):
    with torch.no_grad():
        return model.eval()(PROBE).logits


@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
def test_finetuning_the_sliced_model_matches_masked_finetuning(tmp_path, vit_latency, optimizer):
    """Four optimizer steps after slicing (gradient accumulation 2, weight decay) give the logits of four steps of
    masked fine-tuning; the optimizer keeps its groups (weight-decay membership), learning rate and step count,
    its per-entry state is the masked run's on the kept entries, and the sliced model is what training ran on."""
    runs = {}
    for sliced in (False, True):
        model = build("vit")
        optimizers = None
        if optimizer == "sgd_momentum":
            decay = [p for n, p in model.named_parameters() if "layernorm" not in n and not n.endswith("bias")]
            rest = [p for n, p in model.named_parameters() if "layernorm" in n or n.endswith("bias")]
            sgd = torch.optim.SGD([{"params": decay, "weight_decay": 0.05}, {"params": rest}], lr=0.05, momentum=0.9)
            optimizers = (sgd, None)
        trainer = train(tmp_path, vit_latency, sliced, out=f"run{sliced}", model=model, optimizers=optimizers)
        trainer.train()
        runs[sliced] = trainer
    masked, sliced = runs[False], runs[True]
    assert not masked._sliced and sliced._sliced
    assert type(sliced.model).__name__ == "MDPViTForImageClassification"
    assert type(masked.model).__name__ == "ViTForImageClassification"
    assert (logits(sliced.mdp.export()) - logits(masked.mdp.export())).abs().max() < 1e-5
    assert torch.equal(logits(sliced.mdp.export()), logits(sliced.model))  # the export is the trained model

    sources = parameter_sources(masked.model, masked.mdp.space, masked.mdp.choice)
    gated = dict(masked.model.named_parameters())
    new = {id(p): n for n, p in sliced.model.named_parameters()}
    old = {id(p): n for n, p in masked.model.named_parameters()}
    opt_m, opt_s = torch_optimizer(masked.optimizer), torch_optimizer(sliced.optimizer)
    assert len(opt_m.param_groups) == len(opt_s.param_groups) >= 2
    for group_m, group_s in zip(opt_m.param_groups, opt_s.param_groups):
        assert {k: v for k, v in group_m.items() if k != "params"} == {
            k: v for k, v in group_s.items() if k != "params"
        }
        members = {old[id(p)] for p in group_m["params"]}
        assert all(id(p) in new for p in group_s["params"])  # only the sliced model's parameters are optimized
        assert {sources[new[id(p)]][0] for p in group_s["params"]} <= members  # each in its source's group
    assert sum(len(g["params"]) for g in opt_s.param_groups) == len(list(sliced.model.parameters()))
    for param in (p for g in opt_s.param_groups for p in g["params"]):
        name = new[id(param)]
        source, index = sources[name]
        state_m, state_s = opt_m.state[gated[source]], opt_s.state[param]
        assert state_m.keys() == state_s.keys() and state_s, name
        for key, value in state_s.items():
            if value.dim() == 0:
                assert torch.equal(value, state_m[key]), (name, key)  # the step count continues
            else:
                assert value.shape == param.shape
                assert torch.allclose(value, state_m[key].flatten()[index], rtol=1e-3, atol=1e-7), (name, key)
    assert sliced.lr_scheduler.get_last_lr() == masked.lr_scheduler.get_last_lr()
    assert sliced.state.global_step == masked.state.global_step == 7


def test_sliced_checkpoints_resume_bit_identically_before_and_after_slicing(tmp_path, vit_latency):
    """Checkpoints after slicing hold the sliced model (pruned format: config + safetensors), its optimizer state
    and the pruning state; resuming from a checkpoint before slicing (step 2) and from one after it (step 5)
    continues exactly as the uninterrupted run."""
    straight = train(tmp_path, vit_latency, True, out="straight", save_strategy="steps", save_steps=1)
    straight.train()
    before, after = tmp_path / "straight" / "checkpoint-2", tmp_path / "straight" / "checkpoint-5"
    assert not json.loads((before / "mdp_state.json").read_text())["sliced"]
    assert json.loads((after / "mdp_state.json").read_text())["sliced"]
    assert json.loads((before / "config.json").read_text())["model_type"] == "vit"
    assert json.loads((after / "config.json").read_text())["model_type"] == "mdp_vit"
    saved = load_pruned_model(after)
    assert sum(p.numel() for p in saved.parameters()) < sum(p.numel() for p in build("vit").parameters())
    weights = load_file(after / "model.safetensors")
    optimizer_state = torch.load(after / "optimizer.pt", weights_only=True)
    params = [p for g in torch_optimizer(straight.optimizer).param_groups for p in g["params"]]
    assert [tuple(s["exp_avg"].shape) for s in optimizer_state["state"].values()] == [tuple(p.shape) for p in params]
    assert sum(w.numel() for w in weights.values()) == sum(p.numel() for p in saved.parameters())

    final = {k: v.clone() for k, v in straight.model.state_dict().items()}
    final_optimizer = torch_optimizer(straight.optimizer).state_dict()
    for checkpoint in (before, after):
        resumed = train(tmp_path, vit_latency, True, out=f"resumed-{checkpoint.name}")
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed._sliced and resumed.state.global_step == 7
        state = resumed.model.state_dict()
        assert state.keys() == final.keys()
        for name, tensor in final.items():
            assert torch.equal(state[name], tensor), (checkpoint.name, name)
        resumed_optimizer = torch_optimizer(resumed.optimizer).state_dict()
        assert resumed_optimizer["param_groups"] == final_optimizer["param_groups"]
        for index, entry in final_optimizer["state"].items():
            for key, value in entry.items():
                assert torch.equal(resumed_optimizer["state"][index][key], value), (checkpoint.name, index, key)


def test_evaluation_and_export_after_slicing_use_the_sliced_model(tmp_path, vit_latency):
    """Evaluation after slicing runs the trained sliced model (the gated model is not trained any more), and
    save_model writes that model without slicing again."""
    trainer = MDPTrainer(
        model=build("vit"),
        args=args(tmp_path, max_steps=5, eval_strategy="steps", eval_steps=1, disable_tqdm=True),
        prunable_config=config(),
        latency_model=vit_latency,
        train_dataset=RandomImages(48),
        eval_dataset=RandomImages(8, seed=1),
    )
    trainer.train()
    data = RandomImages(8, seed=1)
    with torch.no_grad():
        live = trainer.model.eval()(pixel_values=data.x, labels=data.y).loss.item()
        stale = trainer.mdp.model.eval()(pixel_values=data.x, labels=data.y).loss.item()
    assert live != pytest.approx(stale, rel=1e-6)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(live, rel=1e-5)
    trainer.save_model(str(tmp_path / "pruned"))
    exported = logits(load_pruned_model(tmp_path / "pruned"))
    assert torch.equal(exported, logits(trainer.model))
    stale = slice_model(trainer.mdp.model, trainer.mdp.space, trainer.mdp.choice)  # the gated model, sliced now
    assert not torch.allclose(exported, logits(stale), atol=1e-6)


class OnlyKnownToItself(torch.optim.SGD):
    """An optimizer class MDPTrainer does not know (its update may read more than each entry's own state)."""


def test_optimizer_that_cannot_be_sliced_falls_back_to_masks_with_a_warning(tmp_path, vit_latency, caplog):
    model = build("vit")
    optimizer = OnlyKnownToItself(model.parameters(), lr=1e-3, momentum=0.9)
    trainer = train(tmp_path, vit_latency, True, model=model, optimizers=(optimizer, None), max_steps=4)
    with caplog.at_level(logging.WARNING, logger="mdp_hf.trainer"):
        trainer.train()
    assert not trainer._sliced and trainer.model is model  # fine-tuned masked, with its own state
    assert "OnlyKnownToItself" in caplog.text and "masked" in caplog.text
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    trainer.save_model(str(tmp_path / "pruned"))  # the masked model's export still works
    assert load_pruned_model(tmp_path / "pruned").config.model_type == "mdp_vit"


def test_parameter_shared_across_kept_units_falls_back_to_masks(tmp_path, vit_latency, caplog):
    """The patch projection's bias tied to the final LayerNorm's (both embedding-wide, both always kept): its
    kept entries would land twice in the sliced model, where one optimizer state per entry cannot follow both
    copies; fine-tuning goes on masked, saying which parameter."""
    model = build("vit")
    model.vit.layernorm.bias = model.vit.embeddings.patch_embeddings.projection.bias
    trainer = train(tmp_path, vit_latency, True, model=model, max_steps=4)
    with caplog.at_level(logging.WARNING, logger="mdp_hf.trainer"):
        trainer.train()
    assert not trainer._sliced and trainer.model is model
    assert "vit.embeddings.patch_embeddings.projection.bias" in caplog.text and "masked" in caplog.text


TWO_RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from mdp_hf.distributed import use_cpu_ranks_without_gpu
    use_cpu_ranks_without_gpu()
    import torch
    from transformers import TrainingArguments
    from mdp_hf.config import PrunableConfig
    from mdp_hf.trainer import MDPTrainer
    from test_trainer import RandomImages
    from conftest import GROUPS, build
    out, table = sys.argv[1], sys.argv[2]
    probe = RandomImages(4, seed=5).x
    result = {{}}
    for sliced in (False, True):
        # iterative, two steps (2 and 4): the sliced run slices after each of them
        cfg = PrunableConfig(budget_fraction=0.6, group_sizes=GROUPS, accumulation_steps=2, latency_table=table,
                             verify_latency=False, slice_after_pruning=sliced, schedule="iterative",
                             num_pruning_steps=2, pruning_interval=2)
        args = TrainingArguments(output_dir=os.path.join(out, str(sliced)), max_steps=7, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-3, weight_decay=0.05,
                                 report_to="none", save_strategy="no", seed=0, disable_tqdm=True)
        trainer = MDPTrainer(model=build("vit"), args=args, prunable_config=cfg, train_dataset=RandomImages(96))
        trainer.train()
        assert trainer._sliced == sliced
        result["choices" + str(sliced)] = [r.choice.to_json() for r in trainer.mdp.results]
        with torch.no_grad():
            result[str(sliced)] = trainer.mdp.export().eval()(probe).logits.tolist()
        result["world_size"] = args.world_size
    with open(os.path.join(out, f"rank{{args.process_index}}.json"), "w") as f:
        json.dump(result, f)
""")


def test_two_ranks_finetune_the_same_sliced_model_as_masked_finetuning(tmp_path, vit_latency):
    table = tmp_path / "table.json"
    vit_latency.table.save(table)
    script = tmp_path / "two_rank.py"
    script.write_text(TWO_RANK_SCRIPT.format(tests=os.path.join(REPO, "tests")))
    run = subprocess.run(
        TWO_PROCESS_LAUNCH + [str(script), str(tmp_path), str(table)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["True"] == ranks[1]["True"]  # every rank holds the same sliced model
    assert ranks[0]["choicesTrue"] == ranks[0]["choicesFalse"] == ranks[1]["choicesTrue"]
    masked, sliced = torch.tensor(ranks[0]["False"]), torch.tensor(ranks[0]["True"])
    assert (sliced - masked).abs().max() < 1e-5


# slicing at every step of the monotone iterative schedule ------------------------------------------------------------
def smaller_choice(space, choice, seed):
    """A random choice keeping a subset of what ``choice`` kept (more blocks removed, fewer units kept)."""
    rng = random.Random(seed)
    kept = {}
    for name, dim in space.dimensions.items():
        before = choice.kept_indices(space, name)
        width = rng.choice([w for w in dim.widths() if w <= len(before)])
        kept[name] = sorted(rng.sample(before, width))
    removed = sorted(set(choice.removed_blocks) | {b for b in space.blocks if rng.random() < 0.3})
    return PruningChoice(kept=kept, removed_blocks=removed)


@pytest.mark.parametrize("variant", [v for _, v in VARIANTS])
def test_a_sliced_model_sliced_again_is_the_dense_model_sliced_once(variant):
    """The monotone schedule slices the model trained so far after every step: for every registered family the
    sliced model keeps the dense model's dimension and block names (kept units in order), so a later choice over
    the dense space translates onto it, and slicing twice gives the parameters, buffers, structure and entry
    sources and outputs of slicing the dense model once."""
    from mdp_hf.surgery import choice_on_sliced, compose_sources

    model = build(variant)
    space = build_space(model, group_sizes=GROUPS)
    first = random_choice(space, seed=1)
    first.removed_blocks = [b for b in space.blocks if random.Random(2).random() < 0.3]
    second = smaller_choice(space, first, seed=3)
    live = slice_model(model, space, first)
    live_space = build_space(live, group_sizes=GROUPS)
    on_live = choice_on_sliced(space, first, second, live_space)
    twice = slice_model(live, live_space, on_live)
    once = slice_model(model, space, second)
    # (their configs may spell the same structure differently: per-layer entries against shared defaults)
    assert type(twice) is type(once)
    state_twice, state_once = twice.state_dict(), once.state_dict()
    assert state_twice.keys() == state_once.keys()
    for name, tensor in state_once.items():
        assert torch.equal(state_twice[name], tensor), name
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(logits_of(twice.eval(), x), logits_of(once.eval(), x))
    composed = compose_sources(parameter_sources(model, space, first), parameter_sources(live, live_space, on_live))
    direct = parameter_sources(model, space, second)
    assert composed.keys() == direct.keys()
    for name, (source, index) in direct.items():
        assert composed[name][0] == source and torch.equal(composed[name][1], index), name


def test_a_choice_that_brings_pruned_units_back_is_refused_on_the_sliced_model():
    from mdp_hf.surgery import ChoiceNotTranslatable, choice_on_sliced

    model = build("vit")
    space = build_space(model, group_sizes=GROUPS)
    first = random_choice(space, seed=1)
    live_space = build_space(slice_model(model, space, first), group_sizes=GROUPS)
    name = next(n for n in space.dimensions if len(first.kept_indices(space, n)) < space.dimensions[n].size)
    back = PruningChoice(kept={**first.kept, name: list(range(space.dimensions[name].size))})
    with pytest.raises(ChoiceNotTranslatable, match=f"{name}.*not monotone"):
        choice_on_sliced(space, first, back, live_space)


ITERATIVE = dict(schedule="iterative", num_pruning_steps=3, pruning_interval=2, accumulation_steps=2)


class LiveSize(TrainerCallback):
    """The number of parameters of the model being trained, after every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.sizes = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.sizes.append(sum(p.numel() for p in self.trainer.model.parameters()))


def iterative_run(tmp_path, variant, latency, sliced, out, pruning=None, **overrides):
    """:func:`train` on the iterative schedule for 9 steps, recording the trained model's size after every step."""
    # the tiny ResNet's stem (never pruned) is most of its latency
    budget = 0.8 if variant.startswith("resnet") else 0.6
    pruning = dict(budget_fraction=budget, **ITERATIVE, **(pruning or {}))
    trainer = train(tmp_path, latency, sliced, out, model=build(variant), pruning=pruning, max_steps=9, **overrides)
    sizes = LiveSize(trainer)
    trainer.add_callback(sizes)
    return trainer, sizes


@pytest.mark.parametrize("variant", ["vit", "resnet_bottleneck"])
def test_iterative_schedule_trains_a_smaller_sliced_model_after_every_step_as_masked_training(tmp_path, variant):
    """With the monotone iterative schedule training moves onto the sliced model after every pruning step (steps
    2, 4, 6), each interval on a smaller model than the last, and takes exactly the masked run's path: the same
    choice at every step (scores read in the gated model's coordinates) and the same logits at the end (< 1e-4;
    AdamW, weight decay, gradient accumulation 2)."""
    latency = latency_model_for(build(variant), config(), str(tmp_path / "table.json"))
    runs = {}
    for sliced in (False, True):
        trainer, sizes = iterative_run(tmp_path, variant, latency, sliced, out=f"run{sliced}")
        trainer.train()
        runs[sliced] = trainer, sizes.sizes
    (masked, masked_sizes), (sliced, sliced_sizes) = runs[False], runs[True]
    assert sliced._sliced and not masked._sliced
    assert [r.choice for r in sliced.mdp.results] == [r.choice for r in masked.mdp.results]
    dense = masked_sizes[0]
    assert set(masked_sizes) == {dense}  # masked: the dense-shaped model throughout
    # steps 1: dense; after the pruning steps at 2, 4 and 6 a smaller model each time
    assert sliced_sizes[0] == dense and dense > sliced_sizes[1] > sliced_sizes[3] > sliced_sizes[5]
    assert sliced_sizes[1] == sliced_sizes[2] and sliced_sizes[3] == sliced_sizes[4]
    assert sliced_sizes[5:] == [sum(p.numel() for p in sliced.mdp.export().parameters())] * 4
    # 9 steps of training apart, summed in other orders (BatchNorm batch statistics over sliced channels): 1.3e-5
    # seen for the ResNet at one thread; a wrongly sliced optimizer state moves the logits by ~lr = 1e-3
    assert (logits(sliced.mdp.export()) - logits(masked.mdp.export())).abs().max() < 1e-4


def test_iterative_schedule_resumes_bit_identically_between_sliced_steps(tmp_path, vit_latency):
    """Checkpoints between pruning steps hold the sliced model of the last step (pruned format), its optimizer
    state and the pruning state; resuming from one after the first step (3) and from one after the second (5)
    continues exactly as the uninterrupted run, which slices the model trained so far at every step."""
    straight, _ = iterative_run(tmp_path, "vit", vit_latency, True, out="straight", save_strategy="steps", save_steps=1)
    straight.train()
    for step in (3, 5):
        meta = json.loads((tmp_path / "straight" / f"checkpoint-{step}" / "mdp_state.json").read_text())
        assert meta["sliced"] and len(meta["results"]) == step // 2
    final = {k: v.clone() for k, v in straight.model.state_dict().items()}
    final_optimizer = torch_optimizer(straight.optimizer).state_dict()
    for step in (3, 5):
        resumed, _ = iterative_run(tmp_path, "vit", vit_latency, True, out=f"resumed-{step}")
        resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / f"checkpoint-{step}"))
        assert [r.choice for r in resumed.mdp.results] == [r.choice for r in straight.mdp.results]
        state = resumed.model.state_dict()
        assert state.keys() == final.keys()
        for name, tensor in final.items():
            assert torch.equal(state[name], tensor), (step, name)
        resumed_optimizer = torch_optimizer(resumed.optimizer).state_dict()
        assert resumed_optimizer["param_groups"] == final_optimizer["param_groups"]
        for index, entry in final_optimizer["state"].items():
            for key, value in entry.items():
                assert torch.equal(resumed_optimizer["state"][index][key], value), (step, index, key)


def test_scores_from_gate_gradients_slice_after_the_last_step_only(tmp_path, vit_latency):
    """Gate-gradient scores (importance="taylor_gates") need the gated model, so the iterative schedule trains it
    masked until the last step and only then moves onto the sliced model."""
    trainer, sizes = iterative_run(tmp_path, "vit", vit_latency, True, "gates", pruning={"importance": "taylor_gates"})
    trainer.train()
    assert trainer._sliced
    assert len(set(sizes.sizes[:5])) == 1 and sizes.sizes[5] < sizes.sizes[4]
