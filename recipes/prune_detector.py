"""Prune an object detector (YOLOS) to a latency budget with MDP, inside ordinary Hugging Face training.

With no arguments it runs the embedded default, offline on a CPU in minutes: a generated detection data set
(rendered circles, squares and triangles with their boxes, COCO layout), a tiny YOLOS trained from scratch on it,
a CPU latency table of the whole detector, MDP pruning to 70 % of the dense detector's latency with the
detector's own loss (Hungarian-matched classification + box losses), fine-tuning, COCO mAP (torchmetrics), and
the pruned detector with its image processor, card, report and plot:

    python recipes/prune_detector.py

A Hub detection data set in the COCO / cppe-5 layout (columns image, objects {bbox [x, y, w, h] in pixels,
category}, image_id, width, height) and a pretrained detector:

    python recipes/prune_detector.py --model_name_or_path hustvl/yolos-tiny --dataset_name cppe-5 \\
        --image_size 512 --output_dir yolos-tiny-cppe5-mdp70 --dense_epochs 0 --num_train_epochs 30

All arguments can also come from one YAML file: python recipes/prune_detector.py my_run.yaml
"""

import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForObjectDetection, TrainingArguments, YolosConfig, set_seed

from mdp_hf.adapters import get_adapter
from mdp_hf.config import PrunableConfig
from mdp_hf.data import detection_collate
from mdp_hf.detection_data import (
    DetectionMAP,
    category_names,
    check_detection_dataset,
    detection_transform,
    load_detection,
)
from mdp_hf.distributed import use_cpu_ranks_without_gpu
from mdp_hf.pruning import check_budget, latency_model_for
from mdp_hf.recipes import (
    EMBEDDED_DEFAULTS,
    MDPArgumentParser,
    ScriptArguments,
    _finish_overwrite,
    _with_defaults,
    _work_dir,
    check_output_dir,
    given_arguments,
    is_timm_name,
    print_summary,
    train_dense,
)
from mdp_hf.trainer import LATENCY_TABLE_NAME, MDPTrainer, check_schedule_fits, planned_optimizer_steps

logger = logging.getLogger("mdp_hf.recipes")

# The embedded default: a YOLOS small enough to learn the generated shapes on 2 CPU cores in minutes
# (64x64 images in 8x8 patches, 10 detection tokens for at most 4 objects an image).
TINY_YOLOS = YolosConfig(
    image_size=[64, 64],
    patch_size=8,
    num_channels=3,
    hidden_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=192,
    num_detection_tokens=10,
    eos_coefficient=0.5,  # unmatched tokens learn to say "no object" sooner than at DETR's 0.1 (docs/detection.md)
    use_mid_position_embeddings=False,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    architectures=["YolosForObjectDetection"],
)

DEFAULTS = {
    **EMBEDDED_DEFAULTS,
    "output_dir": "outputs/prune_detector",
    "dataset_name": "shapes",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "dense_epochs": 60,  # measured: 30 epochs reach COCO mAP 0.027, 60 reach 0.39 (docs/detection.md)
    "dense_learning_rate": 1e-3,
    "num_train_epochs": 6,
    "learning_rate": 5e-4,
    "weight_decay": 1e-4,
    "warmup_steps": 10,
    "max_grad_norm": 0.1,  # DETR's clipping: the matched box losses spike early in training
    "budget_fraction": 0.7,
    "group_sizes": {"embed": 16, "heads": 1, "qk": 8, "v": 8, "mlp": 32},
    "schedule": "iterative",
    "num_pruning_steps": 3,
    "accumulation_steps": 20,
    "pruning_interval": 20,
}


@dataclass
class DetectionArguments:
    """What only the detector recipe takes (the rest is the classification recipes' ScriptArguments)."""

    objects_column: str = field(
        default="objects",
        metadata={"help": "Column of the COCO objects: {'bbox': [[x, y, w, h], ...] in pixels, 'category': [...]}."},
    )
    num_train_images: int = field(default=3000, metadata={"help": "Images the built-in 'shapes' set generates."})
    num_eval_images: int = field(default=300, metadata={"help": "Validation images of the built-in 'shapes' set."})


ARGUMENT_TYPES = (ScriptArguments, DetectionArguments, PrunableConfig, TrainingArguments)


def parse_detector_args(argv: list[str] | None = None):
    """Command line (or one YAML/JSON file) -> the four argument dataclasses, over the embedded defaults."""
    use_cpu_ranks_without_gpu()
    argv = sys.argv[1:] if argv is None else argv
    parser = MDPArgumentParser(ARGUMENT_TYPES)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        import yaml

        with open(argv[0], encoding="utf-8") as handle:
            given = yaml.safe_load(handle) or {}
        parsed = parser.parse_dict(_with_defaults(DEFAULTS, given))
    else:
        given = given_arguments(argv, ARGUMENT_TYPES)
        parser.set_defaults(**_with_defaults(DEFAULTS, given, only_defaults=True))
        parsed = parser.parse_args_into_dataclasses(args=argv)
    args = parsed[0]
    if args.preset:
        raise SystemExit(f"error: --preset {args.preset} is a classification schedule; the detector recipe has none")
    if args.teacher not in (None, "none") or args.kl_weight is not None:
        raise SystemExit(
            "error: --teacher / --kl_weight distil classification logits; a detector trains on its own matched loss"
        )
    if is_timm_name(args.model_name_or_path) or args.model_kwargs:
        raise SystemExit("error: timm models are classifiers; give a transformers detector (e.g. hustvl/yolos-tiny)")
    return parsed


def build_detector(args: ScriptArguments, labels: list[str]):
    """(model, from_scratch): a Hub id / folder loaded with a ``len(labels)``-class head, else a config built."""
    id2label = dict(enumerate(labels))
    label2id = {name: index for index, name in id2label.items()}
    if args.model_name_or_path and args.pretrained:
        model = AutoModelForObjectDetection.from_pretrained(
            args.model_name_or_path,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
        )
        return model, False
    if args.model_name_or_path:
        config = AutoConfig.from_pretrained(args.model_name_or_path)
    elif args.model_config:
        config = AutoConfig.from_pretrained(args.model_config)
    else:
        config = copy.deepcopy(TINY_YOLOS)
    config.num_labels, config.id2label, config.label2id = len(labels), id2label, label2id
    return initialise_from_scratch(AutoModelForObjectDetection.from_config(config)), True


def initialise_from_scratch(model):
    """Give a YOLOS built from a config the start its authors' code gives it (hustvl/YOLOS: ``trunc_normal_``,
    std 0.02, on the detection tokens and position embeddings). transformers leaves both at zero -- it expects
    pretrained weights -- and from zeros every detection token starts identical and no patch knows where it is,
    so the tokens predict one input-independent box each and never leave that plateau (docs/detection.md)."""
    embeddings = getattr(getattr(model, "vit", None), "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "detection_tokens"):
        return model  # not a YOLOS: transformers' own initialisation is the reference one
    std = model.config.initializer_range
    with torch.no_grad():
        for parameter in (embeddings.cls_token, embeddings.detection_tokens, embeddings.position_embeddings):
            torch.nn.init.trunc_normal_(parameter, std=std)
        mid = getattr(model.vit.encoder, "interpolation", None)  # use_mid_position_embeddings=True
        if mid is not None:
            torch.nn.init.trunc_normal_(mid.mid_position_embeddings, std=std)
    return model


def square_image_size(args: ScriptArguments, config) -> int:
    """The square resolution the detector is trained, evaluated and timed at."""
    if args.image_size:
        return args.image_size
    configured = getattr(config, "image_size", None) if config is not None else TINY_YOLOS.image_size
    if isinstance(configured, int):
        return configured
    if isinstance(configured, (list, tuple)) and len(set(configured)) == 1:
        return int(configured[0])
    raise SystemExit(
        f"error: the model's config.image_size is {configured}, not square: give --image_size (the square "
        "resolution to train, evaluate and time the detector at)"
    )


def detection_image_processor(model, args: ScriptArguments, size: int):
    """The model's own image processor (pretrained) or its family's default one, resizing to ``size`` x ``size``;
    saved with the pruned model so that ``pipeline("object-detection", ...)`` preprocesses as training did."""
    import transformers
    from transformers import AutoImageProcessor
    from transformers.models.auto.auto_mappings import IMAGE_PROCESSOR_MAPPING_NAMES

    square = {"height": size, "width": size}
    if args.model_name_or_path:
        try:
            processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
            processor.size, processor.do_pad = square, False
            return processor
        except (OSError, ValueError):
            logger.warning("no image processor for %s: using its family's default", args.model_name_or_path)
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model.config.model_type)
    name = names.get("torchvision") or names.get("pil") if isinstance(names, dict) else names
    if not name:
        raise SystemExit(f"error: transformers has no image processor for model type {model.config.model_type!r}")
    # one fixed square size: no padding (the detector's forward takes no pixel_mask), boxes stay in [0, 1]
    return getattr(transformers, name)(size=square, do_pad=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def run() -> dict:
    args, detection, prunable_config, training_args = parse_detector_args()
    logging.basicConfig(
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    start = time.time()
    training_args.remove_unused_columns = False  # images and objects become pixel_values / labels on the fly
    training_args.eval_do_concat_batches = False  # per-image label dicts: mAP reads the batches as they are
    previous_checkpoints = check_output_dir(args, training_args)
    if training_args.max_steps > 0:
        check_schedule_fits(prunable_config, training_args.max_steps, f"--max_steps {training_args.max_steps}")
    config = None
    if args.model_name_or_path or args.model_config:
        config = AutoConfig.from_pretrained(args.model_name_or_path or args.model_config)
    size = square_image_size(args, config)
    data = load_detection(
        args.dataset_name, training_args.seed, detection.num_train_images, detection.num_eval_images, size
    )
    for split in ("train", "validation"):
        if args.max_train_samples and split == "train":
            data[split] = (
                data[split]
                .shuffle(seed=training_args.seed)
                .select(range(min(args.max_train_samples, len(data[split]))))
            )
        if args.max_eval_samples and split == "validation":
            data[split] = data[split].select(range(min(args.max_eval_samples, len(data[split]))))
    labels = category_names(data["train"], detection.objects_column)
    for split in ("train", "validation"):  # every box checked against its image, before any work is spent
        check_detection_dataset(
            data[split], f"the {split} split of {args.dataset_name}", args.image_column, detection.objects_column,
            num_labels=len(labels),
        )  # fmt: skip
    if training_args.max_steps <= 0:
        steps = planned_optimizer_steps(training_args, len(data["train"]), training_args.world_size)
        source = (
            f"--num_train_epochs {training_args.num_train_epochs} on {len(data['train'])} images, "
            f"batch {training_args.per_device_train_batch_size}"
        )
        check_schedule_fits(prunable_config, steps, source)
    set_seed(training_args.seed)
    model, _ = build_detector(args, labels)
    get_adapter(model)  # a detector family mdp_hf does not know fails here, before any training
    processor = detection_image_processor(model, args, size)
    for split in ("train", "validation"):
        data[split].set_transform(detection_transform(processor, args.image_column, detection.objects_column))
    if prunable_config.latency_image_size is None:
        prunable_config.latency_image_size = size
    work = _work_dir(training_args)
    latency_model = latency_model_for(model, prunable_config, os.path.join(work, LATENCY_TABLE_NAME))
    check_budget(model, prunable_config, latency_model)
    compute_metrics = DetectionMAP(processor)

    if args.dense_epochs > 0:  # the embedded demo (random init) or when asked
        train_dense(model, args, training_args, work, data["train"], detection_collate)

    trainer = MDPTrainer(
        model=model,
        args=training_args,
        prunable_config=prunable_config,
        latency_model=latency_model,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=detection_collate,
        compute_metrics=compute_metrics,
        processing_class=processor,  # saved with the pruned detector: pipeline("object-detection") works
    )
    trainer.train()
    report = trainer.save_model()
    _finish_overwrite(training_args, previous_checkpoints, work)
    if training_args.process_index != 0:
        return {}
    print_summary(report, training_args.output_dir, time.time() - start, task="object-detection")
    print(json.dumps({"dense_map": report["dense_map"], "pruned_map": report["pruned_map"]}))
    return report


def main():
    return run()


if __name__ == "__main__":
    main()
