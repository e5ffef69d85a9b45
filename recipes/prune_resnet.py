"""Prune a ResNet to a latency budget with MDP, inside ordinary Hugging Face training.

With no arguments it runs the embedded default, offline on a CPU in a few minutes: a small
bottleneck ResNet trained from scratch on scikit-learn's digits, a CPU latency table, MDP pruning to
50 % of the dense model's latency (channels, residual widths, whole residual blocks), fine-tuning,
evaluation, and the pruned model with card, report and plot:

    python recipes/prune_resnet.py
    accelerate launch recipes/prune_resnet.py

A real model and dataset (GPU; the paper's ResNet-50 recipe prunes once after accumulating scores):

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/prune_resnet.py \\
        --model_name_or_path microsoft/resnet-50 --dataset_name imagenet-1k --budget_fraction 0.5 \\
        --accumulation_steps 1200 --latency_device cuda --latency_batch_size 256 --latency_dtype float16 \\
        --output_dir resnet50-mdp50 --num_train_epochs 90 --per_device_train_batch_size 128 --bf16

All arguments can also come from one YAML file: python recipes/prune_resnet.py my_run.yaml
"""

from transformers import ResNetConfig

from mdp_hf.recipes import EMBEDDED_DEFAULTS, run

# The embedded default: a small bottleneck ResNet for 32x32 inputs (digits upsampled).
TINY_RESNET = ResNetConfig(
    num_channels=3,
    embedding_size=32,
    hidden_sizes=[64, 128, 256],
    depths=[2, 2, 2],
    layer_type="bottleneck",
    downsample_in_first_stage=False,
)

DEFAULTS = {
    **EMBEDDED_DEFAULTS,
    "output_dir": "outputs/prune_resnet",
    "image_size": 32,
    "dense_epochs": 6,
    "num_train_epochs": 6,
    "learning_rate": 2e-3,
    "weight_decay": 1e-4,
    "group_sizes": {"channels": 8, "residual": 16},
    "label_smoothing_factor": 0.1,  # official: scores and fine-tuning on label-smoothed CE
}
# one-shot after accumulation_steps (30 here; the paper's preset "resnet50_paper": 1200), the official
# ResNet-50 group sizes and SGD recipe for a pretrained --model_name_or_path.


def main():
    return run(DEFAULTS, TINY_RESNET, default_preset="resnet50_paper")


if __name__ == "__main__":
    main()
