"""Image-classification data for recipes: Hub datasets, image folders, and two offline built-ins.

Built-ins (no network): ``digits`` (scikit-learn's 8x8 digits, 1,797 images, needs only pip) and
``fashion_mnist`` (the full 70,000-image Fashion-MNIST from Debian's ``dataset-fashion-mnist``
package, /usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset

FASHION_MNIST_DIR = os.environ.get("MDP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
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


def load_image_classification(dataset_name: str | None = None, train_dir: str | None = None,
                              validation_dir: str | None = None, image_column: str = "image",
                              label_column: str = "label", seed: int = 0) -> DatasetDict:  # fmt: skip
    """Load a dataset (built-in name, Hub id, or imagefolder dirs) with "train" and "validation" splits and
    check it has the image and label columns, before any expensive work starts."""
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
    columns = data["train"].column_names
    missing = [c for c in (image_column, label_column) if c not in columns]
    if missing:
        raise ValueError(
            f"dataset has no column(s) {missing}; its columns are {columns}. Pass --image_column / --label_column "
            "naming the image and the integer label columns"
        )
    return data


def label_names(data: DatasetDict, label_column: str = "label") -> list[str]:
    feature = data["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(v) for v in sorted(set(data["train"][label_column]))]


def image_transforms(image_size: int, num_channels: int, mean, std, train: bool):
    """torchvision transforms: grey -> RGB if the model wants 3 channels, resize, light augmentation."""
    from torchvision import transforms as T

    steps = [T.Lambda(lambda im: im.convert("RGB" if num_channels == 3 else "L")), T.Resize((image_size, image_size))]
    if train:
        steps.append(T.RandomAffine(degrees=8, translate=(0.08, 0.08)))
    steps += [T.ToTensor(), T.Normalize(mean=list(mean)[:num_channels], std=list(std)[:num_channels])]
    return T.Compose(steps)


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
