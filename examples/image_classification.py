#!/usr/bin/env python
"""Fine-tune an image classifier and prune it to a latency budget: the usual transformers image-classification
script, with ``MDPTrainer`` in place of ``Trainer`` and a ``PrunableConfig`` among its arguments.

A Hub model and dataset (the pruned model, its card, report, plot and latency table pushed at the end):

    python examples/image_classification.py \\
        --model_name_or_path google/vit-base-patch16-224-in21k --dataset_name beans \\
        --output_dir vit-beans-mdp50 --do_train --do_eval --num_train_epochs 5 \\
        --eval_strategy epoch --save_strategy epoch --load_best_model_at_end --metric_for_best_model accuracy \\
        --budget_fraction 0.5 --accumulation_steps 100 --latency_device cuda --latency_batch_size 64 \\
        --push_to_hub --hub_model_id my-org/vit-beans-mdp50

Image folders (``train_dir/<label>/<image>``) and a model trained from scratch from a config folder (holding
``config.json`` and ``preprocessor_config.json``): ``--config_name my_vit --train_dir data/train
--validation_dir data/val``. Several processes: ``accelerate launch --config_file
recipes/accelerate_configs/cpu_multiprocess.yaml examples/image_classification.py ...`` (or multi_gpu.yaml).
All arguments can come from one JSON or YAML file. Optional values take ``none``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import evaluate
import numpy as np
import torch
import transformers
from datasets import load_dataset
from torchvision.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
)
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, TrainingArguments

from mdp_hf import PrunableConfig
from mdp_hf.metrics import ACCURACY_PATH
from mdp_hf.recipes import MDPArgumentParser
from mdp_hf.trainer import MDPTrainer  # imported before TrainingArguments are created: CPU ranks work

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to fine-tune and prune, and its image processor."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A pretrained image classifier: a Hub id or a local folder. Without it: --config_name."},
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "A config (Hub id or folder) instead of the model's; without --model_name_or_path the model is "
            "built from it with random weights (trained from scratch)."
        },
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={"help": "The image processor (Hub id or folder). Default: the model's, else the config's folder."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are cached."})
    model_revision: str = field(default="main", metadata={"help": "The model's revision (branch, tag or commit)."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a pretrained head whose number of labels differs from the data's."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own modeling code."})


@dataclass
class DataTrainingArguments:
    """Which images to train and evaluate on."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub (e.g. beans, cifar10)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "An image folder for training: <dir>/<label>/..."})
    validation_dir: str | None = field(default=None, metadata={"help": "An image folder for evaluation."})
    train_val_split: float | None = field(
        default=0.15, metadata={"help": "Fraction of the training set held out when there is no validation split."}
    )
    image_column_name: str = field(default="image", metadata={"help": "The column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The column holding the labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None and self.validation_dir is None:
            raise ValueError("give --dataset_name (a Hub dataset) or --train_dir / --validation_dir (image folders)")


def collate_fn(examples):
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def parse_arguments(args: list[str] | None = None):
    parser = MDPArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, PrunableConfig))
    args = sys.argv[1:] if args is None else args
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(args[0]))
    if len(args) == 1 and args[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(args[0]))
    return parser.parse_args_into_dataclasses(args=args)


def main(args: list[str] | None = None, callbacks: list | None = None):
    model_args, data_args, training_args, prunable_config = parse_arguments(args)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("process %d of %d, device %s", training_args.process_index, training_args.world_size,
                training_args.device)  # fmt: skip

    # data: a Hub dataset or image folders, with a validation split
    if data_args.dataset_name is not None:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir)
    else:
        data_files = {}
        if data_args.train_dir is not None:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    if "validation" not in dataset and data_args.train_val_split:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    image_column, label_column = data_args.image_column_name, data_args.label_column_name
    labels = dataset["train"].features[label_column].names
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = {i: label for i, label in enumerate(labels)}

    # model and its image processor
    if model_args.model_name_or_path is None and model_args.config_name is None:
        raise ValueError("give --model_name_or_path (a pretrained model) or --config_name (a model from scratch)")
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision,
                  "trust_remote_code": model_args.trust_remote_code}  # fmt: skip
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        num_labels=len(labels),
        label2id=label2id,
        id2label=id2label,
        finetuning_task="image-classification",
        **hub_kwargs,
    )
    if model_args.model_name_or_path:
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **hub_kwargs,
        )
    else:
        model = AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path or model_args.config_name, **hub_kwargs
    )

    # transforms from the image processor: its size, mean and std
    if "shortest_edge" in image_processor.size:
        size = image_processor.size["shortest_edge"]
    else:
        size = (image_processor.size["height"], image_processor.size["width"])
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    train_tf = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
    eval_tf = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])

    def transform(tf):
        def apply(batch):
            return {
                "pixel_values": [tf(image.convert("RGB")) for image in batch[image_column]],
                "labels": batch[label_column],
            }

        return apply

    if data_args.max_train_samples is not None:
        count = min(data_args.max_train_samples, len(dataset["train"]))
        dataset["train"] = dataset["train"].shuffle(seed=training_args.seed).select(range(count))
    if data_args.max_eval_samples is not None:
        count = min(data_args.max_eval_samples, len(dataset["validation"]))
        dataset["validation"] = dataset["validation"].select(range(count))
    dataset["train"].set_transform(transform(train_tf))
    dataset["validation"].set_transform(transform(eval_tf))
    training_args.remove_unused_columns = False  # the image column is turned into pixel_values on the fly

    accuracy = evaluate.load(ACCURACY_PATH)  # shipped with mdp_hf: loads offline

    def compute_metrics(prediction):
        return accuracy.compute(predictions=np.argmax(prediction.predictions, axis=1), references=prediction.label_ids)

    trainer = MDPTrainer(
        model=model,
        args=training_args,
        prunable_config=prunable_config,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,  # saved with the pruned model: pipeline() works on it
        data_collator=collate_fn,
        callbacks=callbacks,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # the pruned model, card, report, plot (pushed too with --push_to_hub)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    card = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data_args.dataset_name,
        "dataset_tags": data_args.dataset_name,
        "dataset_args": data_args.dataset_config_name,
        "tags": ["image-classification", "vision"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)  # uploads the folder save_model exported, its card merged with these
    else:
        trainer.create_model_card(**card)
    return trainer


if __name__ == "__main__":
    main()
