"""Image-classification data for recipes: Hub datasets, image folders, and two offline built-ins.

Built-ins (no network): ``digits`` (scikit-learn's 8x8 digits, 1,797 images, needs only pip) and
``fashion_mnist`` (the full 70,000-image Fashion-MNIST from Debian's ``dataset-fashion-mnist``
package, /usr/share/datasets/fashion-mnist).

Pipelines: ``train_transform`` / ``eval_transform`` (or ``build_transforms``) build per-image transforms from
a preset's ``data`` dict (mdp_hf.presets); ``MixupCollator`` (or ``train_collator``) mixes whole batches.

- DeiT keys, timm ``create_transform`` as in the DeiT recipe: ``rand_augment`` (e.g. "rand-m9-mstd0.5-inc1"),
  ``random_erasing`` (probability; pixel mode, one region), ``color_jitter`` (timm turns it off while
  RandAugment is on, as DeiT did). timm's pipeline always has RandomResizedCrop(0.08-1) and a 0.5 flip.
- ResNet keys, torchvision: ``random_resized_crop`` (RandomResizedCrop(size)), ``horizontal_flip``.
- Eval keys: ``eval_resize`` / ``eval_crop`` (shorter side resize, centre crop, scaled to the model's size).
- Batch keys (``MixupCollator``): ``mixup``, ``cutmix``, ``mixup_switch_prob``, ``label_smoothing``.

Without transform keys (the embedded tiny demos) the pipeline is ``image_transforms``: grey/RGB conversion,
square resize and, for training, a light RandomAffine.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset

FASHION_MNIST_DIR = os.environ.get("MDP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
BUILTIN_DATASETS = ("digits", "fashion_mnist")


def _to_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"image": list(images), "label": labels.astype(int).tolist()}, features=features)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) for split "train" (60k) or "test" (10k)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = os.path.join(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.isfile(images_path):
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {FASHION_MNIST_DIR}: install it with `apt-get install dataset-fashion-mnist` "
            "(or set MDP_FASHION_MNIST_DIR), or use --dataset_name digits, which needs only pip"
        )
    labels = _read_idx(os.path.join(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    return _read_idx(images_path), labels


def load_builtin(name: str, seed: int = 0) -> DatasetDict:
    """A built-in dataset as a DatasetDict with "train" and "validation" splits (columns image, label)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255 grey levels
        order = np.random.default_rng(seed).permutation(len(images))
        cut = int(0.8 * len(order))
        names = [str(i) for i in range(10)]
        return DatasetDict(
            train=_to_dataset(images[order[:cut]], digits.target[order[:cut]], names),
            validation=_to_dataset(images[order[cut:]], digits.target[order[cut:]], names),
        )
    if name == "fashion_mnist":
        train_x, train_y = load_fashion_mnist_arrays("train")
        test_x, test_y = load_fashion_mnist_arrays("test")
        return DatasetDict(
            train=_to_dataset(train_x, train_y, FASHION_MNIST_LABELS),
            validation=_to_dataset(test_x, test_y, FASHION_MNIST_LABELS),
        )
    raise ValueError(f"unknown built-in dataset {name!r}; built-ins are {BUILTIN_DATASETS}")


def load_image_classification(
    dataset_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    seed: int = 0,
) -> DatasetDict:
    """Load a dataset (built-in name, Hub id, or imagefolder dirs) with "train" and "validation" splits and
    check it has the image and label columns, before any expensive work starts."""
    from .paths import check_local_path

    for flag, path in (("--train_dir", train_dir), ("--validation_dir", validation_dir)):
        if path and not os.path.isdir(path):
            raise FileNotFoundError(f"{flag} {path} does not exist (or is not a folder of images)")
    check_local_path(dataset_name, "--dataset_name")
    if dataset_name in BUILTIN_DATASETS:
        data = load_builtin(dataset_name, seed)
    elif dataset_name:
        data = load_dataset(dataset_name)
    elif train_dir:
        files = {"train": os.path.join(train_dir, "**")}
        if validation_dir:
            files["validation"] = os.path.join(validation_dir, "**")
        data = load_dataset("imagefolder", data_files=files)
    else:
        raise ValueError("give --dataset_name (a built-in: digits, fashion_mnist; or a Hub id) or --train_dir")
    if "validation" not in data:
        split = "test" if "test" in data else None
        if split:
            data["validation"] = data.pop(split)
        else:
            parts = data["train"].train_test_split(test_size=0.1, seed=seed, stratify_by_column=None)
            data = DatasetDict(train=parts["train"], validation=parts["test"])
    for split in ("train", "validation"):
        check_dataset(data[split], f"the {split} split of {dataset_name or train_dir}")
    columns = data["train"].column_names
    missing = [c for c in (image_column, label_column) if c not in columns]
    if missing:
        raise ValueError(
            f"dataset has no column(s) {missing}; its columns are {columns}. Pass --image_column / --label_column "
            "naming the image and the integer label columns"
        )
    return data


def label_names(data: DatasetDict, label_column: str = "label") -> list[str]:
    """Class names: a ClassLabel's names; for plain integer labels one name per index 0..max (labels 0, 5, 7
    need an 8-way head, not a 3-way one); otherwise the sorted distinct values."""
    feature = data["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = sorted(set(data["train"][label_column]))
    if values and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return [str(i) for i in range(values[-1] + 1)]
    return [str(v) for v in values]


def num_labels_of(model) -> int | None:
    """How many classes a classification model predicts (transformers ``config.num_labels`` of a ...For
    ImageClassification model, timm ``num_classes``); None for a model without a classification head."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is not None and "ForImageClassification" in name:
        return int(config.num_labels)
    classes = getattr(model, "num_classes", None)
    if config is None and isinstance(classes, int) and classes > 0:
        return classes
    return None


def check_dataset(
    dataset, what: str = "train_dataset", num_labels: int | None = None, label_column=None, task: str | None = None
) -> None:
    """Refuse, before any work is spent, an empty dataset and integer labels outside ``[0, num_labels)`` (which
    would fail in the middle of training, or as a device-side assert on CUDA). Labels are read from a
    ``datasets.Dataset``'s ``label_column`` (default: ``labels`` or ``label``); other datasets are only
    checked for emptiness. ``task="object-detection"``: the first examples' ``labels`` are checked as detection
    targets (:func:`check_detection_labels`: boxes present, normalised cxcywh inside the image)."""
    try:
        size = len(dataset)
    except TypeError:
        return  # an iterable dataset: nothing to check up front
    if size == 0:
        raise ValueError(
            f"{what} is empty (0 examples): check the dataset name / folders, the split and max_train_samples / "
            "max_eval_samples; importance scores and training need data"
        )
    if task == "object-detection":
        sample = [dataset[i] for i in range(min(size, DETECTION_CHECKED_EXAMPLES))]
        labels = [example.get("labels") if isinstance(example, dict) else None for example in sample]
        check_detection_labels(labels, f"{what} labels (its first {len(sample)} examples)", num_labels)
        return
    if num_labels is None or not isinstance(dataset, Dataset):
        return
    columns = dataset.column_names
    column = label_column or next((c for c in ("labels", "label") if c in columns), None)
    if column is None or column not in columns:
        return
    labels = np.asarray(dataset.with_format("numpy", columns=[column])[:][column])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        return  # soft targets or non-integer labels: the loss decides
    bad = labels[(labels < 0) | (labels >= num_labels)]
    if bad.size:
        shown = sorted({int(v) for v in bad[:1000]})[:5]
        raise ValueError(
            f"{what}: {bad.size} of {labels.size} labels in column {column!r} are outside [0, {num_labels}) "
            f"(e.g. {shown}), but the model predicts {num_labels} classes. Give the model num_labels >= "
            f"{int(labels.max()) + 1} (config.num_labels / timm num_classes), or remap the labels to 0..{num_labels - 1}"
        )


TIMM_AUGMENT_KEYS = ("rand_augment", "random_erasing", "color_jitter")
TORCHVISION_AUGMENT_KEYS = ("random_resized_crop", "horizontal_flip")
TRANSFORM_KEYS = TIMM_AUGMENT_KEYS + TORCHVISION_AUGMENT_KEYS
EVAL_KEYS = ("eval_resize", "eval_crop")
MIXUP_KEYS = ("mixup", "cutmix", "mixup_switch_prob", "label_smoothing")
DATA_KEYS = TRANSFORM_KEYS + EVAL_KEYS + MIXUP_KEYS  # every key a preset's ``data`` dict may hold


def check_data_config(data: dict | None) -> dict:
    """The ``data`` dict (a copy; {} for None), or ValueError naming an unknown key and the supported keys."""
    data = dict(data or {})
    unknown = sorted(k for k in data if k not in DATA_KEYS)
    if unknown:
        raise ValueError(f"unknown data/augmentation key(s) {unknown}; supported keys are {list(DATA_KEYS)}")
    return data


def to_8bit(image):
    """A 16-bit (or 32-bit integer) grayscale PIL image as an 8-bit "L" image scaled over the full range
    (value / 257, so 65535 -> 255). PIL's own ``convert("L")`` / ``convert("RGB")`` clip such images at 255,
    which turns almost every pixel of a 16-bit image white. Other modes are returned unchanged.

    Mode "I" (32-bit) carries no range: values up to 255 are taken as 8-bit, up to 65535 as 16-bit; larger
    values are refused rather than guessed."""
    from PIL import Image as PILImage

    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    values = np.asarray(image).astype(np.int64)
    if values.size and values.min() < 0:
        raise ValueError(f"a {image.mode} image with negative values ({values.min()}) has no 8-bit meaning")
    top = int(values.max()) if values.size else 0
    if image.mode == "I" and top > 65535:
        raise ValueError(
            f"a 32-bit integer image with values up to {top}: its range is unknown; convert it to 8 or 16 bits first"
        )
    if image.mode.startswith("I;16") or top > 255:
        values = (values * 255 + 32767) // 65535  # round(value / 257)
    return PILImage.fromarray(values.astype(np.uint8))  # uint8, 2-D: mode "L"


class ConvertMode:
    """PIL ``image.convert(mode)`` as a picklable transform (DataLoader workers may pickle transforms); 16-bit
    grayscale is first scaled to 8 bits (:func:`to_8bit`) instead of clipped."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        image = to_8bit(image)
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def _interpolation(name):
    from torchvision.transforms import InterpolationMode

    return name if isinstance(name, InterpolationMode) else InterpolationMode(str(name).lower())


def _normalize(channels: int, mean, std):
    from torchvision import transforms as T

    return T.Normalize(mean=list(mean)[:channels], std=list(std)[:channels])


def image_transforms(image_size: int, num_channels: int, mean, std, train: bool):
    """torchvision transforms: grey -> RGB if the model wants 3 channels, resize, light augmentation."""
    from torchvision import transforms as T

    steps = [ConvertMode("RGB" if num_channels == 3 else "L"), T.Resize((image_size, image_size))]
    if train:
        steps.append(T.RandomAffine(degrees=8, translate=(0.08, 0.08)))
    steps += [T.ToTensor(), _normalize(num_channels, mean, std)]
    return T.Compose(steps)


def _three(values, channels: int) -> tuple[float, ...]:
    values = [float(v) for v in values]
    return tuple(values[:3]) if channels == 3 and len(values) >= 3 else (values[0],) * 3


def _timm_train_transform(size: int, channels: int, mean, std, augment: dict, interpolation: str):
    """timm's ImageNet train pipeline (DeiT): RRC + flip, RandAugment / colour jitter, normalise, random erasing.

    The PIL stages run on RGB (grey inputs are converted first); for a 1-channel model the image goes back to
    "L" after them (RandAugment and jitter keep R = G = B on a grey image, so nothing is lost) and the final
    stage (ToTensor, Normalize, RandomErasing) is timm's, built with the 1-channel mean/std.
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    if augment.get("random_resized_crop", True) is False:
        raise ValueError(
            "random_resized_crop=False is not supported with rand_augment/random_erasing/color_jitter: "
            "timm's train pipeline always does RandomResizedCrop"
        )
    re_prob = float(augment.get("random_erasing") or 0.0)
    if not 0.0 <= re_prob <= 1.0:
        raise ValueError(f"random_erasing is a probability in [0, 1], got {re_prob}")
    common = dict(
        input_size=(3, size, size),
        is_training=True,
        auto_augment=augment.get("rand_augment") or None,
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        color_jitter=augment.get("color_jitter"),
        hflip=0.5 if augment.get("horizontal_flip", True) else 0.0,
        interpolation=interpolation,
        separate=True,
    )
    primary, secondary, final = create_transform(**common, mean=_three(mean, channels), std=_three(std, channels))
    _zero_bit_posterize_as_black(secondary)
    steps = [ConvertMode("RGB"), primary, secondary]
    if channels == 1:
        *_, final = create_transform(**common, mean=(float(list(mean)[0]),), std=(float(list(std)[0]),))
        steps.append(ConvertMode("L"))
    elif channels != 3:
        raise ValueError(f"timm augmentation needs a 1- or 3-channel model, not {channels} channels")
    return T.Compose(steps + [final])


def _posterize(img, bits_to_keep, **kwargs):
    # timm's increasing posterize keeps 4 - int(4 * magnitude / 10) bits: 0 at magnitude 10 (reached with
    # magnitude noise, e.g. "mstd0.5"). Pillow < 13 turned 0 bits into a black image, Pillow 13 raises;
    # keep the old (official-run) behaviour.
    from PIL import Image
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def _zero_bit_posterize_as_black(transform) -> None:
    from timm.data.auto_augment import AugmentOp, posterize

    for op in getattr(transform, "transforms", []):
        for aug in getattr(op, "ops", []):
            if isinstance(aug, AugmentOp) and aug.aug_fn is posterize:
                aug.aug_fn = _posterize


def train_transform(size: int, channels: int, mean, std, augment: dict | None = None, interpolation: str = "bicubic"):
    """The per-image training transform (PIL image -> normalised float tensor [channels, size, size]).

    ``augment`` is a preset's ``data`` dict (keys in ``DATA_KEYS``; eval and batch keys are ignored here):
    without any of ``TRANSFORM_KEYS`` it is ``image_transforms(..., train=True)`` (the embedded demos); with
    ``rand_augment`` / ``random_erasing`` / ``color_jitter`` timm's ``create_transform`` (DeiT); otherwise
    torchvision RandomResizedCrop(size) (``random_resized_crop``) and RandomHorizontalFlip (``horizontal_flip``).
    """
    from torchvision import transforms as T

    augment = check_data_config(augment)
    if not any(k in augment for k in TRANSFORM_KEYS):
        return image_transforms(size, channels, mean, std, train=True)
    if any(augment.get(k) for k in TIMM_AUGMENT_KEYS):
        return _timm_train_transform(size, channels, mean, std, augment, interpolation)
    steps = [ConvertMode("RGB" if channels == 3 else "L")]
    if augment.get("random_resized_crop"):
        steps.append(T.RandomResizedCrop(size, interpolation=_interpolation(interpolation)))
    else:
        steps.append(T.Resize((size, size), interpolation=_interpolation(interpolation)))
    if augment.get("horizontal_flip"):
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor(), _normalize(channels, mean, std)])


def scaled_eval_sizes(size: int, resize=None, crop=None):
    """(resize, crop) for a model of input ``size``: crop becomes ``size`` and resize keeps its ratio to crop
    (256/224 at 224 -> round(size * 256 / 224) at ``size``). resize is an int (shorter side) or (height, width);
    a missing crop is ``size``, a missing resize the crop. (None, None) stays (None, None)."""
    if resize is None and crop is None:
        return None, None
    crop = int(crop) if crop is not None else int(size)
    resize = crop if resize is None else resize
    scale = size / crop
    if isinstance(resize, (tuple, list)):
        resize = tuple(int(round(r * scale)) for r in resize)
    else:
        resize = int(round(int(resize) * scale))
    return resize, int(size)


def eval_transform(size: int, channels: int, mean, std, resize=None, crop=None, interpolation: str = "bilinear"):
    """The deterministic evaluation transform (PIL image -> tensor [channels, size, size]).

    resize = crop = None: ``image_transforms(..., train=False)`` (square resize, the embedded demos). Otherwise
    Resize(resize) then CenterCrop(crop): an int resize scales the shorter side (aspect ratio kept), a
    (height, width) resize is exact. Sizes are given for ``crop`` and scaled to the model's ``size``
    (``scaled_eval_sizes``): resize=256, crop=224 at size 112 is Resize(128) + CenterCrop(112).
    """
    from torchvision import transforms as T

    resize, crop = scaled_eval_sizes(size, resize, crop)
    if resize is None:
        if str(interpolation).lower() == "bilinear":
            return image_transforms(size, channels, mean, std, train=False)
        resize, crop = (size, size), size
    steps = [
        ConvertMode("RGB" if channels == 3 else "L"),
        T.Resize(list(resize) if isinstance(resize, tuple) else resize, interpolation=_interpolation(interpolation)),
        T.CenterCrop(crop),
        T.ToTensor(),
        _normalize(channels, mean, std),
    ]
    return T.Compose(steps)


def _get(obj, key):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def eval_sizes_from_processor(processor, size: int):
    """(resize, crop) for ``eval_transform`` from a Hugging Face image processor, scaled to the model's ``size``.

    - ``size={"shortest_edge": s}`` with ``crop_pct`` (ConvNext / ResNet processors): s < 384 -> resize the
      shorter side to int(s / crop_pct), crop s; s >= 384 -> a square resize (None, None).
    - ``size={"shortest_edge": s}`` with ``crop_size`` and ``do_center_crop`` -> (s, crop).
    - ``size={"height": h, "width": w}`` with ``crop_size`` and ``do_center_crop`` (DeiT: 256x256 then 224)
      -> ((h, w), crop); without a centre crop (ViT) -> (None, None), the square resize.
    A dict or a transformers ``SizeDict`` is accepted; values are scaled so the crop is ``size``.
    """
    proc_size = _get(processor, "size")
    crop_size = _get(processor, "crop_size")
    do_crop = _get(processor, "do_center_crop")
    crop = None
    if crop_size is not None and do_crop is not False:
        crop = _get(crop_size, "height") or _get(crop_size, "shortest_edge")
        if crop is None and isinstance(crop_size, int):
            crop = crop_size
    shortest = _get(proc_size, "shortest_edge") if proc_size is not None else None
    height, width = _get(proc_size, "height"), _get(proc_size, "width")
    if isinstance(proc_size, int):
        shortest = proc_size
    crop_pct = _get(processor, "crop_pct")
    if shortest is not None and crop is None and crop_pct:
        if shortest >= 384:
            return None, None
        return scaled_eval_sizes(size, int(shortest / crop_pct), shortest)
    if crop is None:
        return None, None
    if shortest is not None:
        return scaled_eval_sizes(size, int(shortest), crop)
    if height is not None and width is not None:
        return scaled_eval_sizes(size, (int(height), int(width)), crop)
    return scaled_eval_sizes(size, None, crop)


def build_transforms(
    size: int, channels: int, mean, std, data: dict | None = None, processor=None, interpolation: str = "bicubic"
):
    """(train_tf, eval_tf) for a preset's ``data`` dict. Eval sizes: ``eval_resize``/``eval_crop`` if given,
    else the processor's (``eval_sizes_from_processor``), else the square resize of the demos."""
    data = check_data_config(data)
    train_tf = train_transform(size, channels, mean, std, data, interpolation)
    if "eval_resize" in data or "eval_crop" in data:
        resize, crop = data.get("eval_resize"), data.get("eval_crop")
        eval_tf = eval_transform(size, channels, mean, std, resize, crop, interpolation)
    elif processor is not None and eval_sizes_from_processor(processor, size) != (None, None):
        resize, crop = eval_sizes_from_processor(processor, size)
        eval_tf = eval_transform(size, channels, mean, std, resize, crop, interpolation)
    else:
        eval_tf = eval_transform(size, channels, mean, std)
    return train_tf, eval_tf


def with_transforms(data: DatasetDict, train_tf, eval_tf, image_column="image", label_column="label") -> DatasetDict:
    def apply(tf):
        def fn(batch):
            return {"pixel_values": [tf(im) for im in batch[image_column]], "labels": batch[label_column]}

        return fn

    data["train"].set_transform(apply(train_tf))
    data["validation"].set_transform(apply(eval_tf))
    return data


def collate(examples) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([int(e["labels"]) for e in examples]),
    }


class MixupCollator:
    """Training collator: ``collate`` then timm's Mixup/CutMix; ``labels`` become float soft targets (B, C).

    Targets are label-smoothed one-hots (timm: off = s / C, on = 1 - s + off) mixed with the batch flipped.
    With mixup = cutmix = 0 no mixing happens and the targets are the smoothed one-hots. timm needs an even
    batch: for an odd batch the first B - 1 examples are mixed among themselves and the last one is left as it
    is (image unchanged, smoothed one-hot target); a batch of 1 is never mixed. Use only for training; keep
    ``collate`` (integer labels) for evaluation.
    """

    def __init__(
        self,
        num_classes: int,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        mode: str = "batch",
    ):
        if mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mode must be 'batch', 'pair' or 'elem', not {mode!r}")
        if mixup < 0 or cutmix < 0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError("mixup and cutmix are Beta alphas >= 0 and label_smoothing is in [0, 1)")
        self.num_classes, self.label_smoothing = int(num_classes), float(label_smoothing)
        self.mixer = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            self.mixer = Mixup(
                mixup_alpha=float(mixup),
                cutmix_alpha=float(cutmix),
                switch_prob=float(switch_prob),
                mode=mode,
                label_smoothing=self.label_smoothing,
                num_classes=self.num_classes,
            )

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        from timm.data.mixup import mixup_target

        batch = collate(examples)
        x, labels = batch["pixel_values"], batch["labels"]
        targets = mixup_target(labels, self.num_classes, lam=1.0, smoothing=self.label_smoothing)
        even = len(labels) - len(labels) % 2
        if self.mixer is not None and even > 0:
            # in-place on the view x[:even]; the (odd) last example keeps its image and its smoothed one-hot
            _, targets[:even] = self.mixer(x[:even], labels[:even])
        batch["labels"] = targets.float()
        return batch


def train_collator(data: dict | None, num_classes: int):
    """The training collator for a preset's ``data`` dict: ``MixupCollator`` when ``mixup`` or ``cutmix`` is
    on, else ``collate`` (integer labels; label smoothing is then the loss's job)."""
    data = check_data_config(data)
    mixup, cutmix = float(data.get("mixup") or 0.0), float(data.get("cutmix") or 0.0)
    if mixup <= 0 and cutmix <= 0:
        return collate
    return MixupCollator(
        num_classes, mixup, cutmix, float(data.get("mixup_switch_prob", 0.5)), float(data.get("label_smoothing", 0.1))
    )


# object detection ------------------------------------------------------------------------------------------------
# Detection batches (the convention of transformers' ...ForObjectDetection models): ``pixel_values`` [B, C, H, W]
# and ``labels``, a list of B dicts with ``class_labels`` (int64 [n]) and ``boxes`` (float [n, 4], normalised
# centre x, centre y, width, height in [0, 1]).
_BOX_SLACK = 1e-4  # float rounding of boxes that touch the image border
DETECTION_CHECKED_EXAMPLES = 16  # how many examples check_dataset reads (through their transform) up front


def coco_boxes_to_cxcywh(boxes, width: int, height: int, where: str = "annotation") -> torch.Tensor:
    """COCO boxes (absolute x_min, y_min, width, height in pixels) as normalised (cx, cy, w, h), refusing boxes
    outside a ``width`` x ``height`` image (or with a non-positive size) with an error naming ``where``."""
    xywh = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if xywh.numel() and ((xywh[:, 2:] <= 0).any() or (xywh[:, :2] < -0.5).any()):
        raise ValueError(f"{where}: COCO boxes need x, y >= 0 and width, height > 0 (pixels), got {xywh.tolist()[:3]}")
    if xywh.numel() and ((xywh[:, 0] + xywh[:, 2] > width + 0.5) | (xywh[:, 1] + xywh[:, 3] > height + 0.5)).any():
        raise ValueError(
            f"{where}: a COCO box (x, y, w, h) {xywh.tolist()[:3]} reaches outside the {width}x{height} image; "
            "boxes are absolute pixels of the image they annotate"
        )
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    centre = xywh[:, :2] + xywh[:, 2:] / 2
    return (torch.cat([centre, xywh[:, 2:]], dim=1) / scale).clamp(0.0, 1.0)


def check_detection_labels(labels, where: str = "labels", num_labels: int | None = None) -> None:
    """Refuse detection targets a detector's loss would misread: not a list of dicts with ``class_labels`` and
    ``boxes``, boxes not [n, 4] or not normalised cxcywh inside the image (values and box edges in [0, 1], positive
    width and height), class labels not integers in ``[0, num_labels)``. The error names the example and the fix."""
    if not isinstance(labels, (list, tuple)):
        raise ValueError(
            f"{where}: detection labels are a list with one dict per image ({{'class_labels': ..., 'boxes': ...}}), "
            f"got {type(labels).__name__}; use mdp_hf.data.detection_collate as the data collator"
        )
    for index, target in enumerate(labels):
        at = f"{where}[{index}]"
        if not isinstance(target, dict) or "class_labels" not in target or "boxes" not in target:
            keys = sorted(target) if isinstance(target, dict) else type(target).__name__
            raise ValueError(
                f"{at}: a detection target needs 'class_labels' and 'boxes' (normalised cx, cy, w, h), got {keys}. "
                "A dataset without boxes cannot train a detector: give every image its boxes (COCO format: "
                "coco_boxes_to_cxcywh converts x, y, w, h pixels)"
            )
        boxes = torch.as_tensor(target["boxes"])
        classes = torch.as_tensor(target["class_labels"])
        if boxes.numel() == 0 and classes.numel() == 0:
            continue  # an image without objects: every prediction is "no object"
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or classes.ndim != 1 or len(classes) != len(boxes):
            raise ValueError(
                f"{at}: 'boxes' must be [n, 4] and 'class_labels' [n] for the same n, got {tuple(boxes.shape)} and "
                f"{tuple(classes.shape)}"
            )
        if not boxes.is_floating_point() or classes.is_floating_point() or classes.dtype == torch.bool:
            raise ValueError(f"{at}: 'boxes' must be floats (normalised cxcywh) and 'class_labels' integers")
        cx, cy, w, h = boxes.double().unbind(-1)
        edges = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        bad = (
            ~torch.isfinite(boxes).all(-1)
            | (boxes < 0).any(-1)
            | (boxes > 1).any(-1)
            | (w <= 0)
            | (h <= 0)
            | (edges < -_BOX_SLACK).any(-1)
            | (edges > 1 + _BOX_SLACK).any(-1)
        )
        if bad.any():
            first = boxes[bad.nonzero()[0, 0]].tolist()
            raise ValueError(
                f"{at}: {int(bad.sum())} box(es) lie outside the image, e.g. {[round(v, 4) for v in first]}: boxes are "
                "normalised (cx, cy, w, h) with the box inside [0, 1] x [0, 1] and w, h > 0. Convert pixel boxes with "
                "coco_boxes_to_cxcywh (COCO x, y, w, h) or divide by the image width / height"
            )
        if num_labels is not None and ((classes < 0) | (classes >= num_labels)).any():
            shown = sorted({int(c) for c in classes[(classes < 0) | (classes >= num_labels)]})[:5]
            raise ValueError(
                f"{at}: class labels {shown} are outside [0, {num_labels}): the detector predicts {num_labels} "
                "classes (plus 'no object'); give it num_labels >= the largest class + 1, or remap the classes"
            )


def detection_collate(examples) -> dict:
    """Collate detection examples (``pixel_values`` [C, H, W] and ``labels`` a dict with ``class_labels`` and
    normalised cxcywh ``boxes``) into a detector batch, checked by :func:`check_detection_labels`."""
    labels = [e.get("labels") if isinstance(e, dict) else None for e in examples]
    check_detection_labels(labels, "detection_collate: labels")
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": [
            {
                **{k: v for k, v in target.items() if k not in ("class_labels", "boxes")},
                "class_labels": torch.as_tensor(target["class_labels"], dtype=torch.int64),
                "boxes": torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4),
            }
            for target in labels
        ],
    }
