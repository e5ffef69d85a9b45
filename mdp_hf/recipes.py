"""The shared body of the recipes in recipes/: arguments, data, dense training, MDP, summary.

recipes/prune_deit.py and recipes/prune_resnet.py only differ in their defaults (the embedded tiny
model, group sizes, training settings); everything else a user would otherwise copy lives here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import evaluate
import numpy as np
from transformers import AutoConfig, AutoModelForImageClassification, HfArgumentParser, Trainer, TrainingArguments

from .config import PrunableConfig
from .distributed import use_cpu_ranks_without_gpu
from .data import collate, image_transforms, label_names, load_image_classification, with_transforms
from .metrics import ACCURACY_PATH
from .adapters import get_adapter
from .pruning import check_budget, latency_model_for
from .trainer import LATENCY_TABLE_NAME, REPORT_NAME, MDPTrainer

logger = logging.getLogger("mdp_hf.recipes")


# Settings both recipes share for the embedded default (each recipe adds its own on top).
EMBEDDED_DEFAULTS = {
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "logging_steps": 10,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "dataloader_num_workers": 0,
    "budget_fraction": 0.5,
    "accumulation_steps": 30,
    "latency_batch_size": 16,
}


@dataclass
class ScriptArguments:
    """Model, data and dense-training arguments of a recipe (pruning ones are PrunableConfig's)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of the model to prune (e.g. facebook/deit-base-distilled-patch16-224). Default: the recipe's tiny model, trained from scratch."}
    )
    model_config: str | None = field(default=None, metadata={"help": "A config.json to build a model from scratch (random init)."})
    dataset_name: str | None = field(default="digits", metadata={"help": "Built-in (digits, fashion_mnist) or a Hub dataset id (e.g. cifar10, imagenet-1k)."})
    train_dir: str | None = field(default=None, metadata={"help": "imagefolder training directory (instead of --dataset_name)."})
    validation_dir: str | None = field(default=None, metadata={"help": "imagefolder validation directory."})
    image_column: str = field(default="image", metadata={"help": "Dataset column holding the image."})
    label_column: str = field(default="label", metadata={"help": "Dataset column holding the integer label."})
    image_size: int | None = field(default=None, metadata={"help": "Input resolution (default: the model config's image_size, else 224)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    dense_epochs: float = field(default=0.0, metadata={"help": "Epochs of dense training before pruning (models trained from scratch need some)."})
    dense_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the dense training."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing run in --output_dir."})


def parse_args(defaults: dict, argv: list[str] | None = None) -> tuple[ScriptArguments, PrunableConfig, TrainingArguments]:
    """Command line (or a single YAML/JSON file) -> the three argument dataclasses, over the recipe's ``defaults``."""
    use_cpu_ranks_without_gpu()
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ScriptArguments, PrunableConfig, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        import yaml

        with open(argv[0], encoding="utf-8") as handle:
            given = yaml.safe_load(handle) or {}
        return parser.parse_dict(_with_defaults(defaults, given))
    given = {arg[2:].split("=", 1)[0]: True for arg in argv if arg.startswith("--")}
    parser.set_defaults(**_with_defaults(defaults, given, only_defaults=True))
    return parser.parse_args_into_dataclasses(args=argv)


def _with_defaults(defaults: dict, given: dict, only_defaults: bool = False) -> dict:
    # An absolute budget given by the user replaces the recipe's default fraction (they are exclusive).
    merged = {k: v for k, v in defaults.items() if not (k == "budget_fraction" and "budget_ms" in given)}
    return merged if only_defaults else {**merged, **given}


def check_output_dir(args: ScriptArguments, training_args: TrainingArguments) -> None:
    """Refuse to mix two runs in one folder, before any work is spent."""
    out = training_args.output_dir
    if os.path.isdir(out) and os.listdir(out):
        previous = os.path.join(out, REPORT_NAME)
        what = "a finished pruning run" if os.path.isfile(previous) else "other files"
        if not args.overwrite_output_dir:
            raise SystemExit(
                f"error: --output_dir {out} already holds {what}. Pass --overwrite_output_dir to replace it, "
                "or choose another --output_dir."
            )
        if training_args.process_index == 0:
            shutil.rmtree(out)


def build_model(args: ScriptArguments, default_config, labels: list[str]):
    """(model, from_scratch). A Hub id / local folder is loaded; otherwise a config is instantiated."""
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if args.model_name_or_path:
        model = AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path, num_labels=len(labels), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
        )
        return model, False
    config = AutoConfig.from_pretrained(args.model_config) if args.model_config else default_config
    config.num_labels, config.id2label, config.label2id = len(labels), id2label, label2id
    return AutoModelForImageClassification.from_config(config), True


def accuracy_metric():
    metric = evaluate.load(ACCURACY_PATH)  # shipped with mdp_hf: works offline

    def compute(eval_pred):
        logits, labels = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute


def prepare_data(args: ScriptArguments, seed: int):
    data = load_image_classification(args.dataset_name, args.train_dir, args.validation_dir, args.image_column, args.label_column, seed)
    if args.max_train_samples:
        data["train"] = data["train"].shuffle(seed=seed).select(range(min(args.max_train_samples, len(data["train"]))))
    if args.max_eval_samples:
        data["validation"] = data["validation"].select(range(min(args.max_eval_samples, len(data["validation"]))))
    return data


def input_size(model, args: ScriptArguments) -> int:
    configured = getattr(model.config, "image_size", None)
    return args.image_size or (configured if isinstance(configured, int) else 224)


def attach_transforms(data, model, args: ScriptArguments):
    config = model.config
    size = input_size(model, args)
    mean, std = [0.5] * 3, [0.5] * 3
    if args.model_name_or_path:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
            mean, std = processor.image_mean, processor.image_std
            size = processor.size.get("height", size) if isinstance(processor.size, dict) else size
        except (OSError, ValueError):
            logger.warning("no image processor for %s: using mean/std 0.5", args.model_name_or_path)
    channels = getattr(config, "num_channels", 3)
    return with_transforms(
        data, image_transforms(size, channels, mean, std, True), image_transforms(size, channels, mean, std, False),
        args.image_column, args.label_column,
    )  # fmt: skip


def run(defaults: dict, default_model_config) -> dict:
    """The whole job: data -> (dense training) -> latency table -> MDP training -> pruned model + report."""
    args, prunable_config, training_args = parse_args(defaults)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")  # fmt: skip
    start = time.time()
    # the image column is turned into pixel_values on the fly (set_transform): Trainer must not drop it
    training_args.remove_unused_columns = False
    check_output_dir(args, training_args)
    data = prepare_data(args, training_args.seed)
    labels = label_names(data, args.label_column)
    model, from_scratch = build_model(args, default_model_config, labels)
    get_adapter(model)  # an unsupported family fails here, before any training
    data = attach_transforms(data, model, args)
    if prunable_config.latency_image_size is None:  # time the blocks at the resolution the model is fed
        prunable_config.latency_image_size = input_size(model, args)
    # measure (or load) the latency table and check the budget before the dense training is spent
    latency_model = latency_model_for(model, prunable_config, os.path.join(training_args.output_dir, LATENCY_TABLE_NAME))
    check_budget(model, prunable_config, latency_model)
    compute_metrics = accuracy_metric()

    if args.dense_epochs > 0:
        dense_args = TrainingArguments(
            **{**training_args.to_dict(), "output_dir": os.path.join(training_args.output_dir, "dense"),
               "num_train_epochs": args.dense_epochs, "max_steps": -1, "learning_rate": args.dense_learning_rate,
               "save_strategy": "no", "eval_strategy": "no", "push_to_hub": False}
        )  # fmt: skip
        logger.info("training the dense model for %s epochs", args.dense_epochs)
        Trainer(model=model, args=dense_args, train_dataset=data["train"], data_collator=collate).train()
        shutil.rmtree(dense_args.output_dir, ignore_errors=True)

    trainer = MDPTrainer(
        model=model,
        args=training_args,
        prunable_config=prunable_config,
        latency_model=latency_model,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collate,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    trainer.save_model()
    if training_args.push_to_hub:
        trainer.push_to_hub()
    if training_args.process_index != 0:
        return {}
    with open(os.path.join(training_args.output_dir, REPORT_NAME), encoding="utf-8") as handle:
        report = json.load(handle)
    print_summary(report, training_args.output_dir, time.time() - start)
    return report


def print_summary(report: dict, output_dir: str, seconds: float) -> None:
    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    rows = [
        ("measured latency (ms)", fmt(report["dense_latency_ms"]), fmt(report["pruned_latency_ms"])),
        ("predicted latency (ms)", fmt(report.get("dense_predicted_latency_ms")), fmt(report["predicted_latency_ms"])),
        ("accuracy", fmt(report["dense_accuracy"], ".4f"), fmt(report["pruned_accuracy"], ".4f")),
        ("parameters", f"{report['dense_params']:,}", f"{report['pruned_params']:,}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nMDP on {report['device']} (batch {report['batch_size']}, {report.get('num_threads')} thread(s)), "
          f"budget {report['budget_ms']:.3f} ms, {report['world_size']} process(es), {seconds / 60:.1f} min")  # fmt: skip
    print(f"{'':<{width}}  {'dense':>12}  {'pruned':>12}")
    for name, dense, pruned in rows:
        print(f"{name:<{width}}  {dense:>12}  {pruned:>12}")
    print(f"\npruned model, card, report and plot: {os.path.abspath(output_dir)}")
