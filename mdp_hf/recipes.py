"""The shared body of the recipes in recipes/: arguments, data, dense training, MDP, summary.

recipes/prune_deit.py and recipes/prune_resnet.py only differ in their defaults (the embedded tiny
model, group sizes, training settings); everything else a user would otherwise copy lives here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field

import evaluate
import numpy as np
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .adapters import get_adapter
from .config import PrunableConfig
from .data import (
    build_transforms,
    check_data_config,
    check_dataset,
    collate,
    eval_sizes_from_processor,
    label_names,
    load_image_classification,
    num_labels_of,
    scaled_eval_sizes,
    train_collator,
    with_transforms,
)
from .distributed import run_on_main_and_broadcast, use_cpu_ranks_without_gpu
from .hub import quality_metrics
from .losses import DistillationSettings, MDPLoss
from .metrics import ACCURACY_PATH
from .paths import check_local_path
from .presets import get_preset
from .pruning import _returns_own_loss, check_budget, latency_model_for
from .trainer import LATENCY_TABLE_NAME, REPORT_NAME, MDPTrainer, check_schedule_fits, planned_optimizer_steps

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
        default=None,
        metadata={
            "help": "The model to prune: a transformers Hub id or local folder (facebook/deit-base-distilled-patch16-224), or a timm model: timm/<name> or hf-hub:timm/<name> on the Hub (timm/deit_small_patch16_224.fb_in1k), timm:<architecture> by name (timm:resnet50). Default: the recipe's tiny model, trained from scratch."
        },
    )
    pretrained: bool = field(
        default=True,
        metadata={
            "help": "Load --model_name_or_path's weights. false builds its architecture with random weights (offline tests, or training from scratch)."
        },
    )
    model_kwargs: str | None = field(
        default=None,
        metadata={
            "help": 'JSON keyword arguments for timm.create_model (e.g. \'{"img_size": 384, "drop_path_rate": 0.1}\').'
        },
    )
    model_config: str | None = field(
        default=None, metadata={"help": "A config.json to build a model from scratch (random init)."}
    )
    dataset_name: str | None = field(
        default="digits",
        metadata={"help": "Built-in (digits, fashion_mnist) or a Hub dataset id (e.g. cifar10, imagenet-1k)."},
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "imagefolder training directory (instead of --dataset_name)."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "imagefolder validation directory."})
    image_column: str = field(default="image", metadata={"help": "Dataset column holding the image."})
    label_column: str = field(default="label", metadata={"help": "Dataset column holding the integer label."})
    image_size: int | None = field(
        default=None, metadata={"help": "Input resolution (default: the model config's image_size, else 224)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    preset: str | None = field(
        default=None,
        metadata={
            "help": "The paper's settings (mdp_hf.presets): deit_paper or resnet50_paper. Default: the recipe's preset for a pretrained --model_name_or_path; the embedded demo's scaled-down values otherwise.",
            "choices": ["deit_paper", "resnet50_paper"],
        },
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Distillation teacher: 'dense' (a frozen copy of the model before pruning), a Hub id or folder, or 'none'. Default: the preset's."
        },
    )
    kl_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the KL term to the teacher (official 1e5, KL averaged over batch x classes). Default: the preset's."
        },
    )
    hard_distillation: bool | None = field(
        default=None,
        metadata={"help": "Train a DeiT distillation head on the teacher's argmax (default: when the model has one)."},
    )
    dense_epochs: float = field(
        default=0.0,
        metadata={
            "help": "Epochs of dense training before pruning. Only models without pretrained weights need some (the embedded demo sets it); 0 for a pretrained model unless you ask."
        },
    )
    dense_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the dense training."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing run in --output_dir."})


class MDPArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose optional fields (``X | None``) also take ``none`` (any case) for None, so that a
    default such as ``latency_num_threads=1`` or ``solver_time_limit_s=60`` can be set back to None from the
    command line (``--latency_num_threads none``). Fields with fixed choices keep them, and TrainingArguments'
    text fields keep their own meaning of "none" (``--report_to none``)."""

    def _add_dataclass_arguments(self, dtype):
        first = len(self._actions)  # argparse keeps every action, argument groups' too, in _actions
        super()._add_dataclass_arguments(dtype)
        hints = typing.get_type_hints(dtype)
        keep_text = issubclass(dtype, TrainingArguments)
        for action in self._actions[first:]:
            union = getattr(hints.get(action.dest), "__args__", ())
            if type(None) not in union or action.type is None or action.choices is not None:
                continue
            if keep_text and str in union:
                continue
            action.type = _none_or(action.type)


def _none_or(convert):
    def parse(text: str):
        return None if text.strip().lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in "invalid <type> value"
    return parse


RECIPE_ARGUMENTS = (ScriptArguments, PrunableConfig, TrainingArguments)


def parse_args(
    embedded: dict, default_preset: str, argv: list[str] | None = None
) -> tuple[ScriptArguments, PrunableConfig, TrainingArguments]:
    """Command line (or a single YAML/JSON file) -> the three argument dataclasses.

    Defaults, lowest first: the dataclasses' own; then either the recipe's ``embedded`` demo values (no
    pretrained model and no preset named) or the paper preset (``--preset``, else ``default_preset`` for a
    pretrained ``--model_name_or_path``); then what the user gives. The demo's tiny values never reach a
    pretrained model's run."""
    use_cpu_ranks_without_gpu()
    argv = sys.argv[1:] if argv is None else argv
    parser = MDPArgumentParser(RECIPE_ARGUMENTS)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        import yaml

        with open(argv[0], encoding="utf-8") as handle:
            given = yaml.safe_load(handle) or {}
        defaults = recipe_defaults(embedded, default_preset, given.get("preset"), given.get("model_name_or_path"))
        return parser.parse_dict(_with_defaults(defaults, given))
    given = given_arguments(argv)
    defaults = recipe_defaults(embedded, default_preset, given.get("preset"), given.get("model_name_or_path"))
    parser.set_defaults(**_with_defaults(defaults, given, only_defaults=True))
    return parser.parse_args_into_dataclasses(args=argv)


def given_arguments(argv: list[str], dataclass_types=RECIPE_ARGUMENTS) -> dict:
    """The fields the command line sets, by field name whatever the spelling (``--budget_ms``, ``--budget-ms``,
    an abbreviation, ``--no_monotone``), parsed by the same parser with every default suppressed."""
    probe = MDPArgumentParser(dataclass_types, add_help=False)  # --help is left to the real parser
    for action in probe._actions:  # a suppressed default never enters the namespace (set_defaults would add it)
        action.default = argparse.SUPPRESS
    known, _ = probe.parse_known_args(argv)
    return vars(known)


def recipe_defaults(embedded: dict, default_preset: str, preset: str | None, model_name_or_path: str | None) -> dict:
    """The defaults a run starts from: the embedded demo's, or a paper preset's (see :func:`parse_args`)."""
    if not preset and not model_name_or_path:
        return dict(embedded)
    chosen = get_preset(preset or default_preset)
    keep = {k: embedded[k] for k in ("output_dir",) if k in embedded}
    loss = {k: chosen.loss[k] for k in ("teacher", "kl_weight", "hard_distillation") if k in chosen.loss}
    return {**keep, **chosen.prunable, **chosen.training, **loss, "preset": chosen.name}


def _with_defaults(defaults: dict, given: dict, only_defaults: bool = False) -> dict:
    # An absolute budget given by the user replaces the recipe's default fraction (they are exclusive).
    merged = {k: v for k, v in defaults.items() if not (k == "budget_fraction" and "budget_ms" in given)}
    return merged if only_defaults else {**merged, **given}


RUN_WORK_DIR = "_mdp_run"  # inside --output_dir: the run's intermediates (latency table being built, dense training)


def check_output_dir(args: ScriptArguments, training_args: TrainingArguments) -> dict[str, int]:
    """Refuse to mix two runs in one folder, before any work is spent.

    With ``--overwrite_output_dir`` nothing is deleted here: the new run builds its intermediates in
    ``<output_dir>/_mdp_run`` and its final save replaces the previous model's files in one atomic swap, so a
    run that fails leaves the previous one as it was. Returns the previous run's checkpoints (folder name ->
    mtime of its trainer_state.json), which a successful run removes if it did not rewrite them.

    The main process looks at the folder and every rank gets its verdict: the main process creates ``_mdp_run``
    there soon after, and a slower rank looking for itself would find the folder no longer empty and refuse."""
    refusal, checkpoints = run_on_main_and_broadcast(lambda: _inspect_output_dir(args, training_args.output_dir))
    if refusal is not None:
        raise SystemExit(refusal)
    return checkpoints


def _inspect_output_dir(args: ScriptArguments, out: str) -> tuple[str | None, dict[str, int]]:
    """(why ``out`` may not be used, or None; the previous run's checkpoints): see :func:`check_output_dir`."""
    if not (os.path.isdir(out) and os.listdir(out)):
        return None, {}
    previous = os.path.join(out, REPORT_NAME)
    what = "a finished pruning run" if os.path.isfile(previous) else "other files"
    if not args.overwrite_output_dir:
        return (
            f"error: --output_dir {out} already holds {what}. Pass --overwrite_output_dir to replace it, "
            "or choose another --output_dir.",
            {},
        )
    logger.info("--overwrite_output_dir: %s holds %s, replaced once this run has written its own", out, what)
    checkpoints = {}
    for name in os.listdir(out):
        state = os.path.join(out, name, "trainer_state.json")
        if name.startswith("checkpoint-") and os.path.isdir(os.path.join(out, name)):
            checkpoints[name] = os.stat(state).st_mtime_ns if os.path.isfile(state) else -1
    return None, checkpoints


def _work_dir(training_args: TrainingArguments) -> str:
    """This run's intermediates; a leftover of an interrupted run is replaced (main process)."""
    work = os.path.join(training_args.output_dir, RUN_WORK_DIR)
    if training_args.process_index == 0:
        if os.path.isdir(work):
            logger.info("removing %s, left by an interrupted run", work)
            shutil.rmtree(work)
        os.makedirs(work)
    return work


def _finish_overwrite(training_args: TrainingArguments, previous_checkpoints: dict[str, int], work: str) -> None:
    """After the new run's final save: its intermediates go, and so do the previous run's checkpoints it did not
    rewrite (``resume_from_checkpoint=True`` would otherwise pick another run's state)."""
    if training_args.process_index != 0:
        return
    shutil.rmtree(work, ignore_errors=True)
    for name, mtime in previous_checkpoints.items():
        folder = os.path.join(training_args.output_dir, name)
        state = os.path.join(folder, "trainer_state.json")
        current = os.stat(state).st_mtime_ns if os.path.isfile(state) else -1
        if os.path.isdir(folder) and current == mtime:
            shutil.rmtree(folder)


TIMM_PREFIXES = ("timm/", "hf-hub:", "timm:")


def is_timm_name(name: str | None) -> bool:
    """Whether ``--model_name_or_path`` names a timm model (timm/..., hf-hub:..., timm:<architecture>)."""
    return bool(name) and name.startswith(TIMM_PREFIXES)


def create_timm_model(name: str, pretrained: bool, num_labels: int, kwargs: dict | None = None):
    """A timm model with a ``num_labels`` head: from the Hub (``timm/x``, ``hf-hub:timm/x``) or by architecture
    name (``timm:x``); ``pretrained=False`` builds the architecture (its tag stripped) with random weights."""
    import timm

    if name.startswith("timm:"):
        source = name[len("timm:") :]
    elif pretrained:
        source = name if name.startswith("hf-hub:") else f"hf-hub:{name}"
    else:
        source = name[len("hf-hub:") :] if name.startswith("hf-hub:") else name
        source = source.split("/", 1)[1] if source.startswith("timm/") else source
    if not pretrained and not timm.is_model(source.split(".", 1)[0]):
        raise ValueError(f"--model_name_or_path {name!r}: timm has no architecture {source!r} (timm.list_models())")
    model = timm.create_model(source, pretrained=pretrained, num_classes=num_labels, **(kwargs or {}))
    if not pretrained:  # random weights: the card must not name the pretrained checkpoint as the source
        model.pretrained_cfg = {**model.pretrained_cfg, "hf_hub_id": None}
    return model


def build_model(args: ScriptArguments, default_config, labels: list[str]):
    """(model, from_scratch). A Hub id / local folder is loaded; otherwise a config is instantiated."""
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    check_local_path(args.model_name_or_path, "--model_name_or_path")
    check_local_path(args.model_config, "--model_config")
    if is_timm_name(args.model_name_or_path):
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
        model = create_timm_model(args.model_name_or_path, args.pretrained, len(labels), kwargs)
        return model, not args.pretrained
    if args.model_kwargs:
        raise ValueError("--model_kwargs applies to timm models only; for a transformers model use --model_config")
    if args.model_name_or_path and not args.pretrained:
        config = AutoConfig.from_pretrained(
            args.model_name_or_path, num_labels=len(labels), id2label=id2label, label2id=label2id
        )
        return AutoModelForImageClassification.from_config(config), True
    if args.model_name_or_path:
        model = AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
        )
        return model, False
    config = AutoConfig.from_pretrained(args.model_config) if args.model_config else default_config
    config.num_labels, config.id2label, config.label2id = len(labels), id2label, label2id
    return AutoModelForImageClassification.from_config(config), True


class DenseTrainer(Trainer):
    """Plain Trainer for the optional dense training; models without a loss of their own (timm models, DeiT
    with its distillation head) get cross-entropy on the labels, as MDPTrainer gives them."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if _returns_own_loss(self.accelerator.unwrap_model(model)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not hasattr(self, "_cross_entropy"):
            self._cross_entropy = MDPLoss(DistillationSettings(label_smoothing=self.args.label_smoothing_factor))
        loss, outputs = self._cross_entropy(model, inputs)
        return (loss, outputs) if return_outputs else loss


def accuracy_metric():
    metric = evaluate.load(ACCURACY_PATH)  # shipped with mdp_hf: works offline

    def compute(eval_pred):
        logits, labels = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute


def prepare_data(args: ScriptArguments, seed: int):
    data = load_image_classification(
        args.dataset_name, args.train_dir, args.validation_dir, args.image_column, args.label_column, seed
    )
    if args.max_train_samples:
        data["train"] = data["train"].shuffle(seed=seed).select(range(min(args.max_train_samples, len(data["train"]))))
    if args.max_eval_samples:
        data["validation"] = data["validation"].select(range(min(args.max_eval_samples, len(data["validation"]))))
    return data


def input_size(model, args: ScriptArguments) -> int:
    timm_cfg = getattr(model, "pretrained_cfg", None)
    if timm_cfg and "input_size" in timm_cfg and not hasattr(model, "config"):
        configured = timm_cfg["input_size"][-1]
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # a ViT built at another size
        configured = img_size[-1] if img_size else configured
    else:
        configured = getattr(getattr(model, "config", None), "image_size", None)
    return args.image_size or (configured if isinstance(configured, int) else 224)


def _transform_settings(model, args: ScriptArguments):
    """(size, channels, mean, std, the model's HF image processor or None) the recipe's transforms are built from."""
    size = input_size(model, args)
    mean, std, processor = [0.5] * 3, [0.5] * 3, None
    channels = getattr(getattr(model, "config", None), "num_channels", 3)
    if is_timm_name(args.model_name_or_path):  # the timm model's own preprocessing
        timm_cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = list(timm_cfg.get("mean", mean)), list(timm_cfg.get("std", std))
        channels = timm_cfg.get("input_size", (channels,))[0]
    elif args.model_name_or_path:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
            mean, std = processor.image_mean, processor.image_std
            crop = getattr(processor, "crop_size", None) or processor.size
            size = args.image_size or (crop.get("height", size) if isinstance(crop, dict) else size)
        except (OSError, ValueError):
            logger.warning("no image processor for %s: using mean/std 0.5", args.model_name_or_path)
    return size, channels, mean, std, processor


def attach_transforms(data, model, args: ScriptArguments, augment: dict | None = None):
    """Train/eval transforms: the preset's augmentation (timm RandAugment, random erasing; or random-resized
    crop + flip) and the model's own image processor for mean/std and the eval resize/crop."""
    size, channels, mean, std, processor = _transform_settings(model, args)
    train_tf, eval_tf = build_transforms(size, channels, mean, std, augment, processor)
    return with_transforms(data, train_tf, eval_tf, args.image_column, args.label_column)


def eval_image_processor(model, args: ScriptArguments, augment: dict | None = None):
    """A transformers image processor doing what the recipe's evaluation transform does (the sizes
    ``build_transforms`` chooses: square resize, or resize + centre crop; the same mean/std), saved with the pruned
    model so that ``pipeline()`` and ``AutoImageProcessor`` work on it. None for a timm model (its folder gets one
    from the preprocessing its config records) and for inputs that are not RGB."""
    from transformers import CLIPImageProcessor, DeiTImageProcessor, ViTImageProcessor

    if is_timm_name(args.model_name_or_path):
        return None
    size, channels, mean, std, processor = _transform_settings(model, args)
    if channels != 3:
        logger.warning("a %d-channel model: no image processor is saved with it (pipeline() feeds RGB)", channels)
        return None
    data = check_data_config(augment)
    interpolation = "bicubic"  # build_transforms' default for the resize + crop pipelines
    if "eval_resize" in data or "eval_crop" in data:
        resize, crop = scaled_eval_sizes(size, data.get("eval_resize"), data.get("eval_crop"))
    elif processor is not None and eval_sizes_from_processor(processor, size) != (None, None):
        resize, crop = eval_sizes_from_processor(processor, size)
    else:
        resize, crop, interpolation = None, None, "bilinear"
    common = {
        "image_mean": list(mean)[:3],
        "image_std": list(std)[:3],
        "resample": {"bilinear": 2, "bicubic": 3}[interpolation],
    }
    if resize is None:
        return ViTImageProcessor(size={"height": size, "width": size}, **common)
    crop_size = {"height": crop, "width": crop}
    if isinstance(resize, tuple):
        return DeiTImageProcessor(size={"height": resize[0], "width": resize[1]}, crop_size=crop_size, **common)
    return CLIPImageProcessor(size={"shortest_edge": resize}, crop_size=crop_size, do_convert_rgb=True, **common)


def distillation_settings(args: ScriptArguments, training_args: TrainingArguments) -> DistillationSettings | None:
    """The loss MDPTrainer uses: distillation from ``--teacher`` (with the preset's weights), else the model's."""
    if not args.teacher or args.teacher == "none":
        return None
    kwargs = {
        "teacher": args.teacher,
        "hard_distillation": args.hard_distillation,
        "label_smoothing": training_args.label_smoothing_factor,
    }
    if args.kl_weight is not None:
        kwargs["kl_weight"] = args.kl_weight
    return DistillationSettings(**kwargs)


def run(defaults: dict, default_model_config, default_preset: str) -> dict:
    """The whole job: data -> (dense training) -> latency table -> MDP training -> pruned model + report.

    ``defaults``: the embedded demo's values; ``default_preset``: the paper preset a pretrained model gets."""
    args, prunable_config, training_args = parse_args(defaults, default_preset)
    augment = get_preset(args.preset).data if args.preset else {}
    logging.basicConfig(
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    start = time.time()
    # the image column is turned into pixel_values on the fly (set_transform): Trainer must not drop it
    training_args.remove_unused_columns = False
    previous_checkpoints = check_output_dir(args, training_args)
    if training_args.max_steps > 0:  # before any data is loaded
        check_schedule_fits(prunable_config, training_args.max_steps, f"--max_steps {training_args.max_steps}")
    data = prepare_data(args, training_args.seed)
    if training_args.max_steps <= 0:  # epochs: MDPTrainer checks Trainer's own count again before training
        steps = planned_optimizer_steps(training_args, len(data["train"]), training_args.world_size)
        source = (
            f"--num_train_epochs {training_args.num_train_epochs} on {len(data['train'])} samples, "
            f"batch {training_args.per_device_train_batch_size}"
        )
        check_schedule_fits(prunable_config, steps, source)
    labels = label_names(data, args.label_column)
    set_seed(training_args.seed)  # a model built from a config is initialised now: make it reproducible
    model, from_scratch = build_model(args, default_model_config, labels)
    get_adapter(model)  # an unsupported family fails here, before any training
    check_dataset(data["train"], "the train split", num_labels_of(model), args.label_column)  # before dense training
    data = attach_transforms(data, model, args, augment)
    if prunable_config.latency_image_size is None:  # time the blocks at the resolution the model is fed
        prunable_config.latency_image_size = input_size(model, args)
    # measure (or load) the latency table and check the budget before the dense training is spent
    # built inside the run's work folder: a previous run's table stays until the final save replaces it
    work = _work_dir(training_args)
    latency_model = latency_model_for(model, prunable_config, os.path.join(work, LATENCY_TABLE_NAME))
    check_budget(model, prunable_config, latency_model)
    compute_metrics = accuracy_metric()

    if args.dense_epochs > 0:  # the embedded demo (random init) or when asked; never by default for a pretrained model
        train_dense(model, args, training_args, work, data["train"], collate)

    trainer = MDPTrainer(
        model=model,
        args=training_args,
        prunable_config=prunable_config,
        latency_model=latency_model,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=train_collator(augment, len(labels)),  # mixup/cutmix soft targets when the preset asks
        eval_data_collator=collate,
        compute_metrics=compute_metrics,
        distillation=distillation_settings(args, training_args),
        processing_class=eval_image_processor(model, args, augment),  # saved with the pruned model
    )
    trainer.train()
    # one atomic export: model, card, report, latency table, plot (with --push_to_hub also uploaded, as
    # Trainer.save_model does); refused if the schedule did not finish
    report = trainer.save_model()
    _finish_overwrite(training_args, previous_checkpoints, work)
    if training_args.process_index != 0:
        return {}
    print_summary(report, training_args.output_dir, time.time() - start)
    return report


def train_dense(model, args, training_args, work: str, train_dataset, data_collator) -> None:
    """Train the dense model for ``args.dense_epochs`` at ``args.dense_learning_rate`` (the run's other training
    arguments; no saves, evaluation or push) in ``<work>/dense``, removed afterwards."""
    dense_args = TrainingArguments(
        **{
            **training_args.to_dict(),
            "output_dir": os.path.join(work, "dense"),
            "num_train_epochs": args.dense_epochs,
            "max_steps": -1,
            "learning_rate": args.dense_learning_rate,
            "save_strategy": "no",
            "eval_strategy": "no",
            "push_to_hub": False,
        }
    )
    logger.info("training the dense model for %s epochs", args.dense_epochs)
    DenseTrainer(model=model, args=dense_args, train_dataset=train_dataset, data_collator=data_collator).train()
    shutil.rmtree(dense_args.output_dir, ignore_errors=True)


def print_summary(report: dict, output_dir: str, seconds: float, task: str = "image-classification"):
    """The run's result table; its quality rows are the card's (:func:`mdp_hf.hub.quality_metrics`: accuracy for
    classifiers, COCO mAP for detectors)."""

    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    rows = [
        ("measured latency (ms)", fmt(report["dense_latency_ms"]), fmt(report["pruned_latency_ms"])),
        ("predicted latency (ms)", fmt(report.get("dense_predicted_latency_ms")), fmt(report["predicted_latency_ms"])),
        *(
            (label, fmt(report.get(f"dense_{key}"), ".4f"), fmt(report.get(f"pruned_{key}"), ".4f"))
            for label, key, _ in quality_metrics(report, task)
        ),
        ("parameters", f"{report['dense_params']:,}", f"{report['pruned_params']:,}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(
        f"\nMDP on {report['device']} (batch {report['batch_size']}, {report.get('num_threads')} thread(s)), "
        f"budget {report['budget_ms']:.3f} ms, {report['world_size']} process(es), {seconds / 60:.1f} min"
    )
    print(f"{'':<{width}}  {'dense':>12}  {'pruned':>12}")
    for name, dense, pruned in rows:
        print(f"{name:<{width}}  {dense:>12}  {pruned:>12}")
    if report.get("measured_over_budget") is not None:
        print(f"measured/budget at export: {report['measured_over_budget']:.3f}")
    check = report.get("latency_check") or {}
    if check.get("rounds"):
        from .latency_check import LatencyCheck

        print(f"latency check during pruning: {LatencyCheck.from_dict(check).summary()}")
    elif check.get("status") == "skipped":
        print(f"latency check during pruning: skipped ({check.get('reason')})")
    print(f"\npruned model, card, report and plot: {os.path.abspath(output_dir)}")
