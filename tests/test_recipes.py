"""Recipes: a quick end-to-end run, the bad inputs a new user hits, and (slow) the embedded defaults."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from transformers import BeitConfig, DeiTConfig, ResNetConfig

from mdp_hf.data import load_image_classification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = [
    "--max_train_samples",
    "128",
    "--max_eval_samples",
    "64",
    "--dense_epochs",
    "0",
    "--max_steps",
    "6",
    "--accumulation_steps",
    "2",
    "--latency_repeats",
    "3",
    "--latency_subgrid",
    "2",
    "--latency_batch_size",
    "2",
    "--logging_steps",
    "1",
    "--per_device_train_batch_size",
    "16",
    "--pruning_interval",
    "1",
    "--verify_latency",
    "false",  # tiny models on a busy machine: the measured check is tested in test_latency_check and the main job
    "--budget_fraction",
    "0.8",
]


QUICK_MS = QUICK[:-2]  # without the fraction, for runs that give --budget_ms


def run_recipe(recipe, *argv, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "recipes", recipe), *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def tiny_config(tmp_path, config, name):
    path = tmp_path / name
    config.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "recipe,config",
    [
        (
            "prune_deit.py",
            DeiTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                architectures=["DeiTForImageClassification"],
            ),
        ),
        pytest.param(  # the ResNet recipe end to end: test_main_job's resnet_job (the shared code: the DeiT case)
            "prune_resnet.py",
            ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck"),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_quick_recipe_run_writes_a_loadable_pruned_model(tmp_path, recipe, config):
    out = tmp_path / "out"
    group = ["--group_sizes", json.dumps({"embed": 8, "mlp": 16, "channels": 4, "residual": 8})]
    result = run_recipe(
        recipe, "--model_config", tiny_config(tmp_path, config, "cfg"), "--output_dir", str(out), *QUICK, *group
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "measured latency (ms)" in result.stdout and str(out) in result.stdout
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["world_size"] == 1 and report["pruned_params"] < report["dense_params"]
    assert report["dense_accuracy"] is not None and report["pruned_accuracy"] is not None
    assert report["predicted_latency_ms"] <= report["budget_ms"] * (1 + 1e-9)
    for name in ("README.md", "pruning_report.png", "latency_table.json", "model.safetensors", "pruning_config.json"):
        assert (out / name).is_file(), name
    from mdp_hf.hub import load_pruned_model

    assert load_pruned_model(out).config.model_type.startswith("mdp_")
    # the recipe's evaluation preprocessing travels with the model: AutoImageProcessor and pipeline() load offline
    from transformers import AutoImageProcessor, pipeline

    assert AutoImageProcessor.from_pretrained(out).size == {"height": 32, "width": 32}
    image = load_image_classification("digits", None, None, "image", "label", 0)["validation"][0]["image"]
    predictions = pipeline("image-classification", model=str(out), trust_remote_code=True)(image)
    assert len(predictions) == 5 and all(p["label"] in [str(d) for d in range(10)] for p in predictions)
    # a second run into the same folder is refused before any work
    again = run_recipe(recipe, "--model_config", tiny_config(tmp_path, config, "cfg"), "--output_dir", str(out), *QUICK)
    assert again.returncode != 0 and "already holds a finished pruning run" in again.stderr
    assert "--overwrite_output_dir" in again.stderr


@pytest.mark.parametrize(
    "recipe,name,kwargs,schedule",
    [  # a timm name gets the paper preset: DeiT's 50 iterative steps are shortened to fit --max_steps 6
        ("prune_deit.py", "timm:deit_tiny_patch16_224",
         dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), ["--num_pruning_steps", "3"]),
        ("prune_resnet.py", "timm:resnet18", dict(layers=[1, 1, 1, 1], channels=[16, 24, 32, 48]), []),
    ],
)  # fmt: skip
def test_quick_recipe_run_on_a_timm_model_by_name(tmp_path, recipe, name, kwargs, schedule):
    """--model_name_or_path timm:<architecture> with --pretrained false (no Hub here): the same recipe, the
    pruned model exported in the project's format with an image processor, so pipeline() works on it."""
    out = tmp_path / "out"
    group = ["--group_sizes", json.dumps({"embed": 8, "mlp": 16, "channels": 4, "residual": 8})]
    result = run_recipe(
        recipe, "--model_name_or_path", name, "--pretrained", "false", "--model_kwargs", json.dumps(kwargs),
        "--image_size", "32", "--output_dir", str(out), *QUICK, *group, *schedule,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["pruned_params"] < report["dense_params"] and report["schedule_finished"]
    assert report["base_model"] == name.split(":", 1)[1]
    assert (out / "preprocessor_config.json").is_file()
    card = (out / "README.md").read_text()
    # random weights of a timm architecture: named in the card's body, no base_model (not a Hub repo) in its metadata
    assert f"pruned from **{name.split(':', 1)[1]}**" in card and "base_model" not in card.split("---")[1]
    assert "mean [" in card and "interpolation" in card
    from transformers import pipeline

    from mdp_hf.data import load_image_classification

    image = load_image_classification("digits", None, None, "image", "label", 0)["validation"][0]["image"]
    classify = pipeline("image-classification", model=str(out), trust_remote_code=True)
    assert len(classify(image.convert("RGB"))) > 0


def test_timm_names_are_parsed_without_the_hub():
    from mdp_hf.recipes import create_timm_model, is_timm_name

    assert is_timm_name("timm/deit_small_patch16_224.fb_in1k") and is_timm_name("hf-hub:timm/resnet50.a1_in1k")
    assert is_timm_name("timm:resnet50") and not is_timm_name("facebook/deit-small-patch16-224")
    model = create_timm_model("timm/resnet18.a1_in1k", pretrained=False, num_labels=7)
    assert model.fc.out_features == 7
    with pytest.raises(ValueError, match="no architecture"):
        create_timm_model("timm:not_a_net", pretrained=False, num_labels=7)


def test_unsupported_family_fails_before_training(tmp_path):
    """A vision model transformers builds (BEiT) but mdp_hf has no family for: mdp_hf's own error, naming the model
    and what is supported, before the latency table or any training."""
    beit = BeitConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        architectures=["BeitForImageClassification"],
    )
    result = run_recipe(
        "prune_deit.py",
        "--model_config",
        tiny_config(tmp_path, beit, "beit"),
        "--output_dir",
        str(tmp_path / "o"),
        *QUICK,
    )
    assert result.returncode != 0
    assert "UnsupportedModelError: mdp_hf has no model family for BeitForImageClassification (model_type 'beit')" in (
        result.stderr
    )
    assert "Supported: transformers model_types" in result.stderr and "'Adding a model family'" in result.stderr
    assert "Unrecognized configuration" not in result.stderr
    assert not (tmp_path / "o" / "latency_table.json").exists() and not (tmp_path / "o" / "_mdp_run").exists()
    assert "train_runtime" not in result.stdout + result.stderr  # nothing was trained


def test_impossible_budget_fails_before_training(tmp_path):
    config = DeiTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        architectures=["DeiTForImageClassification"],
    )
    both = run_recipe(
        "prune_deit.py",
        "--model_config",
        tiny_config(tmp_path, config, "cfg"),
        "--output_dir",
        str(tmp_path / "o"),
        *QUICK,
        "--budget_ms",
        "0.000001",
    )
    assert both.returncode != 0 and "PrunableConfig.budget_ms/budget_fraction" in both.stderr
    result = run_recipe(
        "prune_deit.py",
        "--model_config",
        tiny_config(tmp_path, config, "cfg"),
        "--output_dir",
        str(tmp_path / "o2"),
        *QUICK_MS,
        "--dense_epochs",
        "5",
        "--budget_ms",
        "0.000001",
    )
    assert result.returncode != 0 and "smallest reachable latency" in result.stderr
    assert "train_runtime" not in result.stdout + result.stderr  # nothing was trained


def test_recipe_arguments_from_yaml(tmp_path):
    from mdp_hf.recipes import parse_args

    path = tmp_path / "run.yaml"
    path.write_text("budget_ms: 3.5\nnum_train_epochs: 2\noutput_dir: somewhere\nprune: [heads, mlp, blocks]\n")
    script, pruning, training = parse_args(
        {"budget_fraction": 0.5, "dense_epochs": 7, "output_dir": "x"}, "deit_paper", [str(path)]
    )
    assert pruning.budget_ms == 3.5 and pruning.budget_fraction is None and pruning.prune == ["heads", "mlp", "blocks"]
    assert training.num_train_epochs == 2 and training.output_dir == "somewhere" and script.dense_epochs == 7


def test_demo_defaults_never_reach_a_pretrained_model_and_presets_apply(capsys):
    from mdp_hf.presets import GROUP_SIZE_PRESETS
    from mdp_hf.recipes import parse_args

    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import prune_deit
    import prune_resnet

    # the embedded demo: its own scaled-down values
    script, pruning, training = parse_args(prune_deit.DEFAULTS, "deit_paper", [])
    assert script.dense_epochs == 15 and pruning.accumulation_steps == 30 and script.preset is None
    assert pruning.schedule == "iterative" and script.teacher == "dense"
    # a pretrained model (as in the README's DeiT-B command): the paper's values, no dense training
    real = ["--model_name_or_path", "facebook/deit-base-distilled-patch16-224", "--budget_fraction", "0.5"]
    script, pruning, training = parse_args(prune_deit.DEFAULTS, "deit_paper", real)
    assert (
        script.dense_epochs == 0
        and script.preset == "deit_paper"
        and script.teacher == "dense"
        and script.kl_weight == 1e5
    )
    assert pruning.group_sizes == GROUP_SIZE_PRESETS["deit_base_paper"]
    assert (pruning.schedule, pruning.accumulation_steps, pruning.pruning_interval, pruning.num_pruning_steps) == (
        "iterative",
        200,
        200,
        50,
    )
    assert training.learning_rate == 2e-4 and training.num_train_epochs == 100 and training.weight_decay == 0.05
    # what the user gives wins over the preset
    script, pruning, training = parse_args(
        prune_deit.DEFAULTS, "deit_paper", real + ["--num_pruning_steps", "10", "--learning_rate", "1e-4"]
    )
    assert pruning.num_pruning_steps == 10 and training.learning_rate == 1e-4
    # ResNet-50: the official one-shot after 1200 iterations, group sizes, SGD and label smoothing
    real = ["--model_name_or_path", "microsoft/resnet-50", "--budget_fraction", "0.5"]
    script, pruning, training = parse_args(prune_resnet.DEFAULTS, "resnet50_paper", real)
    assert (pruning.schedule, pruning.accumulation_steps, pruning.prune_stem) == ("one_shot", 1200, False)
    assert pruning.group_sizes == GROUP_SIZE_PRESETS["resnet50_official"] and script.dense_epochs == 0
    assert (
        training.optim == "sgd" and training.optim_args == "momentum=0.875" and training.label_smoothing_factor == 0.1
    )
    assert training.learning_rate == 1.024 and training.num_train_epochs == 90
    # a preset named for the embedded model: the preset, not the demo
    script, pruning, _ = parse_args(
        prune_deit.DEFAULTS, "deit_paper", ["--preset", "deit_paper", "--budget_fraction", "0.5"]
    )
    assert pruning.accumulation_steps == 200 and script.dense_epochs == 0
    with pytest.raises(SystemExit):  # the parser's own choices
        parse_args(prune_deit.DEFAULTS, "deit_paper", ["--preset", "deit_huge", "--budget_fraction", "0.5"])
    assert "invalid choice: 'deit_huge' (choose from 'deit_paper', 'resnet50_paper')" in capsys.readouterr().err


def test_paper_preset_runs_end_to_end_with_augmentation_mixup_and_distillation(tmp_path):
    """--preset deit_paper on a tiny config: timm RandAugment + random erasing, mixup/cutmix soft targets,
    KL to the dense model and the monotone iterative schedule, shortened by command-line overrides."""
    config = DeiTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        architectures=["DeiTForImageClassification"],
    )
    out = tmp_path / "out"
    result = run_recipe(
        "prune_deit.py",
        "--preset",
        "deit_paper",
        "--model_config",
        tiny_config(tmp_path, config, "cfg"),
        "--output_dir",
        str(out),
        *QUICK,
        "--num_pruning_steps",
        "3",
        "--num_train_epochs",
        "1",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["distillation"]["teacher"] == "dense" and report["distillation"]["kl_weight"] == 1e5
    assert len(report["pruning_steps"]) == 3 and report["pruned_accuracy"] is not None
    saved = json.loads((out / "pruning_config.json").read_text())
    assert saved["schedule"] == "iterative" and saved["monotone"] and saved["group_sizes"]["qk"] == 2


def test_dataset_without_the_label_column_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"no column\(s\) \['target'\].*columns are \['image', 'label'\].*--label_column"
    ):
        load_image_classification("digits", label_column="target")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["prune_resnet.py"])  # the DeiT default runs in the default suite: test_main_job
def test_embedded_default_runs_offline(tmp_path, recipe):
    result = run_recipe(recipe, "--output_dir", str(tmp_path / "out"), timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert report["pruned_latency_ms"] < report["dense_latency_ms"]
    assert report["pruned_accuracy"] > 0.5  # digits: far above chance (0.1) after the short training


def test_recipe_command_line_is_hfargumentparser_throughout():
    """--budget-ms as --help spells it, optional values set back to None with "none", help text on every pruning
    flag and the fixed choices enforced by the parser."""
    from mdp_hf.config import PrunableConfig
    from mdp_hf.recipes import parse_args

    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import prune_deit

    _, pruning, _ = parse_args(prune_deit.DEFAULTS, "deit_paper", ["--budget-ms", "5"])
    assert pruning.budget_ms == 5.0 and pruning.budget_fraction is None  # the demo's fraction is dropped
    script, pruning, training = parse_args(
        prune_deit.DEFAULTS,
        "deit_paper",
        ["--budget_ms=4", "--latency_num_threads", "none", "--solver-time-limit-s", "None", "--latency_table",
         "none", "--teacher", "none", "--report_to", "none", "--no_monotone"],
    )  # fmt: skip
    assert (pruning.latency_num_threads, pruning.solver_time_limit_s, pruning.latency_table) == (None, None, None)
    assert script.teacher is None and training.report_to in ("none", []) and pruning.monotone is False
    assert prune_deit.DEFAULTS["latency_batch_size"] == 16 and pruning.latency_batch_size == 16  # demo defaults stay

    from mdp_hf.recipes import RECIPE_ARGUMENTS, MDPArgumentParser

    parser = MDPArgumentParser(RECIPE_ARGUMENTS)
    actions = {a.dest: a for a in parser._actions if a.option_strings and not a.option_strings[0].startswith("--no_")}
    fields = [f.name for f in dataclasses.fields(PrunableConfig)]
    assert [name for name in fields if not actions[name].help] == []
    choices = {name: actions[name].choices for name in fields if actions[name].choices}
    assert set(choices) == {"importance", "block_granularity", "schedule", "latency_model", "latency_dtype",
                            "solver_backend"}  # fmt: skip
    result = run_recipe("prune_deit.py", "--schedule", "cosine")
    assert result.returncode == 2 and "invalid choice: 'cosine'" in result.stderr
    assert "--budget-ms" in run_recipe("prune_deit.py", "--help").stdout


def test_the_saved_image_processor_does_what_the_recipe_evaluates_with(tmp_path):
    """eval_image_processor reproduces the recipe's evaluation transform: the demos' square resize, a model
    processor's resize + centre crop, a preset's eval_resize / eval_crop."""
    from transformers import DeiTImageProcessor

    from mdp_hf.recipes import ScriptArguments, attach_transforms, build_model, eval_image_processor, prepare_data

    tiny = DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, architectures=["DeiTForImageClassification"])  # fmt: skip
    folder = tmp_path / "deit"
    tiny.save_pretrained(folder)
    DeiTImageProcessor(size={"height": 40, "width": 48}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    cases = [
        (ScriptArguments(), None, "ViT"),  # the embedded demo
        (ScriptArguments(model_name_or_path=str(folder), pretrained=False), None, "DeiT"),
        (ScriptArguments(), {"eval_resize": 256, "eval_crop": 224}, "CLIP"),
    ]
    for args, augment, kind in cases:
        data = prepare_data(ScriptArguments(max_train_samples=4, max_eval_samples=4), seed=0)
        model, _ = build_model(args, tiny, [str(d) for d in range(10)])
        processor = eval_image_processor(model, args, augment)
        assert type(processor).__name__ == f"{kind}ImageProcessor", type(processor)
        image = data["validation"][0]["image"]
        expected = attach_transforms(data, model, args, augment)["validation"][0]["pixel_values"]
        got = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert got.shape == expected.shape and (got - expected).abs().max() < 0.02, kind
