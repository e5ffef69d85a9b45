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
from conftest import GROUPS, TWO_PROCESS_LAUNCH, VARIANTS, build
from safetensors.torch import load_file
from test_trainer import REPO, RandomImages, args, config

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


def train(tmp_path, latency, sliced, out="run", optimizers=None, model=None, **overrides):
    settings = dict(max_steps=7, weight_decay=0.05, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer = MDPTrainer(
        model=model if model is not None else build("vit"),
        args=args(tmp_path, output_dir=str(tmp_path / out), disable_tqdm=True, **{**settings, **overrides}),
        prunable_config=config(slice_after_pruning=sliced),
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
        cfg = PrunableConfig(budget_fraction=0.6, group_sizes=GROUPS, accumulation_steps=3, latency_table=table,
                             verify_latency=False, slice_after_pruning=sliced)
        args = TrainingArguments(output_dir=os.path.join(out, str(sliced)), max_steps=7, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-3, weight_decay=0.05,
                                 report_to="none", save_strategy="no", seed=0, disable_tqdm=True)
        trainer = MDPTrainer(model=build("vit"), args=args, prunable_config=cfg, train_dataset=RandomImages(96))
        trainer.train()
        assert trainer._sliced == sliced
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
    masked, sliced = torch.tensor(ranks[0]["False"]), torch.tensor(ranks[0]["True"])
    assert (sliced - masked).abs().max() < 1e-5
