"""MobileNetV2 family: transformers parity of the pruned format (TF padding, stem expansion, dilation), refusals,
BN-Taylor score linkage on a hand-checked case, headless models and a one-shot prune end to end."""

import random

import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, build, logits_of
from torch.utils.flop_counter import FlopCounterMode
from transformers import MobileNetV2Config, MobileNetV2ForSemanticSegmentation, MobileNetV2Model
from transformers.models.mobilenet_v2.modeling_mobilenet_v2 import apply_tf_padding

from mdp_hf import PruningChoice, build_space, gate_model, slice_model
from mdp_hf.adapters import PruningSpaceError, get_adapter
from mdp_hf.adapters.mobilenet_v2 import _TINY, _mobilenet_v2
from mdp_hf.config import PrunableConfig
from mdp_hf.latency import TableLatencyModel, build_table
from mdp_hf.latency.profiler import family_cells
from mdp_hf.latency.timing import TimingSettings
from mdp_hf.modeling.configuration_mdp_mobilenet_v2 import MDPMobileNetV2Config
from mdp_hf.modeling.modeling_mdp_mobilenet_v2 import tf_same_padding
from mdp_hf.pruning import prune


def _randomise_norms(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("size", [32, 37])
@pytest.mark.parametrize(
    "options",
    [{}, {"tf_padding": False}, {"first_layer_is_expansion": False, "output_stride": 8}, {"output_stride": 16}],
)
def test_unpruned_slice_reproduces_transformers(options, size):
    """The pruned format at full width computes what transformers' MobileNetV2 computes (odd sizes: other TF pads)."""
    torch.manual_seed(0)
    model = _randomise_norms(_mobilenet_v2(signal_init=True, **{**_TINY, **options})())
    space = build_space(model)
    pruned = slice_model(model, space, space.full_choice())
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert (model(x).logits - pruned(x).logits).abs().max() < 1e-5


def test_tf_same_padding_matches_transformers():
    x = torch.randn(1, 2, 7, 10)
    for stride in (1, 2):
        for dilation in (1, 2):
            for h, w in [(1, 1), (2, 3), (5, 8), (7, 10)]:
                conv = torch.nn.Conv2d(2, 2, 3, stride=stride, dilation=dilation)
                crop = x[..., :h, :w]
                assert torch.equal(tf_same_padding(crop, conv), apply_tf_padding(crop, conv)), (stride, dilation, h, w)


def test_tf_padding_variant_is_recorded_and_matters():
    def unpruned(variant):
        model = build(variant)
        space = build_space(model)
        return slice_model(model, space, space.full_choice())

    pruned = unpruned("mobilenet_v2_no_tf_padding")
    config = pruned.config
    assert config.tf_padding is False and config.stem_expand_channels is not None
    assert max(config.layer_dilations) > 1  # output_stride=8: later depthwise convs are dilated
    assert pruned.mobilenet_v2.layer[2].conv_3x3.convolution.padding == (1, 1)
    tf = unpruned("mobilenet_v2")
    assert tf.config.tf_padding is True and tf.mobilenet_v2.layer[2].conv_3x3.convolution.padding == (0, 0)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        before = tf(x).logits
        for module in tf.modules():  # the same weights with symmetric padding compute something else
            if hasattr(module, "tf_padding"):
                module.tf_padding = False
                conv = module.convolution
                conv.padding = ((conv.kernel_size[0] - 1) // 2 * conv.dilation[0],) * 2
        assert (tf(x).logits - before).abs().max() > 1e-4


# --- refusals --------------------------------------------------------------------------------------------
def test_unsupported_variants_are_refused_with_the_option_named():
    small = dict(_TINY, num_labels=5)
    with pytest.raises(PruningSpaceError, match="semantic segmentation"):
        build_space(MobileNetV2ForSemanticSegmentation(MobileNetV2Config(**small)))
    with pytest.raises(PruningSpaceError, match="hidden_act='sigmoid'.*act\\(0\\) == 0"):
        build_space(_mobilenet_v2(**small, hidden_act="sigmoid")())
    with pytest.raises(ValueError, match="removed_layers"):
        MDPMobileNetV2Config(removed_layers=[0])  # layer 0 has no residual connection
    with pytest.raises(ValueError, match="stage_widths"):
        MDPMobileNetV2Config(stage_widths=[16, 24])


def test_only_residual_layers_are_blocks_and_names_are_coupled():
    model = build("mobilenet_v2")
    space = build_space(model, group_sizes=GROUPS)
    residual = [i for i, layer in enumerate(model.mobilenet_v2.layer) if layer.use_residual]
    assert sorted(space.blocks) == sorted(f"layers.{i}" for i in residual)
    assert space.dimensions["layers.0.expansion"].block is None
    assert space.dimensions["layers.1.expansion"].block == "layers.1"
    assert space.dimensions["stages.1.residual"].shared_by == ["layers.1"]
    with pytest.raises(PruningSpaceError, match="coupled into dimension 'stages.2.residual'"):
        slice_model(model, space, PruningChoice({"layers.3.reduce": [0, 1]}))


# --- BN-Taylor ---------------------------------------------------------------------------------------------
def test_bn_taylor_scores_and_shares_by_hand():
    """score = gamma * dL/dgamma + beta * dL/dbeta of the BN after each conv; a stage's writers are summed."""
    model = build("mobilenet_v2")
    space = build_space(model, group_sizes=GROUPS)
    base = model.mobilenet_v2
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.grad, bn.bias.grad = torch.zeros_like(bn.weight), torch.zeros_like(bn.bias)
        # stage 2 is written by layer 2 (no residual) and layers 3, 4 (residual blocks); 4 channels each
        writer2, writer3, writer4 = (base.layer[i].reduce_1x1.normalization for i in (2, 3, 4))
        writer2.weight.fill_(1.0)
        writer2.bias.fill_(0.0)
        writer2.weight.grad = torch.tensor([1.0, 0.0, 0.0, 0.0])
        writer3.weight.fill_(2.0)
        writer3.weight.grad = torch.tensor([0.0, 1.0, 0.0, 0.0])
        writer4.bias.fill_(1.0)
        writer4.bias.grad = torch.tensor([-3.0, 0.0, 0.0, 0.0])
        expand = base.layer[3].expand_1x1.normalization  # layers.3.expansion: the expansion conv's BN only
        expand.weight.fill_(0.5)
        expand.bias.fill_(0.0)
        expand.weight.grad = torch.full_like(expand.weight, 2.0)
        depthwise = base.layer[3].conv_3x3.normalization
        depthwise.weight.grad = torch.full_like(depthwise.weight, 100.0)
    adapter = get_adapter(model)
    assert adapter.default_score_kind == "abs" and not adapter.scores_from_gates
    scores = adapter.taylor_scores(model, space, None)
    assert set(scores) == set(space.dimensions)
    assert torch.allclose(scores["stages.2.residual"], torch.tensor([-2.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(scores["layers.3.expansion"], torch.ones(8, dtype=torch.float64))
    assert scores["layers.4.expansion"].abs().sum() == 0  # zero gradients: zero score
    shares = adapter.score_shares(model, space, None)
    assert [block for block, _ in shares["stages.2.residual"]] == [None, "layers.3", "layers.4"]
    expected = [[1.0, 0, 0, 0], [0, 2.0, 0, 0], [-3.0, 0, 0, 0]]
    for (_, got), want in zip(shares["stages.2.residual"], expected):
        assert torch.equal(got, torch.tensor(want, dtype=torch.float64))
    assert "stages.6.residual" not in shares  # a single writer: nothing to split
    assert "layers.3.expansion" not in shares


# --- headless and end to end ---------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", [True, False])
def test_headless_model_gated_equals_sliced(pooling):
    torch.manual_seed(0)
    model = _randomise_norms(MobileNetV2Model(MobileNetV2Config(**_TINY), add_pooling_layer=pooling))
    space = build_space(model, group_sizes=GROUPS)
    rng = random.Random(0)
    kept = {n: sorted(rng.sample(range(d.size), d.widths()[0])) for n, d in space.dimensions.items()}
    choice = PruningChoice(kept, ["layers.1", "layers.7"])
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with gate_model(model, space, choice), torch.no_grad():
        gated = model(x).last_hidden_state
    pruned = slice_model(model, space, choice)
    assert type(pruned).__name__ == "MDPMobileNetV2Model" and (pruned.pooler is not None) == pooling
    with torch.no_grad():
        sliced = pruned(x).last_hidden_state
    final = kept["final_conv"]  # the gated model keeps every channel of the output, zero where pruned
    assert (sliced - gated[:, final]).abs().max() < 1e-5 and sliced.abs().max() > 1e-3
    assert gated.abs().sum() == gated[:, final].abs().sum()
    assert set(build_space(pruned, group_sizes=GROUPS).blocks) == set(space.blocks) - {"layers.1", "layers.7"}


def test_one_shot_prune_with_bn_taylor_meets_a_flops_budget():
    model = build("mobilenet_v2")
    space = build_space(model, group_sizes=GROUPS)
    settings = TimingSettings(image_size=IMAGE_SIZE)
    cells = family_cells(model, space, settings)

    def timer(grid, widths):  # ms := MFLOPs of the cell (deterministic)
        module, x = cells.build_cell(grid, widths)
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            module(*(x if isinstance(x, tuple) else (x,)))
        return counter.get_total_flops() / 1e6

    table = build_table(model, space=space, timer=timer, subgrid=2, repeats=1, warmup=0, progress=False, image_size=32)
    latency = TableLatencyModel(table)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), torch.randint(0, 5, (8,), generator=g))] * 2
    config = PrunableConfig(budget_fraction=0.6, group_sizes=GROUPS, accumulation_steps=2, verify_latency=False)
    pruned, result = prune(model, config, batches, latency)
    assert result.predicted_latency_ms <= result.budget_ms * (1 + 1e-9)
    assert latency.predict(pruned) == pytest.approx(result.predicted_latency_ms, rel=1e-6)
    assert pruned.config.stem_channels == space.dimensions["stem"].size  # the stem keeps its width (prune_stem)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert logits_of(pruned, x).shape == (2, 5)
