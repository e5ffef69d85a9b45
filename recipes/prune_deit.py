"""Prune a DeiT / ViT to a latency budget with MDP, inside ordinary Hugging Face training.

With no arguments it runs the embedded default, offline on a CPU in a few minutes: a small DeiT
trained from scratch on scikit-learn's digits, a CPU latency table, MDP pruning to 50 % of the dense
model's latency, fine-tuning, evaluation, and the pruned model with card, report and plot:

    python recipes/prune_deit.py
    accelerate launch recipes/prune_deit.py

A real model and dataset (GPU; latency measured on the GPU at batch 64, fp16):

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/prune_deit.py \\
        --model_name_or_path facebook/deit-base-distilled-patch16-224 --dataset_name imagenet-1k \\
        --budget_fraction 0.5 --latency_device cuda --latency_batch_size 64 --latency_dtype float16 \\
        --output_dir deit-base-mdp50 --num_train_epochs 30 --per_device_train_batch_size 128 --bf16

Image folders instead of a Hub dataset: --train_dir path/train --validation_dir path/val.
A latency table built earlier (file or Hub id): --latency_table my-org/deit-base-a100-b64-table.
All arguments can also come from one YAML file: python recipes/prune_deit.py my_run.yaml
"""

from transformers import DeiTConfig

from mdp_hf.recipes import EMBEDDED_DEFAULTS, run

# The embedded default: a DeiT-style model small enough to train on 2 CPU cores in minutes.
TINY_DEIT = DeiTConfig(
    image_size=32,
    patch_size=4,
    num_channels=3,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=256,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    architectures=["DeiTForImageClassification"],
)

# The paper's DeiT run (preset "deit_paper": 50 steps x 200 iterations, exponential targets, distillation
# from the dense model) scaled down for the embedded demo: 4 steps x 20 iterations after 30, the KL weight
# the official 1e5 corresponds to at 10 classes (its KL is averaged over 1000 classes: 1e5 / 1000 * 10 = 1e3),
# QK/V groups of 8 instead of 2 (a 4x smaller latency table to time on a CPU). A pretrained
# --model_name_or_path gets "deit_paper" itself, never these.
DEFAULTS = {
    **EMBEDDED_DEFAULTS,
    "output_dir": "outputs/prune_deit",
    "dense_epochs": 15,
    "num_train_epochs": 10,
    "learning_rate": 5e-4,
    "weight_decay": 0.05,
    "warmup_steps": 10,
    "group_sizes": {"embed": 16, "heads": 1, "qk": 8, "v": 8, "mlp": 32},
    "schedule": "iterative",
    "num_pruning_steps": 4,
    "pruning_interval": 20,
    "teacher": "dense",
    "kl_weight": 1e3,
}


def main():
    return run(DEFAULTS, TINY_DEIT, default_preset="deit_paper")


if __name__ == "__main__":
    main()
