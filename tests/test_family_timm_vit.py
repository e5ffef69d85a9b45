"""timm ViT family (timm_vit): refusals, the timm layouts mdp_vit expresses, loading without mdp_hf and timm,
the timm-style wrapper, the official score linkage through the fused qkv, and what the pruned config records.

The registry matrix (tests/test_core.py, test_latency.py, test_trainer.py) already runs the tiny variants
timm_vit, timm_vit_avgpool_layerscale and timm_deit_distilled through every contract check.
"""

import random
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, build, logits_of
from safetensors.torch import save_file
from test_core import ALL_KINDS, random_choice

from mdp_hf import PruningChoice, build_space, gate_model, slice_model
from mdp_hf.adapters import PruningSpaceError, get_adapter
from mdp_hf.adapters.timm_vit import as_timm_module
from mdp_hf.hub import save_pruned_model
from mdp_hf.modeling.configuration_mdp_vit import MDPViTConfig

timm = pytest.importorskip("timm")

TINY = dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=5)


def tiny_vit(seed=0, **options):
    """A tiny timm VisionTransformer with fan-in-scaled weights and non-trivial norms (so cuts show in the logits)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, **options})
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        for token in (model.cls_token, model.pos_embed):
            if token is not None:
                token.normal_(std=0.5)
    return model.eval()


def swiglu():
    from timm.layers import SwiGLU

    return SwiGLU


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(qk_norm=True), "qk_norm=True"),
        (dict(reg_tokens=2), "reg_tokens=2"),
        (dict(global_pool="map"), "global_pool='map'"),
        (dict(global_pool="max"), "global_pool='max'"),
        (dict(mlp_layer="swiglu"), "mlp_layer=SwiGLU"),
        (dict(dynamic_img_size=True), "dynamic_img_size=True"),
        (dict(norm_layer="rmsnorm"), "norm_layer=RmsNorm"),
        (dict(final_norm=False), "final_norm=False"),
        (dict(pos_embed="none"), "pos_embed='none'"),
        (dict(act_layer="silu"), "act_layer=SiLU"),
        (dict(proj_bias=False), "proj_bias=False"),
    ],
)
def test_options_mdp_vit_cannot_express_are_refused_by_name(options, message):
    if options.get("mlp_layer") == "swiglu":
        options = {**options, "mlp_layer": swiglu()}
    model = tiny_vit(**options)
    with pytest.raises(PruningSpaceError, match=f"{message}.*not supported"):
        build_space(model)


# timm layouts beyond the registered variants: each is gated == sliced, pruned again by the vit family
LAYOUTS = {
    "no_embed_class": dict(no_embed_class=True, init_values=0.5),
    "pre_norm": dict(pre_norm=True),  # also: patch projection without bias
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "token_fc_norm": dict(fc_norm=True),
    "avg_without_fc_norm": dict(global_pool="avg", fc_norm=False, qkv_bias=False),
    "quick_gelu": dict(act_layer="quick_gelu"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_timm_layouts_gated_equals_sliced_and_prune_again(layout):
    model = tiny_vit(**LAYOUTS[layout])
    space = build_space(model, group_sizes=GROUPS)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        dense = model(x)
    for seed in range(2):
        choice = random_choice(space, random.Random(seed), ALL_KINDS, seed == 1)
        with gate_model(model, space, choice), torch.no_grad():
            gated = model(x)
        pruned = slice_model(model, space, choice)  # checks the parameter count against the config
        with torch.no_grad():
            sliced = logits_of(pruned, x)
        assert (gated - sliced).abs().max().item() < 1e-5
        assert (sliced - dense).abs().max().item() > 1e-3
    again = build_space(pruned, group_sizes=GROUPS)
    assert get_adapter(pruned).__class__.__name__ == "ViTAdapter" and set(again.dimensions) <= set(space.dimensions)
    second = random_choice(again, random.Random(5), ALL_KINDS, False)
    with gate_model(pruned, again, second), torch.no_grad():
        gated = logits_of(pruned, x)
    with torch.no_grad():
        assert (gated - logits_of(slice_model(pruned, again, second), x)).abs().max().item() < 1e-5


def test_exported_models_load_without_mdp_hf_and_timm(tmp_path):
    """Saved pruned timm models load with trust_remote_code in a process where neither mdp_hf nor timm imports,
    and compute what the gated timm model computes."""
    cases = {}
    models = {
        "deit_distilled": build("timm_deit_distilled"),
        "avgpool_layerscale": build("timm_vit_avgpool_layerscale"),
        "no_embed_class": tiny_vit(**LAYOUTS["no_embed_class"]),
        "no_class_token_pre_norm": tiny_vit(class_token=False, global_pool="avg", pre_norm=True),
    }
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    tensors = {"x": x}
    for name, model in models.items():
        space = build_space(model, group_sizes=GROUPS)
        choice = random_choice(space, random.Random(3), ALL_KINDS, True)
        with gate_model(model, space, choice), torch.no_grad():
            tensors[name] = model(x)
        cases[name] = str(save_pruned_model(slice_model(model, space, choice), tmp_path / name))
    save_file(tensors, str(tmp_path / "io.safetensors"))
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "mdp_hf" or name.startswith("mdp_hf."):
                    raise ImportError("mdp_hf must not be needed to load a pruned model")
        sys.meta_path.insert(0, Block())
        sys.modules["timm"] = None  # import timm fails; importlib.util.find_spec("timm") says absent
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForImageClassification
        io = load_file({str(tmp_path / "io.safetensors")!r})
        for name, path in {cases!r}.items():
            model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()
            with torch.no_grad():
                got = model(io["x"]).logits
            diff = (got - io[name]).abs().max().item()
            assert diff < 1e-5, (name, diff)
        assert not any(m.startswith("mdp_hf") for m in sys.modules)
        assert sys.modules.get("timm") is None
        print("FRESH_OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FRESH_OK" in result.stdout


@pytest.mark.parametrize("variant", ["timm_vit_avgpool_layerscale", "timm_deit_distilled"])
def test_as_timm_module_matches_the_gated_timm_model(variant):
    model = build(variant)
    space = build_space(model, group_sizes=GROUPS)
    choice = random_choice(space, random.Random(2), ALL_KINDS, True)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with gate_model(model, space, choice), torch.no_grad():
        gated = model(x)
        features = model.forward_features(x)
    wrapped = as_timm_module(slice_model(model, space, choice)).eval()
    with torch.no_grad():
        logits = wrapped(x)
        assert torch.is_tensor(logits) and (logits - gated).abs().max().item() < 1e-5
        ours = wrapped.forward_features(x)
        kept = choice.kept_indices(space, "embed")
        assert (ours - features[..., kept]).abs().max().item() < 1e-5
        assert wrapped.forward_head(ours, pre_logits=True).shape == (2, len(kept))
    assert wrapped.num_classes == 5
    cfg = wrapped.pretrained_cfg
    assert cfg is wrapped.default_cfg and cfg["input_size"] == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert cfg["architecture"] == model.pretrained_cfg["architecture"]
    assert cfg["mean"] == tuple(model.pretrained_cfg["mean"]) and cfg["interpolation"] == "bicubic"
    if variant == "timm_deit_distilled":  # timm's distilled training output: both heads' logits
        wrapped.train().distilled_training = True
        cls, dist = wrapped(x)
        assert cls.shape == dist.shape == (2, 5)
    with pytest.raises(TypeError, match="mdp_vit classification model"):
        as_timm_module(model)


def test_pruned_config_records_the_timm_source():
    model = build("timm_deit_distilled")
    space = build_space(model, group_sizes=GROUPS)
    pruned = slice_model(model, space, PruningChoice({"embed": list(range(16))}))
    config = pruned.config
    assert config.base_model_type == "timm:deit_tiny_distilled_patch16_224"
    assert config.base_model_name_or_path == model.pretrained_cfg["hf_hub_id"]
    assert config.base_config["library"] == "timm" and config.base_config["model_args"]["embed_dim"] == 32
    pre = config.preprocessing
    assert set(pre) == {"mean", "std", "input_size", "interpolation", "crop_pct"}
    assert pre["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]  # the model's size, not its pretrained_cfg's 224
    assert pre["mean"] == list(model.pretrained_cfg["mean"]) and pre["crop_pct"] == model.pretrained_cfg["crop_pct"]
    assert config.layer_norm_eps == 1e-6 and config.attention_scaling == pytest.approx(8**-0.5)
    assert (config.num_extra_tokens, config.classifier_heads) == (2, "cls+distillation")


def test_configs_without_the_timm_fields_load_with_the_transformers_layout():
    old = MDPViTConfig(hidden_size=32, num_hidden_layers=1).to_dict()
    new = ("layer_scale", "pooling", "fc_norm", "no_embed_class", "pre_norm", "patch_bias", "classifier_dropout_prob")
    for key in (*new, "preprocessing"):
        old.pop(key)
    config = MDPViTConfig.from_dict(old)
    assert (config.layer_scale, config.pooling, config.fc_norm, config.no_embed_class) == (None, "token", False, False)
    assert (config.pre_norm, config.patch_bias, config.preprocessing) == (False, True, None)


def _grads_from_one_backward(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(logits_of(model, x), y).backward()


@pytest.mark.parametrize("variant", ["timm_vit", "timm_vit_avgpool_layerscale", "timm_deit_distilled"])
def test_taylor_scores_equal_the_vit_family_scores_of_the_converted_model(variant):
    """The official score (w * dL/dw over linked tensors) through timm's fused qkv equals the vit family's score of
    the same model converted to mdp_vit (the dense slice: separate q/k/v projections), after the same backward."""
    model = build(variant)
    space = build_space(model, group_sizes=GROUPS)
    converted = slice_model(model, space, space.full_choice())
    x, y = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([0, 1, 2, 3])
    for m in (model, converted):
        _grads_from_one_backward(m, x, y)
    ours = get_adapter(model).taylor_scores(model, space, None)
    theirs = get_adapter(converted).taylor_scores(converted, build_space(converted, group_sizes=GROUPS), None)
    assert set(ours) == set(theirs) == set(space.dimensions)
    for name in ours:
        scale = theirs[name].abs().max().item()
        assert scale > 0, name
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-5 * scale), name


@torch.no_grad()
def test_taylor_scores_sum_the_right_qkv_rows_on_a_hand_made_case():
    """All gradients 1: each unit's score is the plain sum of its linked weights (q rows first, k next, v last)."""
    model = tiny_vit(depth=1).double()
    space = build_space(model)
    for p in model.parameters():
        p.uniform_(-1, 1)  # biases too (timm starts them at zero)
        p.grad = torch.ones_like(p)
    scores = get_adapter(model).taylor_scores(model, space, None)
    attn, fc1, fc2 = model.blocks[0].attn, model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    q, k, v = (attn.qkv.weight.sum(1) + attn.qkv.bias).view(3, 4, 8)  # [q|k|v rows] x head x unit
    assert torch.allclose(scores["layers.0.qk_dim"], q.sum(0) / 2)
    assert torch.allclose(scores["layers.0.v_dim"], v.sum(0) / 2)
    assert torch.allclose(scores["layers.0.heads"], (q + k + v).sum(1) / 12)
    assert torch.allclose(scores["layers.0.mlp_dim"], fc1.weight.sum(1) + fc1.bias)
    proj, patch = attn.proj, model.patch_embed.proj
    embed = patch.weight.flatten(1).sum(1) + patch.bias + proj.weight.sum(1) + proj.bias + attn.qkv.weight.sum(0)
    embed = embed + fc2.weight.sum(1) + fc2.bias + fc1.weight.sum(0)
    assert torch.allclose(scores["embed"], embed)  # one layer: divided by depth 1
