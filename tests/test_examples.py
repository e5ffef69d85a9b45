"""examples/image_classification.py end to end, offline: an image folder written here, a tiny ViT built from a
config folder, --load_best_model_at_end, a logger, a push to the loopback Hub stand-in, and the pushed repo
loaded with pipeline(..., trust_remote_code=True) in a process without mdp_hf."""

import importlib.util
import json
import os

import numpy as np
import pytest
from hub_standin import HubStandin
from PIL import Image
from test_hub import BLOCK_MDP_HF, REPO_ROOT, run_client
from transformers import ViTConfig, ViTImageProcessor

CLASSES = ("red", "green", "blue")
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture
def hub():
    with HubStandin(lifetime_s=600) as server:
        yield server


def write_image_folder(root, per_class, seed):
    """32x32 images whose dominant colour is their class (a task a tiny ViT learns in a few steps)."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(CLASSES):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, size=(32, 32, 3))
            pixels[..., index] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")


EXAMPLE_RUN = """
import json, sys, importlib.util
from transformers import TrainerCallback

class RecordEvents(TrainerCallback):  # a logger: it opens its run in on_train_begin, as TensorBoard does
    events = []
    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(["train_begin", args.output_dir])
    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(["log", sorted(logs)])

spec = importlib.util.spec_from_file_location("image_classification", {example!r})
example = sys.modules["image_classification"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
trainer = example.main({argv!r}, callbacks=[RecordEvents()])
json.dump({{"events": RecordEvents.events, "best": trainer.state.best_model_checkpoint,
           "pruning_step": trainer.prunable_config.pruning_steps()[-1]}}, open("events.json", "w"))
"""


def test_image_classification_example_end_to_end(hub, tmp_path):
    write_image_folder(tmp_path / "data" / "train", per_class=12, seed=0)
    write_image_folder(tmp_path / "data" / "validation", per_class=4, seed=1)
    model_dir = tmp_path / "tiny_vit"
    ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64).save_pretrained(model_dir)  # fmt: skip
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        model_dir
    )
    # verify_latency off: a tiny model on a loaded 2-core machine cannot land on a measured budget (its smallest
    # structure measures above it); the measured check is tested in tests/test_latency_check.py
    argv = [
        "--config_name", str(model_dir), "--train_dir", "data/train", "--validation_dir", "data/validation",
        "--output_dir", "out", "--do_train", "--do_eval", "--max_steps", "6", "--per_device_train_batch_size", "8",
        "--learning_rate", "2e-3", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
        "--save_steps", "2", "--load_best_model_at_end", "--metric_for_best_model", "accuracy", "--logging_steps", "1",
        "--report_to", "tensorboard" if HAS_TENSORBOARD else "none", "--use_cpu", "--seed", "0",
        "--dataloader_num_workers", "0", "--budget_fraction", "0.6", "--accumulation_steps", "3",
        "--group_sizes", "embed=8,mlp=16", "--latency_repeats", "3", "--latency_subgrid", "2", "--verify_latency", "false",
        "--push_to_hub", "--hub_model_id", "org/tiny-vit-mdp",
    ]  # fmt: skip
    example = str(REPO_ROOT / "examples" / "image_classification.py")
    run_client(hub, tmp_path, EXAMPLE_RUN.format(example=example, argv=argv), timeout=600)

    # the dense evaluation was logged once the loggers were set up; the best model has the final structure
    record = json.loads((tmp_path / "events.json").read_text())
    assert record["events"][0] == ["train_begin", "out"]
    assert any("dense_accuracy" in keys for kind, keys in record["events"] if kind == "log")
    assert int(record["best"].rsplit("-", 1)[1]) >= record["pruning_step"]
    if HAS_TENSORBOARD:
        assert list((tmp_path / "out" / "runs").iterdir()) and not (tmp_path / "runs").exists()

    files = hub.files("org/tiny-vit-mdp")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "pruning_report.json",
                 "pruning_report.png", "pruning_config.json", "latency_table.json", "modeling_mdp_vit.py"):  # fmt: skip
        assert name in files, name
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl")) or "checkpoint" in n], sorted(files)
    assert json.loads(files["config.json"])["model_type"] == "mdp_vit"
    report = json.loads(files["pruning_report.json"])
    assert report["pruned_params"] < report["dense_params"]
    card = files["README.md"].decode()
    assert "image-classification" in card and "vision" in card and "model-index" in card
    assert "base_model" not in card.split("---")[1]  # built from a local config: no base model on the Hub

    # the pushed repo, in a process without mdp_hf: the pipeline with the saved image processor
    image = tmp_path / "data" / "validation" / "blue" / "0.png"
    out = run_client(
        hub,
        tmp_path,
        prelude=BLOCK_MDP_HF,
        script=f"""
        from transformers import pipeline
        classify = pipeline("image-classification", model="org/tiny-vit-mdp", trust_remote_code=True)
        predictions = classify({str(image)!r})
        assert not any(m.startswith("mdp_hf") for m in sys.modules)
        print("LABELS", sorted(p["label"] for p in predictions))
        """,
    )
    assert f"LABELS {sorted(CLASSES)}" in out
