"""Core equivalences: gated == sliced, save -> load (same and fresh process), pruning twice, errors."""

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILY_OF, GROUPS, IMAGE_SIZE, VARIANTS, build, logits_of
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from mdp_hf import PruningChoice, build_space, gate_model, slice_model
from mdp_hf.adapters import PruningSpaceError, UnsupportedModelError, auto_class_for_config, get_adapter, get_family
from mdp_hf.hub import CheckpointError, load_pruned_model, save_pruned_model


def random_choice(space, rng, kinds, remove_blocks):
    """Random kept sets for dimensions of the given kinds; per-layer QK and V widths drawn independently."""
    kept = {}
    for name, dim in space.dimensions.items():
        if dim.kind in kinds:
            width = rng.choice(dim.widths()[:-1] or dim.widths())  # prefer a real cut
            kept[name] = sorted(rng.sample(range(dim.size), width))
    removed = [b for b in space.blocks if remove_blocks and rng.random() < 0.4]
    return PruningChoice(kept, removed)


ALL_KINDS = {kind for family in set(FAMILY_OF.values()) for kind in get_family(family).kinds}


def scenario_kinds(scenario):
    if scenario == "all":
        return ALL_KINDS, True
    if scenario == "blocks":
        return set(), True
    return {scenario}, False


# every registered tiny variant x (each kind its family declares, blocks only, everything at once)
MATRIX = [(v, s) for f, v in VARIANTS for s in (*get_family(f).kinds, "blocks", "all")]


@pytest.fixture
def float64():
    """Models, gates and slices in float64: gated and sliced models sum in different orders, and in float32 a
    ReLU6 kink can amplify that to 1e-4 at one thread (MobileNetV2); a slicing error stays far above 1e-5."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


@pytest.mark.parametrize("family,scenario", MATRIX)
def test_gated_equals_sliced(family, scenario, float64):
    model = build(family)
    space = build_space(model, group_sizes=GROUPS)
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        dense = logits_of(model, x)
    dense_params = sum(p.numel() for p in model.parameters())
    kinds, remove_blocks = scenario_kinds(scenario)
    for seed in range(4):
        choice = random_choice(space, random.Random(seed), kinds, remove_blocks)
        if scenario == "blocks" and not choice.removed_blocks:
            choice.removed_blocks = [next(iter(space.blocks))]
        with gate_model(model, space, choice), torch.no_grad():
            gated = logits_of(model, x)
        pruned = slice_model(model, space, choice)
        with torch.no_grad():
            sliced = logits_of(pruned, x)
        assert (gated - sliced).abs().max().item() < 1e-5, choice
        # the cut is real: fewer parameters and a different function from the dense model
        assert sum(p.numel() for p in pruned.parameters()) < dense_params
        assert (sliced - dense).abs().max().item() > 1e-4
    # gates removed => the model is the dense model again
    with torch.no_grad():
        assert torch.equal(logits_of(model, x), dense)


def test_qk_width_differs_from_v_width_and_scaling_is_kept():
    model = build("vit")
    space = build_space(model, group_sizes=GROUPS)
    choice = PruningChoice({"layers.0.qk_dim": [0, 3], "layers.0.v_dim": [1, 2, 5, 7], "layers.0.heads": [1, 3]})
    pruned = slice_model(model, space, choice)
    attn = pruned.vit.layers[0].attention
    assert (attn.num_attention_heads, attn.qk_head_dim, attn.v_head_dim) == (2, 2, 4)
    assert attn.scaling == pytest.approx(8**-0.5)  # the dense head_dim, not the pruned qk width
    assert pruned.config.per_layer_config[1].num_attention_heads == 4


@pytest.mark.parametrize("family", [v for _, v in VARIANTS])
def test_open_gates_compute_exactly_the_ungated_model(family):
    # frozen all-one gates (scoring from the weights' gradients, before the first pruning step) skip their hooks:
    # the logits are bit-identical to the ungated model's (a masked LayerNorm recomputed in a hook is not)
    model = build(family).eval()
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    ungated = logits_of(model, x)
    space = build_space(model, group_sizes=GROUPS)
    gates = gate_model(model, space)
    assert not gates.open  # gates that record gradients must run their hooks
    gates.freeze()
    assert gates.open
    assert torch.equal(logits_of(model, x), ungated)
    choice = random_choice(space, random.Random(0), get_family(FAMILY_OF[family]).kinds, remove_blocks=False)
    gates.apply_choice(choice)
    assert not gates.open  # a pruned choice is applied again
    with torch.no_grad():
        assert (logits_of(model, x) - logits_of(slice_model(model, space, choice), x)).abs().max() < 1e-5
    gates.apply_choice(space.full_choice())
    assert gates.open
    gates.remove()


@pytest.mark.parametrize("family", [v for _, v in VARIANTS])
def test_pruned_model_can_be_pruned_again(family):
    model = build(family)
    space = build_space(model, group_sizes=GROUPS)
    rng = random.Random(1)
    first = random_choice(space, rng, ALL_KINDS, True)
    pruned = slice_model(model, space, first)
    space2 = build_space(pruned, group_sizes=GROUPS)
    assert set(space2.blocks) == set(space.blocks) - set(first.removed_blocks)
    second = random_choice(space2, rng, ALL_KINDS, True)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with gate_model(pruned, space2, second), torch.no_grad():
        gated = logits_of(pruned, x)
    twice = slice_model(pruned, space2, second)
    with torch.no_grad():
        assert (gated - logits_of(twice, x)).abs().max().item() < 1e-5
    assert twice.config.base_model_type == pruned.config.base_model_type  # the source stays recorded
    if hasattr(model, "config"):  # a transformers source (timm sources record their own name)
        assert twice.config.base_model_type == model.config.model_type
        assert twice.config.base_config["model_type"] == model.config.model_type


def test_gates_carry_taylor_scores_and_stay_out_of_the_optimizer():
    model = build("vit").train()
    space = build_space(model, group_sizes=GROUPS)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    gates = gate_model(model, space)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE), torch.randint(0, 5, (4,))
    model(x, labels=y).loss.backward()
    for name, gate in {**gates.dims, **gates.blocks}.items():
        assert gate.grad is not None and torch.isfinite(gate.grad).all(), name
        assert gate.grad.abs().sum() > 0, name
    gate_ids = {id(g) for g in list(gates.dims.values()) + list(gates.blocks.values())}
    assert not gate_ids & {id(p) for group in optimizer.param_groups for p in group["params"]}
    optimizer.step()
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    gates.remove()


@pytest.mark.parametrize("family", [v for _, v in VARIANTS])
def test_save_load_same_and_fresh_process(family, tmp_path):
    model = build(family)
    space = build_space(model, group_sizes=GROUPS)
    pruned = slice_model(
        model,
        space,
        random_choice(space, random.Random(3), ALL_KINDS, True),
    )
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = logits_of(pruned, x)
        base = pruned.base_model(x).last_hidden_state  # AutoModel loads this part of a classifier's folder
    out = save_pruned_model(pruned, tmp_path / "pruned")
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".py")  # modeling files travel with the weights
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")) and not list(out.glob("*.pkl"))
    reloaded = load_pruned_model(out)
    saved, loaded = pruned.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)  # bit for bit
    # outputs to 1e-6, not bit for bit: a conv kernel may sum in another order on a buffer aligned differently
    # (seen at one thread: 1.5e-8 for a timm ResNet-D); a weight lost or left random is far above it
    with torch.no_grad():
        assert (logits_of(reloaded, x) - expected).abs().max() < 1e-6
    n_params = sum(p.numel() for p in reloaded.parameters())
    assert n_params == get_adapter(reloaded).expected_num_parameters(reloaded.config)

    # fresh process, mdp_hf made unimportable: trust_remote_code must be enough
    save_file({"x": x, "expected": expected, "base": base}, str(tmp_path / "io.safetensors"))
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "mdp_hf" or name.startswith("mdp_hf."):
                    raise ImportError("mdp_hf must not be needed to load a pruned model")
        sys.meta_path.insert(0, Block())
        import torch
        from safetensors.torch import load_file
        import transformers
        from transformers import AutoModel
        io = load_file({str(tmp_path / "io.safetensors")!r})
        cls = getattr(transformers, {auto_class_for_config(pruned.config).__name__!r})  # the task's Auto class
        model = cls.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(io["x"])
        if getattr(out, "pred_boxes", None) is not None:  # a detector: class logits and boxes
            got = torch.cat([out.logits, out.pred_boxes], dim=-1)
        else:
            got = out.logits if cls is not AutoModel else out.pooler_output
        assert (got - io["expected"]).abs().max() < 1e-6, (got - io["expected"]).abs().max()
        backbone = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(backbone).__name__ == {type(pruned.base_model).__name__!r}, type(backbone)
        with torch.no_grad():
            assert (backbone(io["x"]).last_hidden_state - io["base"]).abs().max() < 1e-6
        assert not any(m.startswith("mdp_hf") for m in sys.modules)
        print("FRESH_OK", sum(p.numel() for p in model.parameters()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"FRESH_OK {n_params}" in result.stdout


@pytest.mark.parametrize("variant", ["vit", "deit_distilled"])
def test_interpolate_pos_encoding_as_transformers_does(variant):
    """Another resolution with interpolate_pos_encoding=True: the unpruned export computes what transformers'
    ViT / DeiT compute, a pruned one what the gated model computes; without the flag it is a clear error."""
    model = build(variant)
    space = build_space(model, group_sizes=GROUPS)
    x = torch.randn(2, 3, IMAGE_SIZE + 16, IMAGE_SIZE + 8)  # another, non-square patch grid
    full = slice_model(model, space, space.full_choice())
    choice = random_choice(space, random.Random(1), ALL_KINDS, True)
    pruned = slice_model(model, space, choice)
    with torch.no_grad():
        expected = model(x, interpolate_pos_encoding=True).logits
        assert (full(x, interpolate_pos_encoding=True).logits - expected).abs().max() < 1e-5
        with gate_model(model, space, choice):
            gated = model(x, interpolate_pos_encoding=True).logits
        assert (pruned(x, interpolate_pos_encoding=True).logits - gated).abs().max() < 1e-5
        same = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)  # the trained resolution: the embeddings as they are
        assert torch.equal(pruned(same, interpolate_pos_encoding=True).logits, pruned(same).logits)
        with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
            pruned(x)


# --- bad input ---------------------------------------------------------------------------------------
def test_backbones_and_headless_classifiers_are_refused_before_scoring():
    from transformers import ResNetBackbone, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[16, 24], depths=[1, 1], out_features=["stage2"])
    with pytest.raises(PruningSpaceError, match="ResNetBackbone.*feature maps.*ResNetModel"):
        build_space(ResNetBackbone(config))
    with pytest.raises(PruningSpaceError, match="no linear head.*ResNetModel"):
        build_space(
            ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[16], depths=[1], num_labels=0))
        )


def test_unknown_architecture_names_supported_families():
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*Supported: .*deit.*resnet.*vit.*register_family"):
        build_space(bert)


@pytest.mark.parametrize(
    "family,choice,message",
    [
        (
            "resnet_bottleneck",
            PruningChoice({"stages.1.layers.0.conv3": [0, 1]}),
            "coupled into dimension 'stages.1.residual'",
        ),
        ("resnet_basic", PruningChoice({"stages.0.residual": [0, 1]}), "unknown dimension 'stages.0.residual'"),
        ("vit", PruningChoice({"embed": [0, 40]}), r"out of range \[0, 32\)"),
        ("vit", PruningChoice({"layers.0.heads": [1, 1]}), "duplicates"),
        ("vit", PruningChoice({"layers.0.heads": []}), "remove the block"),
        ("vit", PruningChoice({}, ["layers.7.mlp"]), "unknown block 'layers.7.mlp'"),
    ],
)
def test_bad_choices_are_clear_errors(family, choice, message):
    model = build(family)
    space = build_space(model, group_sizes=GROUPS)
    with pytest.raises(PruningSpaceError, match=message):
        slice_model(model, space, choice)
    with pytest.raises(PruningSpaceError, match=message):
        gate_model(model, space, choice)


def test_pruned_resnet_whose_identity_stage_lost_its_first_branch_can_be_pruned_again():
    model = build("resnet_basic")
    space = build_space(model, group_sizes=GROUPS)
    pruned = slice_model(
        model, space, PruningChoice({"stem": [0, 2, 4, 6]}, ["stages.0.layers.0", "stages.0.layers.1"])
    )
    space2 = build_space(pruned, group_sizes=GROUPS)
    assert space2.dimensions["stem"].size == 4 and "stages.0.layers.0" not in space2.blocks
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    choice = PruningChoice({"stem": [1, 3]}, ["stages.1.layers.1"])
    with gate_model(pruned, space2, choice), torch.no_grad():
        gated = logits_of(pruned, x)
    with torch.no_grad():
        assert (gated - logits_of(slice_model(pruned, space2, choice), x)).abs().max() < 1e-5


def test_stem_and_stage0_are_coupled_when_the_shortcut_is_identity():
    space = build_space(build("resnet_basic"), group_sizes=GROUPS)
    assert "stem" in space.dimensions and "stages.0.residual" not in space.dimensions
    assert any("stages.0.layers.1.layer.1" in c for c in space.dimensions["stem"].coupled)


def _saved(tmp_path):
    model = build("vit")
    space = build_space(model, group_sizes=GROUPS)
    return save_pruned_model(slice_model(model, space, PruningChoice({"embed": list(range(16))})), tmp_path / "m")


def test_checkpoint_not_matching_its_config_is_rejected(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["hidden_size"] = 24  # weights hold 16
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match|parameters"):
        load_pruned_model(path)


def test_corrupt_checkpoint_is_rejected(tmp_path):
    path = _saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot load"):
        load_pruned_model(path)


def test_failed_save_leaves_existing_checkpoint_intact(tmp_path):
    path = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(ValueError, match="slice_model"):
        save_pruned_model(build("vit"), path)  # dense model: refused before anything is written
    broken = load_pruned_model(path)
    broken.config.hidden_size = 24  # config no longer describes the weights
    with pytest.raises(ValueError, match="refusing to save"):
        save_pruned_model(broken, path, extra_files={"README.md": "x"})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folders left behind


def test_saving_into_a_run_folder_keeps_its_other_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "latency_table.json").write_text("{}")
    path = _saved(tmp_path)
    assert (path / "latency_table.json").read_text() == "{}"
    assert (path / "model.safetensors").exists()
