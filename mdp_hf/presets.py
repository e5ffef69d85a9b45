"""The paper's settings as named presets (data only, no torch).

Every value comes from the official code (NVlabs/MDP; ResNet at HEAD under ``resnet50+ablation/``, DeiT only in
commit 975f7c7 under ``deit/``); docs/fidelity.md lists each with its file. A recipe that names a preset gets
these values unless the user overrides one; the embedded (tiny, offline) defaults never leak into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _resnet50_official_groups() -> dict[str, int]:
    """resnet50+ablation/group_size/resnet50_group_size.json in mdp_hf's dimension names (HF ResNet-50).

    Official ``layerS.J.convK`` (K = 1, 2) is ``stages.{S-1}.layers.{J}.conv{K}``; a residual width couples
    the stage's downsample and every conv3, and the official code gives a coupled group the largest size of
    its members (64 / 128 / 128 / 128); the stem (``conv1``, 2) is only used with ``prune_stem``.
    """
    inner = {  # (stage, layer) -> (conv1, conv2) group sizes, as in the official file
        **{(0, j): (32, 32) for j in range(3)},
        **{(1, j): (32, 32) for j in range(4)},
        (2, 0): (64, 64),
        **{(2, j): (128, 32) for j in range(1, 6)},
        (3, 0): (64, 64),
        (3, 1): (32, 32),
        (3, 2): (32, 32),
    }
    groups = {
        "stem": 2,
        "stages.0.residual": 64,
        "stages.1.residual": 128,
        "stages.2.residual": 128,
        "stages.3.residual": 128,
    }
    for (s, j), (conv1, conv2) in inner.items():
        groups[f"stages.{s}.layers.{j}.conv1"] = conv1
        groups[f"stages.{s}.layers.{j}.conv2"] = conv2
    return groups


GROUP_SIZE_PRESETS: dict[str, dict[str, int]] = {
    # the paper's DeiT-B groups (pruning_engine_general_minlp.py hard-codes them): E 16, H 1, QK 2, V 2, MLP 32
    "deit_base_paper": {"embed": 16, "heads": 1, "qk": 2, "v": 2, "mlp": 32},
    "resnet50_official": _resnet50_official_groups(),
}


@dataclass(frozen=True)
class Preset:
    """A paper configuration: PrunableConfig fields, TrainingArguments fields, data pipeline and loss settings."""

    name: str
    description: str
    prunable: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # augmentation of the recipe's data pipeline
    loss: dict = field(default_factory=dict)  # mdp_hf.losses settings (distillation, label smoothing)


PRESETS: dict[str, Preset] = {
    "deit_paper": Preset(
        name="deit_paper",
        description="MDP DeiT-B (deit/prune_ngc_ours.sh, main_full_global_latency.py, engine.py at 975f7c7)",
        prunable={
            "group_sizes": "deit_base_paper",
            "importance": "taylor",
            "ema_decay": 0.9,
            "schedule": "iterative",
            "accumulation_steps": 200,
            "pruning_interval": 200,
            "num_pruning_steps": 50,
            "monotone": True,
        },
        # pruning phase: AdamW, constant lr 1e-4 at batch 512, wd 0.05; fine-tuning: 100 epochs, lr 2e-4 per 512
        # (cosine, min 1e-5, no warmup), model kept in eval mode. One TrainingArguments covers both here.
        training={
            "learning_rate": 2e-4,
            "lr_scheduler_type": "cosine",
            "weight_decay": 0.05,
            "num_train_epochs": 100,
            "warmup_steps": 0,
            "optim": "adamw_torch",
        },
        data={
            "rand_augment": "rand-m9-mstd0.5-inc1",
            "random_erasing": 0.25,
            "color_jitter": 0.4,
            "mixup": 0.8,
            "cutmix": 1.0,
            "mixup_switch_prob": 0.5,
            "label_smoothing": 0.1,
        },
        # 1e5 x KL(T=3) to the dense model + soft-target CE + hard distillation (official teacher: RegNetY-160)
        # hard distillation whenever the model has a distillation head (DeiT's WithTeacher models)
        loss={"teacher": "dense", "kl_weight": 1e5, "temperature": 3.0},
    ),
    "resnet50_paper": Preset(
        name="resnet50_paper",
        description="MDP ResNet-50 (resnet50+ablation/training_mdp.py, main.py at HEAD)",
        prunable={
            "group_sizes": "resnet50_official",
            "importance": "taylor",
            "schedule": "one_shot",
            "accumulation_steps": 1200,
            "prune_stem": False,
        },
        # SGD momentum 0.875, lr 1.024 at batch 1024, wd 3.0517578125e-05 (none on BN), 90 epochs, linear
        # schedule with 16 warm-up epochs (warmup_steps < 1 is a ratio of all steps), label smoothing 0.1 for scores and fine-tuning
        training={
            "learning_rate": 1.024,
            "optim": "sgd",
            "optim_args": "momentum=0.875",
            "weight_decay": 3.0517578125e-05,
            "num_train_epochs": 90,
            "lr_scheduler_type": "linear",
            "warmup_steps": 16 / 90,
            "label_smoothing_factor": 0.1,
        },
        data={"random_resized_crop": True, "horizontal_flip": True, "eval_resize": 256, "eval_crop": 224},
        loss={},
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name]
