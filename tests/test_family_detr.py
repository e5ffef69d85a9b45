"""DETR family (DetrForObjectDetection with an HF ResNet backbone): the contract checks of the registry-driven matrix
(gated == sliced, pruning twice, save + fresh-process reload without mdp_hf, parameter count, an exact latency
table with a FLOPs timer) run here on the family's own tiny variants, on logits AND pred_boxes, plus DETR's own
points: the input projection is sliced with the last residual width, post-processing gives the same boxes, Taylor
scores come from the detector's Hungarian-matched loss, unknown backbones are refused.

The variants are not in ``ModelFamily.test_models`` yet: the shared matrix (test_core, test_trainer, ...) still
feeds classification inputs and reloads with ``load_pruned_model``, which picks AutoModel for a detector."""

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import GROUPS
from safetensors.torch import save_file
from test_core import random_choice
from test_latency import flops_timer
from transformers import (
    AutoConfig,
    AutoModelForObjectDetection,
    ConvNextConfig,
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    ResNetConfig,
)
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

from mdp_hf import PruningChoice, build_space, gate_model, slice_model
from mdp_hf.adapters import PruningSpaceError, get_adapter, get_family
from mdp_hf.adapters.detr import TEST_MODELS
from mdp_hf.hub import save_pruned_model
from mdp_hf.latency import TableLatencyModel, TimingSettings, build_table

IMAGE = 64  # a 2x2 feature map after the stride-32 backbone: position embeddings and attention see several tokens
VARIANTS = sorted(TEST_MODELS)
KINDS = {"channels", "residual"}


def build(variant, seed=0):
    """A tiny DETR with random weights and non-trivial (frozen) BatchNorm and LayerNorm values."""
    torch.manual_seed(seed)
    model = TEST_MODELS[variant]()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DetrFrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def images(batch=2, seed=0):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def outputs(model, x):
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits, out.pred_boxes


def scenario(name):
    return {"all": (KINDS, True), "blocks": (set(), True)}.get(name, ({name}, False))


def test_space_is_the_backbones_with_the_input_projection_coupled():
    model = build("detr_bottleneck")
    space = build_space(model, group_sizes=GROUPS)
    assert get_family(model).name == "detr" and space.model_type == "detr"
    last = space.dimensions["stages.2.residual"]
    assert (
        "model.input_projection (in)" in last.coupled
        and "model.backbone.model.encoder.stages.2.layers.0.layer.2" in (last.coupled)
    )
    assert last.min_keep < last.size  # the detector's consumer is sliced with it, so it is prunable
    assert set(space.blocks) == {f"stages.{s}.layers.{j}" for s, n in enumerate([2, 2, 1]) for j in range(n)}
    assert all(d.kind in KINDS for d in space.dimensions.values())  # nothing of the transformer part


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["channels", "residual", "blocks", "all"])
def test_gated_equals_sliced_on_logits_and_boxes(variant, name):
    model = build(variant)
    space = build_space(model, group_sizes=GROUPS)
    x = images()
    dense_logits, dense_boxes = outputs(model, x)
    dense_params = sum(p.numel() for p in model.parameters())
    kinds, remove_blocks = scenario(name)
    for seed in range(3):
        choice = random_choice(space, random.Random(seed), kinds, remove_blocks)
        if name == "blocks" and not choice.removed_blocks:
            choice.removed_blocks = [next(iter(space.blocks))]
        with gate_model(model, space, choice):
            gated_logits, gated_boxes = outputs(model, x)
        pruned = slice_model(model, space, choice)
        assert type(pruned).__name__ == "MDPDetrForObjectDetection"
        logits, boxes = outputs(pruned, x)
        assert (gated_logits - logits).abs().max().item() < 1e-5, choice
        assert (gated_boxes - boxes).abs().max().item() < 1e-5, choice
        assert sum(p.numel() for p in pruned.parameters()) < dense_params
        assert (logits - dense_logits).abs().max().item() > 1e-4
        assert sum(p.numel() for p in pruned.parameters()) == get_adapter(pruned).expected_num_parameters(pruned.config)
    assert torch.equal(outputs(model, x)[0], dense_logits)  # gates removed: the dense model again
    assert torch.equal(outputs(model, x)[1], dense_boxes)


def test_input_projection_is_sliced_with_the_last_residual_width():
    model = build("detr_bottleneck")
    space = build_space(model, group_sizes=GROUPS)
    kept = [1, 4, 5, 9, 20, 31]
    pruned = slice_model(model, space, PruningChoice({"stages.2.residual": kept}))
    weight = pruned.model.input_projection.weight
    assert weight.shape == (16, len(kept), 1, 1)
    assert torch.equal(weight, model.model.input_projection.weight[:, kept])
    assert pruned.config.backbone_structure["hidden_sizes"] == [16, 24, len(kept)]
    # the transformer part is kept as it is
    assert torch.equal(pruned.model.encoder.layers[0].mlp.fc1.weight, model.model.encoder.layers[0].mlp.fc1.weight)


def test_unpruned_export_computes_the_dense_detector_and_trains_the_same_parameters():
    model = build("detr_basic")
    space = build_space(model, group_sizes=GROUPS)
    full = slice_model(model, space, space.full_choice())
    x = images()
    for got, expected in zip(outputs(full, x), outputs(model, x)):
        assert (got - expected).abs().max().item() < 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in full.named_parameters() if p.requires_grad} == trainable  # DETR's backbone freezing
    assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in model.parameters())


def test_pruned_detector_can_be_pruned_again():
    model = build("detr_bottleneck")
    space = build_space(model, group_sizes=GROUPS)
    rng = random.Random(1)
    first = random_choice(space, rng, KINDS, True)
    pruned = slice_model(model, space, first)
    space2 = build_space(pruned, group_sizes=GROUPS)
    assert set(space2.blocks) == set(space.blocks) - set(first.removed_blocks)
    second = random_choice(space2, rng, KINDS, True)
    x = images()
    with gate_model(pruned, space2, second):
        gated = outputs(pruned, x)
    twice = slice_model(pruned, space2, second)
    for got, expected in zip(outputs(twice, x), gated):
        assert (got - expected).abs().max().item() < 1e-5
    assert twice.config.base_model_type == "detr" and twice.config.base_config["model_type"] == "detr"


def test_post_processing_gives_the_same_boxes_for_gated_and_sliced():
    model = build("detr_bottleneck")
    space = build_space(model, group_sizes=GROUPS)
    choice = random_choice(space, random.Random(5), KINDS, True)
    processor = DetrImageProcessor()
    x = images(batch=3)
    sizes = [(480, 640)] * 3
    with gate_model(model, space, choice), torch.no_grad():
        gated_out = model(pixel_values=x)
    with torch.no_grad():
        sliced_out = slice_model(model, space, choice)(pixel_values=x)
    # a threshold inside the score range, so the selection itself is compared too
    threshold = gated_out.logits.softmax(-1)[..., :-1].max(-1).values.median().item()
    gated = processor.post_process_object_detection(gated_out, threshold=threshold, target_sizes=sizes)
    sliced = processor.post_process_object_detection(sliced_out, threshold=threshold, target_sizes=sizes)
    assert sum(len(r["boxes"]) for r in gated) > 0
    for g, s in zip(gated, sliced):
        assert torch.equal(g["labels"], s["labels"])
        assert torch.allclose(g["scores"], s["scores"], atol=1e-5)
        assert torch.allclose(g["boxes"], s["boxes"], atol=1e-3)  # pixels at 640x480


def test_taylor_scores_from_the_detection_loss_are_finite_and_nonzero():
    model = build("detr_bottleneck").train()
    space = build_space(model, group_sizes=GROUPS)
    adapter = get_adapter(model)
    gates = gate_model(model, space)
    labels = [
        {"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])},
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.4, 0.5, 0.5]])},
    ]
    out = model(pixel_values=images(), labels=labels)
    assert set(out.loss_dict) >= {"loss_ce", "loss_bbox", "loss_giou"}
    out.loss.backward()
    scores = adapter.taylor_scores(model, space, gates)
    assert set(scores) == set(space.dimensions)
    for name, score in scores.items():
        assert score.shape == (space.dimensions[name].size,)
        assert torch.isfinite(score).all(), name
        assert score.abs().sum() > 0, name
    # DETR freezes the backbone (frozen BatchNorms, no parameter gradients): the gates are what carries the score
    assert all(p.grad is None for p in model.model.backbone.parameters())
    gates.remove()


def test_unknown_backbones_are_clear_errors():
    common = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16)
    common.update(encoder_attention_heads=2, decoder_attention_heads=2, num_queries=4, num_labels=3)
    convnext = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"])
    model = DetrForObjectDetection(DetrConfig(use_timm_backbone=False, backbone_config=convnext, **common))
    with pytest.raises(PruningSpaceError, match=r"'convnext' backbone.*use_timm_backbone=False.*ResNetConfig"):
        build_space(model)
    timm = DetrForObjectDetection(DetrConfig(use_timm_backbone=True, backbone="resnet10t", **common))
    with pytest.raises(PruningSpaceError, match=r"timm backbone \(use_timm_backbone=True\).*ResNetConfig"):
        build_space(timm)
    early = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage1"])
    model = DetrForObjectDetection(DetrConfig(use_timm_backbone=False, backbone_config=early, **common))
    with pytest.raises(PruningSpaceError, match=r"out_features=\['stage2'\]"):
        build_space(model)


def test_save_and_reload_in_a_fresh_process_without_mdp_hf(tmp_path):
    model = build("detr_bottleneck")
    space = build_space(model, group_sizes=GROUPS)
    pruned = slice_model(model, space, random_choice(space, random.Random(3), KINDS, True))
    x = images()
    logits, boxes = outputs(pruned, x)
    with torch.no_grad():
        base = pruned.model(pixel_values=x).last_hidden_state
    processor = DetrImageProcessor(size={"height": IMAGE, "width": IMAGE}, do_pad=False)
    out = save_pruned_model(pruned, tmp_path / "pruned", image_processor=processor)
    assert (out / "modeling_mdp_detr.py").exists() and (out / "modeling_mdp_resnet.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForObjectDetection"] == "modeling_mdp_detr.MDPDetrForObjectDetection"
    reloaded = AutoModelForObjectDetection.from_pretrained(out).eval()  # the Auto API knows mdp_detr with mdp_hf
    # to 1e-6, not bit for bit: kernels may sum in another order on differently aligned buffers (test_core)
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(outputs(reloaded, x), (logits, boxes)))
    n_params = sum(p.numel() for p in reloaded.parameters())
    assert n_params == get_adapter(reloaded).expected_num_parameters(reloaded.config)

    save_file({"x": x, "logits": logits, "boxes": boxes, "base": base}, str(tmp_path / "io.safetensors"))
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "mdp_hf" or name.startswith("mdp_hf."):
                    raise ImportError("mdp_hf must not be needed to load a pruned model")
        sys.meta_path.insert(0, Block())
        import numpy as np, torch
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForObjectDetection, pipeline
        io = load_file({str(tmp_path / "io.safetensors")!r})
        model = AutoModelForObjectDetection.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            got = model(pixel_values=io["x"])
        assert (got.logits - io["logits"]).abs().max() < 1e-6, (got.logits - io["logits"]).abs().max()
        assert (got.pred_boxes - io["boxes"]).abs().max() < 1e-6, (got.pred_boxes - io["boxes"]).abs().max()
        base = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(base).__name__ == "MDPDetrModel", type(base)
        with torch.no_grad():
            assert (base(pixel_values=io["x"]).last_hidden_state - io["base"]).abs().max() < 1e-6
        detector = pipeline("object-detection", model={str(out)!r}, trust_remote_code=True)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, ({IMAGE}, {IMAGE}, 3), dtype=np.uint8))
        found = detector(image, threshold=0.0)
        assert len(found) == {pruned.config.num_queries} and set(found[0]["box"]) == {{"xmin", "ymin", "xmax", "ymax"}}
        assert not any(m.startswith("mdp_hf") for m in sys.modules)
        print("FRESH_OK", sum(p.numel() for p in model.parameters()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"FRESH_OK {n_params}" in result.stdout


def test_edited_config_that_changes_the_function_is_refused(tmp_path):
    model = build("detr_basic")
    space = build_space(model, group_sizes=GROUPS)
    out = save_pruned_model(slice_model(model, space, PruningChoice({"stem": [0, 2, 4, 6]})), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["decoder_attention_heads"] = 4  # same weight shapes, another function
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="decoder_attention_heads"):
        AutoConfig.from_pretrained(out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_latency_plan_covers_the_whole_detector(variant):
    """A FLOPs 'timer' (each cell's module FLOPs, no timing): the terms sum to the whole sliced detector's FLOPs, so
    the plan covers backbone, input projection and the transformer part, and nothing twice."""
    model = build(variant)
    space = build_space(model, group_sizes=GROUPS)
    settings = TimingSettings(image_size=IMAGE)
    table = build_table(
        model,
        space=space,
        timer=flops_timer(model, space, settings),
        image_size=IMAGE,
        repeats=1,
        warmup=0,
        progress=False,
    )
    terms = {t.name: t for t in table.terms}
    _, stage_names = get_adapter(model)._residual_names(model.model.backbone.model)
    assert terms["input_projection"].dims == [stage_names[-1]] and terms["transformer"].dims == []
    assert "pool+classifier" not in terms
    lm = TableLatencyModel(table)

    def mflops(m):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            m(pixel_values=torch.randn(1, 3, IMAGE, IMAGE))
        return counter.get_total_flops() / 1e6

    rng = random.Random(0)
    for _ in range(3):
        choice = random_choice(space, rng, KINDS, True)
        pruned = slice_model(model, space, choice)
        truth = mflops(pruned)
        assert lm.predict((space, choice)) == pytest.approx(truth, rel=1e-9)
        assert lm.predict(pruned) == pytest.approx(truth, rel=1e-9)
        assert lm.predict(pruned.config) == pytest.approx(truth, rel=1e-9)
    assert lm.predict(model) == pytest.approx(mflops(model), rel=1e-9)
    transformer = terms["transformer"]
    assert lm.predict(model) > float(table.tables[transformer.table].values.reshape(-1)[0]) > 0


def test_a_pruned_detector_saved_without_a_processor_gets_detrs_standard_one(tmp_path):
    # pipeline("object-detection", model=dir) needs a processor in the folder; a run that gives none gets DETR's own
    model = build("detr_basic")
    space = build_space(model, group_sizes=GROUPS)
    pruned = slice_model(model, space, random_choice(space, random.Random(1), KINDS, False))
    out = save_pruned_model(pruned, tmp_path / "pruned")
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"].startswith("DetrImageProcessor")
    assert saved["size"] == DetrImageProcessor().size
