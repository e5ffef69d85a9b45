"""The yolos family: transformers' YolosForObjectDetection pruned as a ViT with detection tokens and MLP heads.

The registry-driven matrix (test_core, test_latency, test_trainer) runs the registered tiny variants through
gated == sliced (logits and boxes), pruning twice, save -> fresh-process reload and the FLOPs-exact latency table;
this file tests what is particular to a detector: the export computes what transformers' YOLOS computes (outputs at
any input size, the Hungarian-matched loss), importance from detection batches, post-processing and the
object-detection pipeline of a saved folder, the latency cells of the whole detector, and bad detection input.
"""

import random
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, NUM_LABELS, build, detection_targets
from test_core import ALL_KINDS, random_choice

from mdp_hf import PruningChoice, build_space, gate_model, slice_model
from mdp_hf.adapters import PruningSpaceError, get_family
from mdp_hf.data import check_detection_labels, coco_boxes_to_cxcywh, detection_collate
from mdp_hf.hub import load_pruned_model, save_pruned_model

VARIANTS = ["yolos", "yolos_mid_pe"]


def outputs(model, x, **kwargs):
    with torch.no_grad():
        out = model(x, **kwargs)
    return out.logits, out.pred_boxes


class Detections(torch.utils.data.Dataset):
    """Random images with random boxes, as a detection dataset yields them (one dict per example)."""

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        self.targets = detection_targets(n, seed)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.targets[i]}


def test_registered_as_an_object_detection_family():
    family = get_family("yolos")
    assert family.task == "object-detection" and get_family("mdp_yolos") is family
    from transformers import AutoModelForObjectDetection

    from mdp_hf.modeling.configuration_mdp_yolos import MDPYolosConfig
    from mdp_hf.modeling.modeling_mdp_yolos import MDPYolosForObjectDetection

    config = MDPYolosConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, qk_head_dim=8, v_head_dim=8,
                            intermediate_size=16, image_size=[16, 16], patch_size=8, num_detection_tokens=3,
                            detection_head_hidden_size=16)  # fmt: skip
    assert type(AutoModelForObjectDetection.from_config(config)) is MDPYolosForObjectDetection


@pytest.mark.parametrize("variant", VARIANTS)
def test_space_is_the_vit_space_with_detection_tokens_kept(variant):
    model = build(variant)
    space = build_space(model, group_sizes=GROUPS)
    vit_space = build_space(build("vit"), group_sizes=GROUPS)
    assert set(space.dimensions) == set(vit_space.dimensions) and set(space.blocks) == set(vit_space.blocks)
    coupled = space.dimensions["embed"].coupled
    assert "vit.embeddings.detection_tokens" in coupled  # tokens follow the width; their number is never pruned
    assert (
        "class_labels_classifier.layers.0.weight[:, in]" in coupled
        and "bbox_predictor.layers.0.weight[:, in]" in coupled
    )
    assert ("vit.mid position embeddings" in coupled) == (variant == "yolos_mid_pe")
    choice = random_choice(space, random.Random(0), ALL_KINDS, True)
    pruned = slice_model(model, space, choice)
    assert pruned.config.num_detection_tokens == model.config.num_detection_tokens
    assert pruned.class_labels_classifier.layers[0].in_features == len(choice.kept_indices(space, "embed"))
    assert pruned.class_labels_classifier.layers[1].in_features == model.config.hidden_size  # head hidden: kept
    assert pruned.class_labels_classifier.layers[2].out_features == NUM_LABELS + 1  # + "no object"


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_computes_what_transformers_yolos_computes_at_any_input_size(variant):
    """The unpruned export equals YolosForObjectDetection (logits and boxes), also at another resolution, where
    YOLOS resizes its position embeddings; a pruned export equals the gated model there too."""
    model = build(variant)
    space = build_space(model, group_sizes=GROUPS)
    full = slice_model(model, space, space.full_choice())
    choice = random_choice(space, random.Random(2), ALL_KINDS, True)
    pruned = slice_model(model, space, choice)
    for shape in ((IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE + 16, IMAGE_SIZE + 8)):
        x = torch.randn(2, 3, *shape)
        for got, expected in zip(outputs(full, x), outputs(model, x)):
            assert (got - expected).abs().max() < 1e-5, shape
        with gate_model(model, space, choice):
            gated = outputs(model, x)
        for got, expected in zip(outputs(pruned, x), gated):
            assert (got - expected).abs().max() < 1e-5, shape


def test_export_has_the_same_hungarian_loss_as_transformers_yolos():
    model = build("yolos_mid_pe")
    space = build_space(model, group_sizes=GROUPS)
    full = slice_model(model, space, space.full_choice())
    x, labels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE), detection_targets(3, seed=4)
    with torch.no_grad():
        expected = model(x, labels=labels)
        got = full(x, labels=labels)
    assert got.loss == pytest.approx(float(expected.loss), rel=1e-5)
    assert set(got.loss_dict) == set(expected.loss_dict) >= {"loss_ce", "loss_bbox", "loss_giou"}


def _synthetic_latency(model, space):
    from mdp_hf.latency import TableLatencyModel, build_table

    # a synthetic, additive 'latency' (sum of each cell's widths): exact and machine-independent
    table = build_table(model, space=space, timer=lambda t, widths: float(sum(widths)), repeats=1, warmup=0,
                        progress=False, image_size=IMAGE_SIZE)  # fmt: skip
    return TableLatencyModel(table)


def test_one_shot_prune_scores_with_the_detectors_loss_from_collated_batches():
    """prune() on a DataLoader of detection examples collated by detection_collate: the importance comes from the
    detector's own loss (its gradients reach every dimension), the result meets the budget and still detects."""
    from mdp_hf import PrunableConfig
    from mdp_hf.pruning import PruningSession, accumulate_importance, prune

    model = build("yolos")
    config = PrunableConfig(budget_fraction=0.6, group_sizes=GROUPS, accumulation_steps=2, verify_latency=False)
    loader = torch.utils.data.DataLoader(Detections(8), batch_size=4, collate_fn=detection_collate)
    latency = _synthetic_latency(model, build_space(model, group_sizes=GROUPS))
    session = PruningSession(model, config, latency)
    try:
        accumulate_importance(session, model, loader, 2)
        scores = session.scores.commit()
    finally:
        session.gates.remove()
    for name in session.space.dimensions:
        assert torch.as_tensor(scores[name]).abs().sum() > 0, name
    pruned, result = prune(model, config, loader, latency)
    assert result.predicted_latency_ms <= result.budget_ms * (1 + 1e-9)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    logits, boxes = outputs(pruned, torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert logits.shape == (2, 5, NUM_LABELS + 1) and boxes.shape == (2, 5, 4) and torch.isfinite(logits).all()


def test_post_processing_gives_the_same_boxes_for_the_gated_and_the_sliced_model():
    from transformers import YolosImageProcessor

    model = build("yolos_mid_pe")
    space = build_space(model, group_sizes=GROUPS)
    choice = random_choice(space, random.Random(5), ALL_KINDS, True)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    sizes = torch.tensor([[480, 640], [300, 200]])
    processor = YolosImageProcessor()
    with gate_model(model, space, choice), torch.no_grad():
        gated = processor.post_process_object_detection(model(x), threshold=0.0, target_sizes=sizes)
    with torch.no_grad():
        sliced = processor.post_process_object_detection(slice_model(model, space, choice)(x), 0.0, sizes)
    for a, b in zip(gated, sliced):
        assert torch.equal(a["labels"], b["labels"]) and len(a["boxes"]) == 5
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3) and torch.allclose(a["scores"], b["scores"], atol=1e-5)


def test_saved_detector_works_in_the_object_detection_pipeline_without_mdp_hf(tmp_path):
    """The folder holds a YolosImageProcessor: pipeline("object-detection", trust_remote_code=True) loads it in a
    process where mdp_hf cannot be imported, and reports what post-processing the loaded model's outputs gives."""
    model = build("yolos")
    space = build_space(model, group_sizes=GROUPS)
    pruned = slice_model(model, space, random_choice(space, random.Random(6), ALL_KINDS, True))
    out = save_pruned_model(pruned, tmp_path / "detector")
    assert (out / "preprocessor_config.json").exists()
    assert type(load_pruned_model(out)).__name__ == "MDPYolosForObjectDetection"
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "mdp_hf" or name.startswith("mdp_hf."):
                    raise ImportError("mdp_hf must not be needed")
        sys.meta_path.insert(0, Block())
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
        detector = pipeline("object-detection", model={str(out)!r}, trust_remote_code=True)
        found = detector(image, threshold=0.0)
        assert len(found) == 5 and {{"score", "label", "box"}} <= set(found[0]), found
        processor = AutoImageProcessor.from_pretrained({str(out)!r})
        model = AutoModelForObjectDetection.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        inputs = processor(images=image, return_tensors="pt")
        assert tuple(inputs["pixel_values"].shape[-2:]) == (32, 32)
        with torch.no_grad():
            result = processor.post_process_object_detection(model(**inputs), 0.0, torch.tensor([[48, 64]]))[0]
        assert sorted(round(d["score"], 4) for d in found) == sorted(round(s, 4) for s in result["scores"].tolist())
        assert not any(m.startswith("mdp_hf") for m in sys.modules)
        print("PIPELINE_OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PIPELINE_OK" in result.stdout


@pytest.mark.filterwarnings("ignore:the dense reference timing is noisy")
@pytest.mark.filterwarnings("ignore:latency table:")  # cells timed on a shared machine: noisy, reported only
def test_latency_cells_time_the_whole_detector_and_predict_random_subnetworks(tmp_path):
    """The table's terms are the ViT blocks plus the rest of the detector over the embedding width (tokens, heads);
    predicted and measured latency of random sub-networks are both reported (no timing assertion)."""
    from mdp_hf.latency import TableLatencyModel, TimingSettings, build_table, measure_latency
    from mdp_hf.latency.profiler import family_cells

    model = build("yolos_mid_pe")
    space = build_space(model, group_sizes={"embed": 8, "heads": 2, "qk": 4, "v": 4, "mlp": 32})
    cells = family_cells(model, space, TimingSettings(image_size=IMAGE_SIZE))
    assert cells.model_shapes()["family"] == "yolos" and cells.tokens == 1 + 16 + 5
    table = build_table(
        model, space=space, repeats=2, warmup=1, progress=False, subgrid=2, validate=1, image_size=IMAGE_SIZE
    )
    assert table.complete and table.validation  # interpolation checked on cells off the sub-grid
    names = [term.name for term in table.terms]
    assert "embeddings+final_norm+classifier" in names  # the rest of the detector: tokens, norms, both heads
    lm = TableLatencyModel(table)
    rng = random.Random(0)
    for _ in range(2):
        choice = random_choice(space, rng, ALL_KINDS, True)
        pruned = slice_model(model, space, choice)
        predicted, measured = lm.predict(pruned), measure_latency(pruned, repeats=3, image_size=IMAGE_SIZE).ms
        assert predicted > 0 and measured > 0  # figures, not a timing check: the machine is shared
    assert lm.predict(model) == pytest.approx(lm.dense_ms())


# --- MDPTrainer --------------------------------------------------------------------------------------------------
def test_trainer_prunes_a_detector_and_exports_it_for_the_pipeline(tmp_path):
    from transformers import TrainingArguments

    from mdp_hf import PrunableConfig
    from mdp_hf.trainer import MDPTrainer

    model = build("yolos")
    space = build_space(model, group_sizes=GROUPS)
    trainer = MDPTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=4,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
        ),  # fmt: skip
        prunable_config=PrunableConfig(
            budget_fraction=0.6, group_sizes=GROUPS, accumulation_steps=2, verify_latency=False
        ),  # fmt: skip
        latency_model=_synthetic_latency(model, space),
        train_dataset=Detections(16),
        data_collator=detection_collate,
    )
    trainer.train()
    assert trainer.mdp.finished
    report = trainer.export_pruned(str(tmp_path / "pruned"))
    assert report["pruned_params"] < report["dense_params"]
    folder = tmp_path / "pruned"
    assert (folder / "preprocessor_config.json").exists()
    assert "pipeline_tag: object-detection" in (folder / "README.md").read_text()
    reloaded = load_pruned_model(folder)
    logits, boxes = outputs(reloaded, torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert boxes.shape == (1, 5, 4) and torch.isfinite(logits).all()


# --- bad input ---------------------------------------------------------------------------------------------------
def test_coco_boxes_convert_to_normalised_cxcywh_and_outside_boxes_are_refused():
    boxes = coco_boxes_to_cxcywh([[0, 0, 32, 16], [8, 4, 8, 8]], width=32, height=32)
    assert torch.allclose(boxes, torch.tensor([[0.5, 0.25, 1.0, 0.5], [0.375, 0.25, 0.25, 0.25]]))
    with pytest.raises(ValueError, match="outside the 32x32 image"):
        coco_boxes_to_cxcywh([[20, 0, 16, 8]], width=32, height=32)
    with pytest.raises(ValueError, match="width, height > 0"):
        coco_boxes_to_cxcywh([[2, 2, 0, 8]], width=32, height=32)


@pytest.mark.parametrize(
    "labels,message",
    [
        ([{"class_labels": torch.tensor([1])}], "needs 'class_labels' and 'boxes'.*without boxes"),
        ([{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.9, 0.5, 0.4, 0.2]])}], "outside the image"),
        ([{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 1.2, 0.2]])}], "outside the image"),
        ([{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.2]])}], "w, h > 0"),
        ([{"class_labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.2]])}], r"\[n, 4\]"),
        ([{"class_labels": torch.tensor([7]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.2]])}], r"outside \[0, 5\)"),
        (torch.tensor([1, 2]), "a list with one dict per image"),
    ],
)
def test_bad_detection_labels_are_clear_errors(labels, message):
    with pytest.raises(ValueError, match=message):
        check_detection_labels(labels, num_labels=NUM_LABELS)


@pytest.mark.parametrize(
    "target,message",
    [({"class_labels": [1]}, "without boxes"), ({"class_labels": [1], "boxes": [[0.5, 0.5, 0.1, 1.5]]}, "outside")],
)
def test_the_detection_collator_refuses_bad_targets(target, message):
    with pytest.raises(ValueError, match=f"detection_collate: labels.*{message}"):
        detection_collate([{"pixel_values": torch.zeros(3, 4, 4), "labels": target}])


def test_images_without_objects_are_valid_targets():
    batch = detection_collate([{"pixel_values": torch.zeros(3, 4, 4), "labels": {"class_labels": [], "boxes": []}}])
    assert batch["labels"][0]["boxes"].shape == (0, 4) and batch["labels"][0]["class_labels"].dtype == torch.int64


def test_trainer_refuses_a_detection_dataset_without_boxes_before_training(tmp_path):
    from transformers import TrainingArguments

    from mdp_hf import PrunableConfig
    from mdp_hf.trainer import MDPTrainer

    class NoBoxes(Detections):
        def __getitem__(self, i):
            return {"pixel_values": self.x[i], "labels": {"class_labels": self.targets[i]["class_labels"]}}

    model = build("yolos")
    with pytest.raises(ValueError, match="MDPTrainer train_dataset labels.*without boxes"):
        MDPTrainer(
            model=model,
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
            prunable_config=PrunableConfig(budget_fraction=0.6, group_sizes=GROUPS),
            latency_model=object(),  # never reached: the data is refused first
            train_dataset=NoBoxes(4),
            data_collator=detection_collate,
        )


def test_prune_refuses_labels_of_the_wrong_task_before_scoring():
    from mdp_hf import PrunableConfig
    from mdp_hf.pruning import prune

    config = PrunableConfig(budget_fraction=0.6, group_sizes=GROUPS, verify_latency=False, accumulation_steps=1)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    detector = build("yolos")
    with pytest.raises(ValueError, match="a list with one dict per image"):  # class labels given to a detector
        prune(
            detector, config, [(x, torch.tensor([0, 1]))], _synthetic_latency(detector, build_space(detector, GROUPS))
        )
    classifier = build("vit")
    with pytest.raises(ValueError, match="detection labels.*image-classification model"):
        prune(
            classifier,
            config,
            [(x, detection_targets(2))],
            _synthetic_latency(classifier, build_space(classifier, GROUPS)),
        )


def test_yolos_options_the_format_cannot_express_are_refused_by_name():
    from transformers import YolosForObjectDetection

    model = build("yolos")
    model.config.auxiliary_loss = True
    with pytest.raises(PruningSpaceError, match="auxiliary_loss=True"):
        build_space(model)

    class MyYolos(YolosForObjectDetection):
        pass

    with pytest.raises(PruningSpaceError, match="the class .*MyYolos.*only YolosForObjectDetection"):
        build_space(MyYolos(build("yolos").config))


def test_choice_errors_name_the_dimension():
    model = build("yolos")
    space = build_space(model, group_sizes=GROUPS)
    with pytest.raises(PruningSpaceError, match=r"out of range \[0, 32\)"):
        slice_model(model, space, PruningChoice({"embed": [0, 40]}))
