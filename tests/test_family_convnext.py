"""ConvNeXt family checks beyond the registry-driven contract matrix: masked LayerNorm statistics over pruned
residual channels, removed layers, headless models, parameter counts of the real shapes, and refusals."""

import random

import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, build, logits_of
from transformers import (
    ConvNextBackbone,
    ConvNextConfig,
    ConvNextModel,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
)

from mdp_hf import PruningChoice, build_space, gate_model, slice_model
from mdp_hf.adapters import PruningSpaceError, UnsupportedModelError, get_adapter, get_family
from mdp_hf.modeling.configuration_mdp_convnext import MDPConvNextConfig


def _x(batch=2):
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


def _gated_and_sliced(model, space, choice, x):
    with gate_model(model, space, choice), torch.no_grad():
        gated = logits_of(model, x)
    pruned = slice_model(model, space, choice)
    with torch.no_grad():
        return gated, logits_of(pruned, x), pruned


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_layernorm_statistics_ignore_pruned_residual_channels(stage):
    """Only one stage's residual width pruned: every LayerNorm over it (stem / downsampling / layers / final)
    must take its statistics over the kept channels, or gated and sliced differ by far more than 1e-5."""
    model = build("convnext")
    space = build_space(model, group_sizes=GROUPS)
    name = f"stages.{stage}.residual"
    size = space.dimensions[name].size
    choice = PruningChoice({name: list(range(1, size, 2))})
    gated, sliced, pruned = _gated_and_sliced(model, space, choice, _x())
    assert (gated - sliced).abs().max().item() < 1e-5
    assert pruned.config.hidden_sizes[stage] == size // 2
    # the same gates with LayerNorm statistics over all channels (pruned ones as zeros) compute something else
    with gate_model(model, space, choice) as gates, torch.no_grad():
        gates.binary_mask = lambda dim: torch.ones_like(gates.dims[dim])
        unmasked = logits_of(model, _x())
    assert (unmasked - sliced).abs().max().item() > 1e-3


def test_removed_layers_are_identity_and_can_be_pruned_again():
    model = build("convnext_no_layer_scale")
    space = build_space(model, group_sizes=GROUPS)
    choice = PruningChoice({"stages.1.layers.1.mlp": list(range(8))}, ["stages.1.layers.0", "stages.3.layers.0"])
    gated, sliced, pruned = _gated_and_sliced(model, space, choice, _x())
    assert (gated - sliced).abs().max().item() < 1e-5
    assert pruned.config.removed_layers == [1, 4] and pruned.config.layer_mlp_widths[2] == 8
    assert isinstance(pruned.convnext.encoder.stages[1].layers[0], torch.nn.Identity)
    assert not any(".stages.3.layers." in n for n, _ in pruned.named_parameters())  # stage 3 keeps no layer
    space2 = build_space(pruned, group_sizes=GROUPS)
    assert "stages.3.residual" in space2.dimensions  # the downsampling conv still defines the width
    assert set(space2.blocks) == set(space.blocks) - set(choice.removed_blocks)
    second = PruningChoice({"stages.3.residual": [0, 5, 9, 30]}, ["stages.0.layers.0"])
    gated, twice, _ = _gated_and_sliced(pruned, space2, second, _x())
    assert (gated - twice).abs().max().item() < 1e-5


def test_headless_model_slices_to_mdp_convnext_model():
    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=IMAGE_SIZE)
    model = ConvNextModel(config).eval()
    space = build_space(model, group_sizes=GROUPS)
    kept = [0, 3, 4, 9, 12, 15]
    choice = PruningChoice({"stages.1.residual": kept, "stages.0.residual": [1, 2, 5, 6]})
    with gate_model(model, space, choice), torch.no_grad():
        gated = model(_x()).pooler_output[:, kept]  # pruned channels are zero in the gated model
    pruned = slice_model(model, space, choice)
    assert type(pruned).__name__ == "MDPConvNextModel" and pruned.config.architectures == ["MDPConvNextModel"]
    with torch.no_grad():
        assert (gated - pruned(_x()).pooler_output).abs().max().item() < 1e-5


def test_classifier_free_head_and_gate_gradients():
    torch.manual_seed(0)
    model = build("convnext").train()
    space = build_space(model, group_sizes=GROUPS)
    gates = gate_model(model, space)
    model(_x(4), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    scores = get_adapter(model).taylor_scores(model, space, gates)
    gates.remove()
    assert get_adapter(model).default_score_kind == "square"
    for name, score in scores.items():
        assert torch.isfinite(score).all() and score.abs().sum() > 0, name
    headless = build("convnext")
    headless.classifier = torch.nn.Identity()  # num_labels=0 style head
    headless.config.num_labels = 0
    pruned = slice_model(headless, build_space(headless), PruningChoice({"stages.3.residual": list(range(16))}))
    assert pruned.config.num_labels == 0 and logits_of(pruned, _x()).shape == (2, 16)


@pytest.mark.parametrize(
    "preset,depths,params", [("convnext-tiny", [3, 3, 9, 3], 28_589_128), ("convnext-small", [3, 3, 27, 3], 50_223_688)]
)
def test_presets_have_the_hub_shapes(preset, depths, params):
    with torch.device("meta"):  # shapes only, nothing allocated
        model = get_family("convnext").presets[preset]()
    assert sum(p.numel() for p in model.parameters()) == params
    dense = MDPConvNextConfig(
        hidden_sizes=[96, 192, 384, 768],
        depths=depths,
        num_labels=1000,
        layer_norm_eps=1e-12,
        architectures=["MDPConvNextForImageClassification"],
    )
    assert get_adapter("mdp_convnext").expected_num_parameters(dense) == params
    space = build_space(model)
    assert space.dimensions["stages.3.residual"].group_size == 8
    assert space.dimensions["stages.0.layers.0.mlp"].size == 384 and len(space.blocks) == sum(depths)


def test_latency_terms_read_the_right_widths():
    from mdp_hf.latency import TimingSettings
    from mdp_hf.latency.profiler import family_cells

    model = build("convnext")
    space = build_space(model, group_sizes=GROUPS)
    grids, terms = family_cells(model, space, TimingSettings(image_size=IMAGE_SIZE)).plan()
    by_name = {t.name: t for t in terms}
    assert by_name["stem"].dims == ["stages.0.residual"] and by_name["stem"].block is None
    assert by_name["stages.2.downsampling"].dims == ["stages.2.residual", "stages.1.residual"]
    assert by_name["stages.1.layers.1"].dims == ["stages.1.residual", "stages.1.layers.1.mlp"]
    assert by_name["stages.1.layers.1"].block == "stages.1.layers.1"
    assert by_name["pool+norm+classifier"].dims == ["stages.3.residual"]
    # the two layers of stage 1 share one grid; every stage's layers are timed at its own resolution
    assert by_name["stages.1.layers.0"].grid == by_name["stages.1.layers.1"].grid
    layer_grids = {g.key: g for g in grids if g.kind == "convnext.layer"}
    assert sorted(g.params["at"] for g in layer_grids.values()) == ["1x1", "2x2", "4x4", "8x8"]


# --- refusals ------------------------------------------------------------------------------------------------
def test_convnext_v2_is_not_handled_by_this_family():
    config = ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5)
    with pytest.raises(UnsupportedModelError, match="convnextv2"):
        build_space(ConvNextV2ForImageClassification(config))


def test_grn_layer_is_refused():
    """A ConvNeXt layer carrying ConvNeXt V2's GRN (global response normalisation) cannot be sliced correctly."""
    from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2GRN

    model = build("convnext")
    model.convnext.encoder.stages[1].layers[0].grn = ConvNextV2GRN(64)
    with pytest.raises(PruningSpaceError, match=r"stages\.1\.layers\.0 .*GRN"):
        build_space(model)


def test_backbone_and_non_depthwise_layers_are_refused():
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, out_features=["stage2"])
    with pytest.raises(PruningSpaceError, match="backbone"):
        build_space(ConvNextBackbone(config))
    model = build("convnext")
    model.convnext.encoder.stages[0].layers[0].dwconv = torch.nn.Conv2d(8, 8, 7, padding=3)
    with pytest.raises(PruningSpaceError, match="not depthwise"):
        build_space(model)
    model = build("convnext")
    model.convnext.encoder.stages[2].layers[0].layer_scale_parameter = None
    with pytest.raises(PruningSpaceError, match="only some layers"):
        build_space(model)


def test_random_choices_match_in_float64():
    model = build("convnext").double()
    space = build_space(model, group_sizes=GROUPS)
    rng = random.Random(5)
    for _ in range(3):
        kept = {n: sorted(rng.sample(range(d.size), rng.choice(d.widths()))) for n, d in space.dimensions.items()}
        choice = PruningChoice(kept, [b for b in space.blocks if rng.random() < 0.3])
        gated, sliced, _ = _gated_and_sliced(model, space, choice, _x().double())
        assert (gated - sliced).abs().max().item() < 1e-10
