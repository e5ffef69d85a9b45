"""Shared test helpers: the registry's tiny model variants, their inputs and outputs.

Every family registers tiny variants (``ModelFamily.test_models``; 32x32 RGB input, 5 labels) next to its
adapter, timm style; the contract tests parametrise over :data:`VARIANTS`, so a new family is tested by
registering it, without editing tests.
"""

import os
import sys
from pathlib import Path

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one thread each
    torch.set_num_threads(1)
    # and so do the processes a test starts: a fresh-process reload compares bit for bit with what this
    # process computed, and a different thread count sums in another order
    os.environ["OMP_NUM_THREADS"] = "1"

sys.path.insert(0, str(Path(__file__).parent))  # subprocess scripts import this module as `conftest`

from mdp_hf.adapters import registered_families  # noqa: E402

REPO = str(Path(__file__).resolve().parents[1])
# two CPU processes through Accelerate's config file (`accelerate launch --cpu --num_processes 2` starts one)
TWO_PROCESS_LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(Path(REPO) / "recipes" / "accelerate_configs" / "cpu_multiprocess.yaml"),
]

IMAGE_SIZE = 32
NUM_LABELS = 5
VIT_KW = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=IMAGE_SIZE,
    patch_size=8,
    num_labels=NUM_LABELS,
)
# small groups so random choices cover many widths in tiny models (kinds of any family; unknown ones are fine)
GROUPS = {"embed": 4, "heads": 1, "qk": 2, "v": 2, "mlp": 8, "channels": 2, "residual": 2}

# (family name, variant name) for every registered tiny variant
VARIANTS = [(family.name, variant) for family in registered_families() for variant in family.test_models]
_BUILDERS = {variant: family.test_models[variant] for family in registered_families() for variant in family.test_models}
FAMILY_OF = dict((variant, family) for family, variant in VARIANTS)
_TASKS = {variant: family.task for family in registered_families() for variant in family.test_models}
assert len(_BUILDERS) == len(VARIANTS), "test variant names must be unique across families"


def build(variant: str, seed: int = 0):
    """A registered tiny variant with random weights and non-trivial norm statistics (so slicing mistakes show)."""
    torch.manual_seed(seed)
    model = _BUILDERS[variant]()
    with torch.no_grad():
        for module in model.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            is_norm = isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm))
            if is_norm and weight is not None and bias is not None:
                weight.uniform_(0.5, 1.5)
                bias.uniform_(-0.5, 0.5)
            if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.running_mean is not None:
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
            gamma = getattr(module, "gamma", None)  # timm LayerScale
            if isinstance(gamma, torch.nn.Parameter):
                gamma.uniform_(0.5, 1.5)
    return model.eval()


def logits_of(model, x):
    """The model's main output: logits (HF heads, timm models return a tensor; a detector's class logits and its
    boxes, concatenated per detection token) or a headless model's pooler output."""
    out = model(x)
    if torch.is_tensor(out):
        return out
    logits = getattr(out, "logits", None)
    boxes = getattr(out, "pred_boxes", None)
    if logits is not None and boxes is not None:
        return torch.cat([logits, boxes], dim=-1)
    return logits if logits is not None else out.pooler_output


def is_detector(variant: str) -> bool:
    """Whether a registered variant's family is an object detector (``ModelFamily.task``)."""
    return _TASKS[variant] == "object-detection"


def detection_targets(batch: int, seed: int = 0, num_labels: int = NUM_LABELS) -> list[dict]:
    """Random detection labels (1-3 objects per image: class labels and boxes inside the image, normalised cxcywh)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 4, (1,), generator=g))
        size = 0.1 + 0.4 * torch.rand(n, 2, generator=g)
        centre = size / 2 + (1 - size) * torch.rand(n, 2, generator=g)
        targets.append(
            {"class_labels": torch.randint(0, num_labels, (n,), generator=g), "boxes": torch.cat([centre, size], 1)}
        )
    return targets


def example_images(batch: int = 3):
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
