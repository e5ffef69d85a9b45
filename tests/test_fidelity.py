"""Fidelity to the official MDP code (NVlabs/MDP): scores, shared-width split, monotone pruning, stem, groups.

Each test computes what the official code computes, in the official code's own tensor layout where it
differs from ours, and compares it with mdp_hf. See docs/fidelity.md for the file and line of each rule.
"""

import numpy as np
import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, build
from transformers import ResNetConfig, ResNetForImageClassification

from mdp_hf import build_space, get_adapter
from mdp_hf.adapters import PruningSpaceError
from mdp_hf.config import PrunableConfig
from mdp_hf.latency.models import LatencyTermSpec
from mdp_hf.masks import build_problem
from mdp_hf.presets import GROUP_SIZE_PRESETS
from mdp_hf.pruning import PruningSession


class ProductLatency:
    """An analytic latency model (cost = product of the widths a term depends on), so that these tests
    exercise scores and schedules without timing anything. Not the latency stage under test."""

    def solver_terms(self, space):
        terms = [LatencyTermSpec("constant", [], np.array(1e-5), None)]
        for name, block in space.blocks.items():
            dims = [d for d in block.dims][:3]
            grids = np.meshgrid(*[np.array(space.dimensions[d].widths(), dtype=float) for d in dims], indexing="ij")
            table = np.prod(grids, axis=0) if grids else np.array(1.0)
            terms.append(LatencyTermSpec(name, dims, 1e-3 * table / table.max() + 1e-4, name))
        for name, dim in space.dimensions.items():
            if dim.block is None:
                terms.append(LatencyTermSpec(name, [name], 1e-3 * np.array(dim.widths(), dtype=float) / dim.size, None))
        return terms


def backward_once(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    model.zero_grad(set_to_none=True)
    out = model(pixel_values=x, labels=y)
    out.loss.backward()


# --- 1. ViT scores as the official DeiT engine computes them -----------------------------------------------
def official_vit_unit_sums(model):
    """pruning_engine_general_minlp.py method 23 on deit/models.py's layout: Q/K/V are MHLinear with weight
    [d, E, H] and bias [d, H]; o_proj is MHTLinear [E, d, H]; sums of w * dL/dw along each linked axis."""
    base = model.deit if hasattr(model, "deit") else model.vit
    wg = lambda p: (p.detach() * p.grad).double()  # noqa: E731
    proj = base.embeddings.patch_embeddings.projection
    emb = wg(proj.weight).reshape(proj.weight.shape[0], -1).sum(1) + wg(proj.bias)
    out, depth = {}, len(base.layers)
    for i, layer in enumerate(base.layers):
        attn = layer.attention
        H = attn.num_attention_heads
        d = attn.q_proj.out_features // H

        def mh(linear):  # '(h q) e -> q e h' and '(h q) -> q h', as the official checkpoint conversion
            w = wg(linear.weight).reshape(H, d, -1).permute(1, 2, 0)
            b = wg(linear.bias).reshape(H, d).permute(1, 0)
            return w, b

        (qw, qb), (kw, kb), (vw, vb) = mh(attn.q_proj), mh(attn.k_proj), mh(attn.v_proj)
        # heads: head_mask (contributes 0) + Q, K, V along dim 2 (weights) / dim 1 (biases); /6 then /2
        head = sum(
            w.permute(2, 0, 1).reshape(H, -1).sum(1) + b.permute(1, 0).sum(1) for w, b in ((qw, qb), (kw, kb), (vw, vb))
        )
        out[f"layers.{i}.heads"] = head / 6 / 2
        out[f"layers.{i}.qk_dim"] = (qw.reshape(d, -1).sum(1) + qb.sum(1)) / 2  # Q only (K is not linked)
        out[f"layers.{i}.v_dim"] = (vw.reshape(d, -1).sum(1) + vb.sum(1)) / 2
        fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
        out[f"layers.{i}.mlp_dim"] = wg(fc1.weight).sum(1) + wg(fc1.bias)  # / 1
        # embedding: proj (dim 0 + bias), fc1 (dim 1), fc2 (dim 0 + bias), Q, K, V (dim 1)
        emb = emb + wg(attn.o_proj.weight).sum(1) + wg(attn.o_proj.bias)
        emb = emb + wg(fc1.weight).sum(0) + wg(fc2.weight).sum(1) + wg(fc2.bias)
        emb = emb + sum(w.permute(1, 0, 2).reshape(w.shape[1], -1).sum(1) for w in (qw, kw, vw))
    out["embed"] = emb / depth
    return out


@pytest.mark.parametrize("family", ["deit", "vit"])
def test_vit_scores_equal_the_official_formula(family):
    model = build(family).train()
    space = build_space(model, group_sizes=GROUPS)
    session = PruningSession(model, PrunableConfig(budget_fraction=0.6, group_sizes=GROUPS), ProductLatency())
    backward_once(model)
    ours = session.step_scores()
    official = official_vit_unit_sums(model)
    assert set(official) == set(space.dimensions)
    for name, expected in official.items():
        assert torch.allclose(ours[name], expected, rtol=1e-6, atol=1e-12), name
    # accumulated per step as the square (official: criteria.pow(2) per iteration, mean over the interval)
    session.accumulate()
    backward_once(model, seed=1)
    second = official_vit_unit_sums(model)
    session.accumulate()
    committed = session.scores.commit()
    for name in official:
        assert torch.allclose(committed[name], (official[name] ** 2 + second[name] ** 2) / 2, rtol=1e-6), name
    # the gate-gradient score (the "taylor_gates" ablation, and mdp_hf before) differs for heads: V side only
    session.gates.remove()
    gated = PruningSession(
        model, PrunableConfig(budget_fraction=0.6, group_sizes=GROUPS, importance="taylor_gates"), ProductLatency()
    )
    backward_once(model)
    heads_by_gates = gated.step_scores()["layers.0.heads"]
    assert not torch.allclose(heads_by_gates, official_vit_unit_sums(model)["layers.0.heads"], rtol=1e-2)
    gated.gates.remove()


def test_vit_embedding_is_never_charged_to_blocks():
    model = build("deit")
    space = build_space(model, group_sizes=GROUPS)
    scores = {name: np.random.default_rng(0).random(dim.size) for name, dim in space.dimensions.items()}
    problem = build_problem(space, scores, ProductLatency().solver_terms(space), 1.0)
    embed_terms = [t for t in problem.objective_terms if t.dim == "embed"]
    assert len(embed_terms) == 1 and embed_terms[0].block is None


# --- 2. shared CNN widths: split in proportion to each member's own score -----------------------------------
def bn_taylor(norm):
    return (norm.weight.detach() * norm.weight.grad + norm.bias.detach() * norm.bias.grad).double()


def test_resnet_residual_width_split_among_its_writers():
    model = build("resnet_bottleneck").train()
    session = PruningSession(model, PrunableConfig(budget_fraction=0.6, group_sizes=GROUPS), ProductLatency())
    backward_once(model)
    session.accumulate()
    committed = {k: v.numpy() for k, v in session.scores.commit().items()}
    stage = model.resnet.encoder.stages[1]
    writers = [(None, stage.layers[0].shortcut.normalization)] + [
        (f"stages.1.layers.{j}", layer.layer[-1].normalization) for j, layer in enumerate(stage.layers)
    ]
    signed = [bn_taylor(norm) for _, norm in writers]
    combined = sum(signed).abs()  # official calc_importance: |sum over the group of gamma g + beta g|
    assert np.allclose(committed["stages.1.residual"], combined.numpy())
    magnitudes = [s.abs() for s in signed]
    total = sum(magnitudes)
    shares = dict(session.share_keys)["stages.1.residual"]
    assert [block for _, block in shares] == [block for block, _ in writers]  # readers (next stage's conv1) carry none
    for (key, block), magnitude in zip(shares, magnitudes):
        assert np.allclose(committed[key], (combined * magnitude / total).numpy()), block
    # in the problem, each share is an objective term of its own block (the shortcut's: outside every block)
    space = session.space
    problem = build_problem(
        space,
        {n: committed[n] for n in space.dimensions},
        ProductLatency().solver_terms(space),
        1.0,
        shares={"stages.1.residual": [(b, committed[k]) for k, b in shares]},
    )
    terms = [t for t in problem.objective_terms if t.dim == "stages.1.residual"]
    assert [t.block for t in terms] == [block for block, _ in writers]
    assert sum(t.values[-1] for t in terms) == pytest.approx(
        committed["stages.1.residual"].sum() * problem.metadata["importance_scale"]
    )
    session.gates.remove()


# --- 3. monotone iterative pruning ------------------------------------------------------------------------
@pytest.mark.parametrize("monotone", [True, False])
def test_pruned_units_never_come_back(monotone):
    model = build("deit").train()
    cfg = PrunableConfig(
        budget_fraction=0.5, group_sizes=GROUPS, schedule="iterative", num_pruning_steps=2, monotone=monotone
    )
    session = PruningSession(model, cfg, ProductLatency())
    backward_once(model)
    session.accumulate()
    first = session.prune_step().choice
    # make every pruned unit the most important one: a non-monotone step would bring them back
    pruned = {
        n: sorted(set(range(d.size)) - set(first.kept_indices(session.space, n)))
        for n, d in session.space.dimensions.items()
    }
    session.scores.count = 1
    for name, units in pruned.items():
        session.scores.sums[name].zero_()
        session.scores.sums[name][units] = 1e6
    session.scores.ema = None
    second = session.prune_step().choice
    revived = {
        n: set(second.kept_indices(session.space, n)) - set(first.kept_indices(session.space, n)) for n in pruned
    }
    if monotone:
        assert not any(revived.values()), revived
        assert set(first.removed_blocks) <= set(second.removed_blocks)
    else:
        assert any(revived.values())
    session.gates.remove()


def test_monotone_problem_is_sliced_to_the_active_widths():
    model = build("deit")
    space = build_space(model, group_sizes=GROUPS)
    scores = {name: np.random.default_rng(1).random(dim.size) for name, dim in space.dimensions.items()}
    terms = ProductLatency().solver_terms(space)
    full = build_problem(space, scores, terms, 1.0)
    from mdp_hf.adapters import PruningChoice

    active = PruningChoice(
        {"layers.0.mlp_dim": list(range(0, 64, 2)), "embed": list(range(20))}, ["layers.1.attention"]
    )
    problem = build_problem(space, scores, terms, 1.0, active=active)
    widths = {d.name: d.widths for d in problem.dimensions}
    assert max(widths["layers.0.mlp_dim"]) == 32 and max(widths["embed"]) == 20
    assert problem.fixed_blocks == {"layers.1.attention": False}
    by_name = {t.name: t for t in problem.latency_terms}
    full_by_name = {t.name: t for t in full.latency_terms}
    mlp = by_name["layers.0.mlp"]
    assert mlp.table.shape == tuple(len(widths[d]) for d in mlp.dims)
    assert np.array_equal(
        mlp.table, full_by_name["layers.0.mlp"].table[tuple(slice(0, len(widths[d])) for d in mlp.dims)]
    )


# --- 4. ResNet stem, per-layer group sizes, presets -------------------------------------------------------
def test_resnet_stem_keeps_full_width_unless_asked():
    model = build("resnet_bottleneck")
    space = build_space(model, group_sizes=GROUPS)
    scores = {name: np.random.default_rng(2).random(dim.size) for name, dim in space.dimensions.items()}
    terms = ProductLatency().solver_terms(space)
    problem = build_problem(space, scores, terms, 1.0, keep_full=get_adapter(model).stem_dimensions)
    index = {d.name: i for i, d in enumerate(problem.dimensions)}
    assert problem.fixed_choices["stem"] == len(problem.dimensions[index["stem"]].widths) - 1
    assert "stem" not in build_problem(space, scores, terms, 1.0).fixed_choices
    session = PruningSession(model, PrunableConfig(budget_fraction=0.5, group_sizes=GROUPS), ProductLatency())
    assert session.keep_full == ["stem"]
    session.gates.remove()
    session = PruningSession(
        model, PrunableConfig(budget_fraction=0.5, group_sizes=GROUPS, prune_stem=True), ProductLatency()
    )
    assert session.keep_full == []
    session.gates.remove()


def test_group_sizes_by_name_glob_and_kind():
    model = build("resnet_bottleneck")
    space = build_space(
        model, group_sizes={"channels": 1, "stages.*.conv1": 2, "stages.0.layers.1.conv1": 4, "residual": 8}
    )
    sizes = {n: d.group_size for n, d in space.dimensions.items()}
    assert sizes["stages.0.layers.1.conv1"] == 4  # exact name beats the glob
    assert sizes["stages.0.layers.0.conv1"] == 2 and sizes["stages.2.layers.0.conv1"] == 2  # glob beats the kind
    assert sizes["stages.0.layers.0.conv2"] == 1 and sizes["stages.1.residual"] == 8
    with pytest.raises(PruningSpaceError, match="matches no dimension.*stages"):
        build_space(model, group_sizes={"layer1.*.conv1": 4})


def test_resnet50_preset_is_the_official_file():
    # the official resnet50_group_size.json, keyed by torchvision names
    official = {"module.conv1": 2}
    inner = {
        1: [(32, 32, 64)] * 3,
        2: [(32, 32, 64)] * 4,
        3: [(64, 64, 64)] + [(128, 32, 64)] * 5,
        4: [(64, 64, 64), (32, 32, 128), (32, 32, 128)],
    }
    downsample = {1: 64, 2: 128, 3: 128, 4: 128}
    for stage, layers in inner.items():
        for j, (c1, c2, c3) in enumerate(layers):
            official.update(
                {
                    f"module.layer{stage}.{j}.conv1": c1,
                    f"module.layer{stage}.{j}.conv2": c2,
                    f"module.layer{stage}.{j}.conv3": c3,
                }
            )
        official[f"module.layer{stage}.0.downsample.0"] = downsample[stage]
    assert len(official) == 53
    with torch.device("meta"):
        resnet50 = ResNetForImageClassification(ResNetConfig())  # HF's ResNet-50 shape
    space = build_space(resnet50, GROUP_SIZE_PRESETS["resnet50_official"])
    for key, size in official.items():
        parts = key.split(".")
        if key == "module.conv1":
            name = "stem"
        elif parts[-1] in ("conv1", "conv2"):
            name = f"stages.{int(parts[1][-1]) - 1}.layers.{parts[2]}.{parts[3]}"
        else:  # conv3 / downsample write the stage's residual width: the group takes its members' largest size
            stage = int(parts[1][-1])
            name = f"stages.{stage - 1}.residual"
            size = max([downsample[stage]] + [c3 for _, _, c3 in inner[stage]])
        assert space.dimensions[name].group_size == size, key
    assert (
        PrunableConfig(budget_fraction=0.5, group_sizes="resnet50_official").group_sizes
        == GROUP_SIZE_PRESETS["resnet50_official"]
    )
    assert PrunableConfig(budget_fraction=0.5, group_sizes="deit_base_paper").group_sizes == {
        "embed": 16,
        "heads": 1,
        "qk": 2,
        "v": 2,
        "mlp": 32,
    }
    with pytest.raises(ValueError, match="unknown preset 'resnet51'"):
        PrunableConfig(budget_fraction=0.5, group_sizes="resnet51")


# --- 7. HALP-style linear ablation: re-linearised at the current widths at every step ---------------------
class RecordingLinear(ProductLatency):
    relinearises = True

    def __init__(self):
        self.calls = []

    def solver_terms(self, space, around=None):
        self.calls.append(around)
        return super().solver_terms(space)


def test_linear_model_is_relinearised_at_each_iterative_step():
    model = build("deit").train()
    latency = RecordingLinear()
    cfg = PrunableConfig(budget_fraction=0.5, group_sizes=GROUPS, schedule="iterative", num_pruning_steps=2)
    session = PruningSession(model, cfg, latency)
    assert latency.calls == [None]  # dense point at construction
    for _ in range(2):
        backward_once(model)
        session.accumulate()
        session.prune_step()
    step1 = session.results[0].choice
    around = latency.calls[-1]
    assert around is not None and len(latency.calls) == 2  # step 1 uses the dense terms, step 2 re-linearises
    for name, dim in session.space.dimensions.items():
        assert dim.widths()[around[name]] == len(step1.kept_indices(session.space, name))
    session.gates.remove()


# --- block granularity: whole ViT layers (official notebook) or attention / MLP separately (default) ------
def test_layer_granularity_removes_whole_layers():
    model = build("deit").train()
    cfg = PrunableConfig(budget_fraction=0.3, group_sizes=GROUPS, block_granularity="layer")
    session = PruningSession(model, cfg, ProductLatency())
    backward_once(model)
    session.accumulate()
    scores = {n: v.numpy() for n, v in session.scores.commit().items()}
    problem = build_problem(
        session.space, scores, ProductLatency().solver_terms(session.space), 1.0, merge_blocks=session.merge_blocks
    )
    assert sorted(b.name for b in problem.blocks) == ["layers.0", "layers.1", "layers.2"]
    assert {t.block for t in problem.latency_terms} - {None} == {"layers.0", "layers.1", "layers.2"}
    # make layer 1 worthless: it is removed as a whole, both sub-blocks
    session.scores.count = 1
    for name, total in session.scores.sums.items():
        total[:] = 1e-12 if name.startswith("layers.1.") else 1.0
    session.scores.ema = None
    choice = session.prune_step().choice
    assert {"layers.1.attention", "layers.1.mlp"} <= set(choice.removed_blocks)
    assert all(
        (f"layers.{i}.attention" in choice.removed_blocks) == (f"layers.{i}.mlp" in choice.removed_blocks)
        for i in range(3)
    )
    session.gates.remove()
