"""Object-detection data for the detector recipe: a generated offline data set, COCO-style checks, the image
processor transform and COCO mAP (torchmetrics); batches are collated by ``mdp_hf.data.detection_collate``.

The layout is the one of Hub detection sets such as ``cppe-5``: columns ``image``, ``objects`` (a dict of lists:
``bbox`` [[x_min, y_min, width, height], ...] in pixels, ``category`` [int, ...], optionally ``id`` and
``area``), ``image_id``, ``width``, ``height``. The built-in ``shapes`` (:func:`generate_shapes`) is rendered
circles, squares and triangles in that layout; a Hub set in it goes through the same code.

Boxes are checked against their image before anything is trained (:func:`check_detection_dataset`): the
image processor would otherwise clip boxes that leave the image and drop empty ones without a word.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value, load_dataset, load_from_disk
from datasets import Image as ImageFeature

SHAPE_NAMES = ["circle", "square", "triangle"]
# RGB colours of the shapes: several per class, so that the class is the shape, not the colour
SHAPE_COLOURS = [(230, 60, 50), (60, 200, 70), (70, 110, 240), (240, 220, 60), (230, 80, 220), (80, 220, 230)]
BUILTIN_DETECTION_DATASETS = ("shapes",)
BOX_TOLERANCE_PX = 1.0  # boxes may leave the image by this much (rounding in annotation tools), not more


def _shape_mask(kind: str, x: int, y: int, size: int, image_size: int):
    from PIL import Image, ImageDraw

    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    corners = (x, y, x + size - 1, y + size - 1)
    if kind == "circle":
        draw.ellipse(corners, fill=255)
    elif kind == "square":
        draw.rectangle(corners, fill=255)
    else:  # an upright triangle filling the square's width and height
        draw.polygon([(x + (size - 1) / 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=255)
    return mask


def _iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    w = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    h = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = w * h
    return inter / (aw * ah + bw * bh - inter)


def generate_shapes(
    num_images: int,
    image_size: int = 64,
    seed: int = 0,
    max_objects: int = 4,
    min_fraction: float = 0.2,
    max_fraction: float = 0.45,
    max_overlap: float = 0.1,
    first_image_id: int = 0,
) -> Dataset:
    """``num_images`` rendered images, each with 1 to ``max_objects`` circles / squares / triangles of a few
    colours, sizes between ``min_fraction`` and ``max_fraction`` of the image side, at random positions
    (overlapping another shape's box by at most ``max_overlap`` IoU), on a noisy dark background.

    Returned as a ``datasets.Dataset`` in the COCO / cppe-5 layout (see the module doc); every box is the exact
    extent of the drawn shape. The same arguments give the same data set."""
    from PIL import Image

    if num_images < 1 or max_objects < 1 or image_size < 16:
        raise ValueError("generate_shapes needs num_images >= 1, max_objects >= 1 and image_size >= 16")
    rng = np.random.default_rng(seed)
    low, high = max(4, int(round(min_fraction * image_size))), int(round(max_fraction * image_size))
    rows = {"image_id": [], "image": [], "width": [], "height": [], "objects": []}
    next_object_id = 0
    for index in range(num_images):
        background = rng.integers(0, 70, size=3)
        noise = rng.normal(0.0, 8.0, size=(image_size, image_size, 3))
        canvas = np.clip(background + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(canvas, "RGB")
        objects = {"id": [], "area": [], "bbox": [], "category": []}
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _attempt in range(20):  # a free spot; a crowded image keeps fewer shapes
                size = int(rng.integers(low, high + 1))
                x, y = (int(v) for v in rng.integers(0, image_size - size + 1, size=2))
                category = int(rng.integers(len(SHAPE_NAMES)))
                mask = _shape_mask(SHAPE_NAMES[category], x, y, size, image_size)
                left, top, right, bottom = mask.getbbox()
                box = [float(left), float(top), float(right - left), float(bottom - top)]
                if all(_iou(box, other) <= max_overlap for other in objects["bbox"]):
                    break
            else:
                continue
            colour = SHAPE_COLOURS[int(rng.integers(len(SHAPE_COLOURS)))]
            image.paste(colour, mask=mask)
            objects["id"].append(next_object_id)
            objects["area"].append(float(np.count_nonzero(np.asarray(mask))))
            objects["bbox"].append(box)
            objects["category"].append(category)
            next_object_id += 1
        rows["image_id"].append(first_image_id + index)
        rows["image"].append(image)
        rows["width"].append(image_size)
        rows["height"].append(image_size)
        rows["objects"].append(objects)
    features = Features(
        {
            "image_id": Value("int64"),
            "image": ImageFeature(),
            "width": Value("int32"),
            "height": Value("int32"),
            "objects": Sequence(
                {
                    "id": Value("int64"),
                    "area": Value("float32"),
                    "bbox": Sequence(Value("float32"), length=4),
                    "category": ClassLabel(names=SHAPE_NAMES),
                }
            ),
        }
    )
    return Dataset.from_dict(rows, features=features)


def load_detection(
    dataset_name: str,
    seed: int = 0,
    num_train_images: int = 3000,
    num_eval_images: int = 300,
    image_size: int = 64,
) -> DatasetDict:
    """ "train" and "validation" splits of a detection data set: the built-in ``shapes`` (generated here with
    ``seed``, the two splits from independent streams) or a Hub / local ``datasets`` id in the COCO layout (its
    "validation" split, else "test", else 10 % of "train")."""
    from .paths import check_local_path

    if dataset_name == "shapes":
        return DatasetDict(
            train=generate_shapes(num_train_images, image_size, seed=seed),
            validation=generate_shapes(num_eval_images, image_size, seed=seed + 1, first_image_id=num_train_images),
        )
    if not dataset_name:
        raise ValueError(f"give --dataset_name: a built-in ({', '.join(BUILTIN_DETECTION_DATASETS)}) or a Hub id")
    check_local_path(dataset_name, "--dataset_name")
    saved = any(os.path.isfile(os.path.join(dataset_name, f)) for f in ("dataset_dict.json", "state.json"))
    data = load_from_disk(dataset_name) if saved else load_dataset(dataset_name)  # save_to_disk folder, or Hub
    if isinstance(data, Dataset):
        data = DatasetDict(train=data)
    if "validation" not in data:
        if "test" in data:
            data["validation"] = data.pop("test")
        else:
            parts = data["train"].train_test_split(test_size=0.1, seed=seed)
            data = DatasetDict(train=parts["train"], validation=parts["test"])
    return DatasetDict(train=data["train"], validation=data["validation"])


def _objects_feature(dataset: Dataset, objects_column: str):
    feature = dataset.features[objects_column]
    if isinstance(feature, (list, tuple)):  # [{...}]: a list of dicts
        feature = feature[0]
    return getattr(feature, "feature", feature)  # List({...}) -> {...}


def category_names(dataset: Dataset, objects_column: str = "objects") -> list[str]:
    """The class names of the ``category`` (ClassLabel) of the objects; "0".."max" for plain integers."""
    feature = _objects_feature(dataset, objects_column)
    category = feature.get("category") if isinstance(feature, dict) else None
    category = getattr(category, "feature", category)
    if isinstance(category, ClassLabel):
        return list(category.names)
    values = [c for row in dataset.select_columns([objects_column])[objects_column] for c in _row_objects(row)[1]]
    return [str(i) for i in range(int(max(values)) + 1)] if values else []


def _row_objects(objects) -> tuple[list, list]:
    """(boxes, categories) of one row's objects: a dict of lists (cppe-5) or a list of dicts (COCO json)."""
    if isinstance(objects, dict):
        boxes = objects.get("bbox")
        categories = objects.get("category", objects.get("category_id"))
    else:
        boxes = [o.get("bbox") for o in objects]
        categories = [o.get("category", o.get("category_id")) for o in objects]
    return boxes, categories


def _image_sizes(dataset: Dataset, image_column: str) -> list[tuple[int, int]]:
    """(width, height) per row: the ``width`` / ``height`` columns, else read from the encoded images' headers."""
    if "width" in dataset.column_names and "height" in dataset.column_names:
        return list(zip(dataset["width"], dataset["height"]))
    from PIL import Image

    sizes = []
    for image in dataset.cast_column(image_column, ImageFeature(decode=False))[image_column]:
        with Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as opened:
            sizes.append(opened.size)
    return sizes


def check_detection_dataset(
    dataset: Dataset,
    what: str = "the train split",
    image_column: str = "image",
    objects_column: str = "objects",
    num_labels: int | None = None,
) -> None:
    """Refuse, before any training, a detection data set the detector cannot learn from or that would be
    silently changed on the way: missing columns, no boxes at all, boxes that are not inside their image (COCO
    [x_min, y_min, width, height] in pixels, up to ``BOX_TOLERANCE_PX`` over the edge), boxes without area, and
    categories outside ``[0, num_labels)``."""
    columns = dataset.column_names
    missing = [c for c in (image_column, objects_column) if c not in columns]
    layout = "{'bbox': [[x_min, y_min, width, height], ...] in pixels, 'category': [int, ...]}"
    if missing:
        raise ValueError(
            f"{what} has no column(s) {missing}; its columns are {columns}. A detection data set needs an image "
            f"column and an objects column {layout} (the cppe-5 layout): pass --image_column / --objects_column"
        )
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty (0 images): check --dataset_name and the split")
    objects = dataset.select_columns([objects_column])[objects_column]
    sizes = _image_sizes(dataset, image_column)
    bad, num_boxes = [], 0
    for row, (row_objects, (width, height)) in enumerate(zip(objects, sizes)):
        boxes, categories = _row_objects(row_objects)
        if boxes is None:
            raise ValueError(
                f"{what}: the {objects_column!r} column of image {row} has no 'bbox' (it holds "
                f"{sorted(row_objects) if isinstance(row_objects, dict) else row_objects!r}); a detection data set "
                f"needs boxes: {objects_column} = {layout}"
            )
        if categories is None or len(categories) != len(boxes):
            raise ValueError(
                f"{what}: image {row} has {len(boxes)} boxes but its {objects_column!r} has "
                f"{'no category' if categories is None else f'{len(categories)} categories'}: give one 'category' "
                "per box"
            )
        for box, category in zip(boxes, categories):
            num_boxes += 1
            reason = _box_problem(box, width, height)
            if reason is None and num_labels is not None and not 0 <= int(category) < num_labels:
                reason = f"category {category} is outside [0, {num_labels})"
            if reason is not None:
                bad.append(f"image {row} ({width}x{height}) box {list(box)}: {reason}")
    if num_boxes == 0:
        raise ValueError(
            f"{what} has no boxes: every image's {objects_column!r} is empty ({len(dataset)} images). A detector "
            f"learns from boxes: give {objects_column} = {layout}"
        )
    if bad:
        raise ValueError(
            f"{what}: {len(bad)} of {num_boxes} boxes are not valid COCO boxes inside their image, e.g. "
            f"{'; '.join(bad[:3])}. Boxes are [x_min, y_min, width, height] in pixels of the image (the "
            f"'width'/'height' columns), inside it up to {BOX_TOLERANCE_PX:g} px: convert [x_min, y_min, x_max, "
            "y_max] or normalised [0, 1] boxes first, or drop the broken annotations (the image processor would "
            "clip or drop them silently)"
        )


def _box_problem(box, width: int, height: int) -> str | None:
    if box is None or len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        return "not 4 finite numbers"
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return "width and height must be > 0"
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return f"it reaches ({x + w:g}, {y + h:g}), outside the image"
    return None


def coco_annotations(image_id: int, objects) -> dict:
    """One image's objects as the COCO-detection target image processors take."""
    boxes, categories = _row_objects(objects)
    return {
        "image_id": int(image_id),
        "annotations": [
            {
                "image_id": int(image_id),
                "category_id": int(category),
                "bbox": [float(v) for v in box],
                "iscrowd": 0,
                "area": float(box[2]) * float(box[3]),
            }
            for box, category in zip(boxes, categories)
        ],
    }


def detection_transform(image_processor, image_column: str = "image", objects_column: str = "objects"):
    """A ``set_transform`` function: the image processor turns images and COCO objects into ``pixel_values``
    and ``labels`` (``class_labels``, normalised centre ``boxes``, ``orig_size``, ...), as the model trains on
    them and as ``post_process_object_detection`` expects."""

    def transform(batch):
        images = [image.convert("RGB") for image in batch[image_column]]
        ids = batch.get("image_id") or list(range(len(images)))
        annotations = [coco_annotations(i, objects) for i, objects in zip(ids, batch[objects_column])]
        encoded = image_processor(images=images, annotations=annotations, return_tensors="pt")
        return {"pixel_values": list(encoded["pixel_values"]), "labels": [dict(t) for t in encoded["labels"]]}

    return transform


def mean_average_precision(predictions: list[dict], targets: list[dict], class_metrics: bool = False) -> dict:
    """COCO mAP by torchmetrics' ``MeanAveragePrecision`` (pycocotools backend), boxes [x0, y0, x1, y1].

    ``predictions``: per image {"boxes", "scores", "labels"}; ``targets``: per image {"boxes", "labels"}.
    Returns plain floats: map, map_50, map_75, map_small/medium/large, mar_1/10/100 (-1 where COCO has no such
    objects), and map_<class index> per class with ``class_metrics``."""
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as error:
        raise ImportError(
            "COCO mAP needs torchmetrics and pycocotools: pip install 'mdp_hf[detection]' -c constraints.txt"
        ) from error
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=class_metrics)
    metric.update(
        [_as_tensors(p, ("boxes", "scores", "labels")) for p in predictions],
        [_as_tensors(t, ("boxes", "labels")) for t in targets],
    )
    result = metric.compute()
    out = {}
    for key, value in result.items():
        if key == "classes":
            continue
        if key.endswith("_per_class"):
            if class_metrics:  # map_per_class -> map_<class>, mar_100_per_class -> mar_100_<class>
                classes = result["classes"].reshape(-1).tolist()
                name = key[: -len("_per_class")]
                out.update({f"{name}_{int(c)}": float(v) for c, v in zip(classes, value.reshape(-1).tolist())})
        elif value.numel() == 1:
            out[key] = float(value)
    return out


def _as_tensors(entry: dict, keys) -> dict:
    """The tensors torchmetrics takes: boxes float [N, 4], scores float [N], labels int64 [N]."""
    out = {}
    for key in keys:
        value = torch.as_tensor(np.asarray(entry[key]))
        out[key] = value.float().reshape(-1, 4) if key == "boxes" else value.reshape(-1)
        if key == "labels":
            out[key] = out[key].long()
        elif key == "scores":
            out[key] = out[key].float()
    return out


class DetectionMAP:
    """``compute_metrics`` for ``Trainer`` on a detector (with ``eval_do_concat_batches=False``): the model's
    outputs go through the image processor's ``post_process_object_detection`` (boxes in pixels of each image's
    ``orig_size``), the targets' normalised centre boxes are turned into the same pixels, and
    :func:`mean_average_precision` scores them."""

    def __init__(self, image_processor, threshold: float = 0.0):
        self.image_processor, self.threshold = image_processor, threshold

    def __call__(self, eval_pred) -> dict:
        from transformers.image_transforms import center_to_corners_format
        from transformers.utils import ModelOutput

        predictions, label_batches = eval_pred.predictions, eval_pred.label_ids
        if not (isinstance(label_batches, (list, tuple)) and label_batches and isinstance(label_batches[0], list)):
            raise ValueError(
                "DetectionMAP needs the evaluation batches kept apart: TrainingArguments(eval_do_concat_batches=False)"
            )
        processed, targets = [], []
        for outputs, labels in zip(predictions, label_batches):
            logits, boxes = [o for o in outputs if not isinstance(o, dict)][:2]  # (loss_dict,) logits, pred_boxes
            sizes = torch.as_tensor(np.stack([np.asarray(t["orig_size"]) for t in labels]))
            output = ModelOutput(logits=torch.as_tensor(logits), pred_boxes=torch.as_tensor(boxes))
            processed += self.image_processor.post_process_object_detection(
                output, threshold=self.threshold, target_sizes=sizes
            )
            for target, (height, width) in zip(labels, sizes.tolist()):
                corners = center_to_corners_format(torch.as_tensor(np.asarray(target["boxes"])).reshape(-1, 4))
                scale = torch.tensor([width, height, width, height], dtype=corners.dtype)
                targets.append({"boxes": corners * scale, "labels": np.asarray(target["class_labels"])})
        return mean_average_precision(processed, targets)
