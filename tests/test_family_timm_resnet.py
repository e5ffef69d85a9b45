"""timm ResNet family: refusals, export that loads without mdp_hf and timm, official BN-Taylor scores."""

import random
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, build, logits_of
from safetensors.torch import save_file

from mdp_hf import PruningChoice, build_space, gate_model, slice_model
from mdp_hf.adapters import PruningSpaceError, get_adapter, get_family
from mdp_hf.hub import save_pruned_model

timm = pytest.importorskip("timm")
from timm.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402


def tiny(block=BasicBlock, **kwargs):
    torch.manual_seed(0)
    return ResNet(block=block, layers=[1, 1, 1, 1], channels=(8, 8, 8, 8), **{"num_classes": 5, **kwargs}).eval()


def random_choice(space, seed):
    rng = random.Random(seed)
    kept = {n: sorted(rng.sample(range(d.size), rng.choice(d.widths()))) for n, d in space.dimensions.items()}
    return PruningChoice(kept, [b for b in space.blocks if rng.random() < 0.4])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(block_args=dict(attn_layer="se")), "attn_layer"),
        (dict(aa_layer=timm.layers.BlurPool2d), "aa_layer"),
        (dict(block=Bottleneck, cardinality=2), "cardinality"),
        (dict(drop_block_rate=0.1), "drop_block_rate"),
        (dict(output_stride=16), "output_stride"),
        (dict(act_layer="gelu_tanh"), "act_layer"),
        (dict(norm_layer=partial(torch.nn.BatchNorm2d, eps=1e-3)), "eps"),
        (dict(norm_layer=torch.nn.InstanceNorm2d), "norm_layer"),
        (dict(replace_stem_pool=True), "replace_stem_pool"),
        (dict(global_pool="max"), "global_pool"),
        (dict(num_classes=0), "num_classes"),
        (dict(down_kernel_size=3), "down_kernel_size"),
    ],
)
def test_what_mdp_resnet_cannot_express_is_refused(kwargs, message):
    with pytest.raises(PruningSpaceError, match=message):
        build_space(tiny(**kwargs))


def test_same_names_as_the_resnet_family_and_timm_coupling_names():
    model = build("timm_resnet_d")
    space = build_space(model, group_sizes=GROUPS)
    assert get_family(model).name == "timm_resnet" and space.model_type == "timm_resnet"
    # stage 0 has an identity shortcut: its residual width is the stem's, as in the resnet family
    assert "stages.0.residual" not in space.dimensions and {"stem.conv1", "stem.conv2"} <= set(space.dimensions)
    assert {"conv1.6", "layer1.0.conv3", "layer1.1.conv3"} <= set(space.dimensions["stem"].coupled)
    assert "layer2.0.downsample" in space.dimensions["stages.1.residual"].coupled
    assert set(get_adapter(model).stem_dimensions) >= {"stem", "stem.conv1", "stem.conv2"}
    assert set(get_family("timm_resnet").presets) == {"timm-resnet18", "timm-resnet50", "timm-resnet50d"}


def test_deep_tiered_stem_gated_equals_sliced():
    model = tiny(block=Bottleneck, stem_type="deep_tiered", stem_width=8, avg_down=True)
    space = build_space(model, group_sizes=GROUPS)
    assert (space.dimensions["stem.conv1"].size, space.dimensions["stem.conv2"].size) == (6, 8)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    for seed in range(3):
        choice = random_choice(space, seed)
        with gate_model(model, space, choice), torch.no_grad():
            gated = model(x)
        with torch.no_grad():
            assert (gated - slice_model(model, space, choice)(x).logits).abs().max() < 1e-5


def test_export_loads_without_mdp_hf_and_timm(tmp_path):
    torch.manual_seed(0)  # resnet50d's options and timm's pretrained_cfg, at a tiny size
    model = timm.create_model(
        "resnet50d", pretrained=False, num_classes=5, layers=[1, 1, 1, 1], channels=(2, 4, 6, 8), stem_width=4
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
    model.eval()
    space = build_space(model, group_sizes=GROUPS)
    choice = random_choice(space, 1)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with gate_model(model, space, choice), torch.no_grad():
        gated = model(x)
    pruned = slice_model(model, space, choice)
    config = pruned.config
    assert config.base_model_type == "timm:resnet50d" and config.base_model_name_or_path == "timm/resnet50d.ra2_in1k"
    assert config.preprocessing == {
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "input_size": [3, 224, 224],
        "interpolation": "bicubic",
        "crop_pct": 0.875,
    }
    assert config.avg_down and len(config.stem_inner_widths) == 2
    out = save_pruned_model(pruned, tmp_path / "pruned")
    save_file({"x": x, "gated": gated}, str(tmp_path / "io.safetensors"))
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "mdp_hf" or name.startswith("mdp_hf."):
                    raise ImportError("mdp_hf must not be needed to load a pruned timm ResNet")
        sys.meta_path.insert(0, Block())
        sys.modules["timm"] = None  # as if not installed: import fails, find_spec (transformers' probe) says absent
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForImageClassification
        io = load_file({str(tmp_path / "io.safetensors")!r})
        model = AutoModelForImageClassification.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            diff = (model(io["x"]).logits - io["gated"]).abs().max().item()
        assert diff < 1e-5, diff
        assert sys.modules["timm"] is None and not any(m.startswith(("mdp_hf", "timm.")) for m in sys.modules)
        print("FRESH_OK", model.config.base_model_type, model.config.preprocessing["interpolation"])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FRESH_OK timm:resnet50d bicubic" in result.stdout


@pytest.mark.parametrize("variant", ["timm_resnet_basic", "timm_resnet_bottleneck"])
def test_bn_taylor_scores_equal_the_resnet_family_on_the_same_hf_model(variant):
    """The same weights in transformers' ResNet: identical logits, identical official scores and shares."""
    from transformers import ResNetConfig, ResNetForImageClassification

    model = build(variant)
    space = build_space(model, group_sizes=GROUPS)
    dense = slice_model(model, space, space.full_choice())  # mdp_resnet names are transformers' names
    c = dense.config
    hf = ResNetForImageClassification(
        ResNetConfig(
            embedding_size=c.embedding_size,
            hidden_sizes=c.hidden_sizes,
            depths=c.depths,
            layer_type=c.layer_type,
            num_labels=5,
        )
    )
    hf.load_state_dict(dense.state_dict(), strict=True)
    hf_space = build_space(hf, group_sizes=GROUPS)
    assert list(hf_space.dimensions) == list(space.dimensions) and list(hf_space.blocks) == list(space.blocks)
    x, y = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE), torch.randint(0, 5, (4,))
    with torch.no_grad():
        assert (logits_of(hf.eval(), x) - logits_of(model, x)).abs().max() < 1e-5
    scores, shares = [], []
    for net, sp in ((model, space), (hf, hf_space)):
        net.train().zero_grad()
        gates = gate_model(net, sp)
        torch.nn.functional.cross_entropy(logits_of(net, x), y).backward()
        adapter = get_adapter(net)
        scores.append(adapter.taylor_scores(net, sp, gates))
        shares.append(adapter.score_shares(net, sp, gates))
        gates.remove()
    for name in space.dimensions:
        assert scores[0][name].abs().sum() > 0, name
        torch.testing.assert_close(scores[0][name], scores[1][name], rtol=1e-4, atol=1e-9)
    assert shares[0].keys() == shares[1].keys() and shares[0]
    for name in shares[0]:
        assert [b for b, _ in shares[0][name]] == [b for b, _ in shares[1][name]]
        for (_, a), (_, b) in zip(shares[0][name], shares[1][name]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
