"""mdp_hf.data pipelines: train/eval transforms from preset data dicts, processor eval sizes, Mixup/CutMix."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image

from mdp_hf import data as D
from mdp_hf.presets import PRESETS

DEIT = PRESETS["deit_paper"].data
RESNET = PRESETS["resnet50_paper"].data
HALF = [0.5, 0.5, 0.5]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def grey_image(w=40, h=30, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8), mode="L")


def rgb_image(w=40, h=30, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("augment", [None, {}, DEIT, RESNET], ids=["none", "empty", "deit", "resnet"])
@pytest.mark.parametrize("make", [grey_image, rgb_image], ids=["grey", "rgb"])
def test_shapes_and_dtypes(channels, augment, make):
    train_tf, eval_tf = D.build_transforms(32, channels, HALF, HALF, augment)
    for tf in (train_tf, eval_tf, D.train_transform(32, channels, HALF, HALF, augment)):
        out = tf(make())
        assert out.shape == (channels, 32, 32) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_no_augment_is_the_demo_pipeline():
    image = grey_image()
    for augment in (None, {}, {"mixup": 0.8, "label_smoothing": 0.1}):  # batch-only keys: per-image unchanged
        seed_all(3)
        new = D.train_transform(16, 1, HALF, HALF, augment)(image)
        seed_all(3)
        old = D.image_transforms(16, 1, HALF, HALF, train=True)(image)
        assert torch.equal(new, old)
    assert torch.equal(D.eval_transform(16, 3, HALF, HALF)(image), D.image_transforms(16, 3, HALF, HALF, False)(image))


def test_deit_augmentation_is_random_and_eval_is_deterministic():
    image = rgb_image(64, 64)
    train_tf = D.train_transform(32, 3, HALF, HALF, DEIT)
    seed_all(0)
    first, second = train_tf(image), train_tf(image)
    assert not torch.allclose(first, second)
    eval_tf = D.eval_transform(32, 3, HALF, HALF, resize=256, crop=224, interpolation="bicubic")
    assert torch.equal(eval_tf(image), eval_tf(image))
    # timm's pieces are there: RandAugment, random erasing in pixel mode
    text = repr(train_tf)
    assert "RandAugment" in text and "RandomErasing" in text and "RandomResizedCrop" in text


def test_deit_on_grey_one_channel_matches_three_channel():
    """A 1-channel model gets the same augmented image as channel 0 of a 3-channel model (grey stays grey)."""
    augment = {"rand_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4}  # no erasing: its noise is per channel
    image = grey_image(48, 48, seed=1)
    for seed in range(4):
        seed_all(seed)
        three = D.train_transform(32, 3, HALF, HALF, augment)(image)
        seed_all(seed)
        one = D.train_transform(32, 1, HALF, HALF, augment)(image)
        assert one.shape == (1, 32, 32)
        torch.testing.assert_close(three[1], three[0])
        torch.testing.assert_close(three[2], three[0])
        torch.testing.assert_close(one[0], three[0])


def test_deit_random_erasing_on_one_channel():
    tf = D.train_transform(32, 1, [0.5], [0.5], {"random_erasing": 1.0})  # always erase
    seed_all(0)
    out = tf(grey_image(32, 32))
    assert out.shape == (1, 32, 32)
    # normalised pixels lie in [-1, 1]; erased ones are N(0, 1) noise, some fall outside
    assert (out.abs() > 1.0001).any()


def test_resnet_train_pipeline_is_torchvision_rrc_and_flip():
    text = repr(D.train_transform(32, 3, HALF, HALF, RESNET))
    assert "RandomResizedCrop" in text and "RandomHorizontalFlip" in text and "RandAugment" not in text


def _gradient_image(w=300, h=200) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    rgb = np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def test_resnet_eval_keeps_aspect_ratio():
    """300x200 at model size 196 with the preset's 256/224: Resize(224) of the shorter side (336x224), then
    CenterCrop(196): crop offset (70, 14). Checked on a horizontal (R) and vertical (G) grey-level ramp."""
    assert D.scaled_eval_sizes(196, RESNET["eval_resize"], RESNET["eval_crop"]) == (224, 196)
    _, eval_tf = D.build_transforms(196, 3, [0, 0, 0], [1, 1, 1], RESNET, interpolation="bilinear")
    out = eval_tf(_gradient_image()) * 255
    assert out.shape == (3, 196, 196)
    j = torch.arange(196, dtype=torch.float32)
    src_x = (j + 70 + 0.5) * 300 / 336 - 0.5  # pixel centres of the 336-wide resize in the 300-wide source
    src_y = (j + 14 + 0.5) * 200 / 224 - 0.5
    want_r = src_x * 255 / 299
    want_g = src_y * 255 / 199
    assert (out[0] - want_r[None, :]).abs().max() < 2.0
    assert (out[1] - want_g[:, None]).abs().max() < 2.0
    # a squashed square resize would start at grey level 0 and end at 255 across the row
    assert out[0, 0, 0] > 50 and out[0, 0, -1] < 205


def test_eval_sizes_scale_with_model_size():
    assert D.scaled_eval_sizes(224, 256, 224) == (256, 224)
    assert D.scaled_eval_sizes(28, 256, 224) == (32, 28)
    assert D.scaled_eval_sizes(28) == (None, None)
    out = D.eval_transform(28, 1, [0.5], [0.5], resize=256, crop=224)(grey_image(50, 40))
    assert out.shape == (1, 28, 28)


def test_eval_sizes_from_processor():
    from transformers import ConvNextImageProcessor, DeiTImageProcessor, ViTImageProcessor

    resnet = ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)  # microsoft/resnet-50's
    assert D.eval_sizes_from_processor(resnet, 224) == (256, 224)
    assert D.eval_sizes_from_processor(resnet, 112) == (128, 112)
    assert D.eval_sizes_from_processor(ConvNextImageProcessor(size={"shortest_edge": 384}), 384) == (None, None)
    assert D.eval_sizes_from_processor(DeiTImageProcessor(), 224) == ((256, 256), 224)
    assert D.eval_sizes_from_processor(ViTImageProcessor(), 224) == (None, None)
    plain = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}
    assert D.eval_sizes_from_processor(plain, 224) == (256, 224)
    # processor sizes are used when the preset has no eval keys
    _, eval_tf = D.build_transforms(56, 3, HALF, HALF, DEIT, processor=resnet)
    assert "CenterCrop" in repr(eval_tf) and eval_tf(rgb_image(90, 60)).shape == (3, 56, 56)


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="auto_augment.*supported keys.*rand_augment"):
        D.train_transform(32, 3, HALF, HALF, {"auto_augment": "rand-m9"})
    with pytest.raises(ValueError, match="bogus"):
        D.build_transforms(32, 3, HALF, HALF, {"bogus": 1})
    with pytest.raises(ValueError, match="bogus"):
        D.train_collator({"bogus": 1}, 10)


def _examples(n, classes=10, shape=(3, 8, 8)):
    return [{"pixel_values": torch.randn(*shape), "labels": i % classes} for i in range(n)]


def test_mixup_collator_soft_targets():
    seed_all(0)
    collator = D.MixupCollator(10)
    for _ in range(5):
        batch = collator(_examples(8))
        labels = batch["labels"]
        assert labels.shape == (8, 10) and labels.dtype == torch.float32
        torch.testing.assert_close(labels.sum(1), torch.ones(8))
        assert batch["pixel_values"].shape == (8, 3, 8, 8)


def test_mixup_collator_without_mixing_is_one_hot():
    examples = _examples(6)
    batch = D.MixupCollator(10, mixup=0.0, cutmix=0.0, label_smoothing=0.0)(examples)
    want = torch.nn.functional.one_hot(torch.tensor([e["labels"] for e in examples]), 10).float()
    assert torch.equal(batch["labels"], want)
    assert torch.equal(batch["pixel_values"], torch.stack([e["pixel_values"] for e in examples]))
    smoothed = D.MixupCollator(10, mixup=0.0, cutmix=0.0, label_smoothing=0.1)(examples)["labels"]
    torch.testing.assert_close(smoothed, want * 0.9 + 0.01)


def test_mixup_really_mixes():
    seed_all(1)
    examples = _examples(4)
    x = torch.stack([e["pixel_values"] for e in examples])
    batch = D.MixupCollator(10, mixup=1.0, cutmix=0.0, label_smoothing=0.0)(examples)
    lam = batch["labels"][0, 0].item()  # label 0 for example 0, label 3 for its partner (batch flipped)
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(batch["labels"][0, 3], torch.tensor(1 - lam))
    torch.testing.assert_close(batch["pixel_values"][0], lam * x[0] + (1 - lam) * x[3])


@pytest.mark.parametrize("n", [1, 5])
def test_mixup_odd_batch(n):
    seed_all(2)
    examples = _examples(n)
    last = examples[-1]["pixel_values"].clone()
    batch = D.MixupCollator(10, label_smoothing=0.1)(examples)
    labels = batch["labels"]
    assert labels.shape == (n, 10) and labels.dtype == torch.float32
    torch.testing.assert_close(labels.sum(1), torch.ones(n))
    want_last = torch.full((10,), 0.01)
    want_last[examples[-1]["labels"]] = 0.91
    torch.testing.assert_close(labels[-1], want_last)  # the odd one out: unmixed, smoothed one-hot
    assert torch.equal(batch["pixel_values"][-1], last)


def test_train_collator_from_presets():
    assert D.train_collator(RESNET, 10) is D.collate
    assert D.train_collator(None, 10) is D.collate
    collator = D.train_collator(DEIT, 7)
    assert isinstance(collator, D.MixupCollator) and collator.num_classes == 7
    assert collator.mixer.mixup_alpha == 0.8 and collator.mixer.cutmix_alpha == 1.0
    assert collator.mixer.switch_prob == 0.5 and collator.label_smoothing == 0.1


def test_with_transforms_and_pickling():
    images = np.random.default_rng(0).integers(0, 256, (6, 12, 12), dtype=np.uint8)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"])})
    split = Dataset.from_dict({"image": list(images), "label": [0, 1, 2, 0, 1, 2]}, features=features)
    data = DatasetDict(train=split, validation=split)
    train_tf, eval_tf = D.build_transforms(16, 3, HALF, HALF, DEIT)
    pickle.loads(pickle.dumps((train_tf, eval_tf, D.MixupCollator(3))))  # DataLoader workers may pickle them
    data = D.with_transforms(data, train_tf, eval_tf)
    train = D.MixupCollator(3)([data["train"][i] for i in range(6)])
    assert train["pixel_values"].shape == (6, 3, 16, 16) and train["labels"].shape == (6, 3)
    val = D.collate([data["validation"][i] for i in range(4)])
    assert val["labels"].dtype == torch.int64 and val["pixel_values"].shape == (4, 3, 16, 16)


def test_rand_augment_at_full_magnitude_posterizes_to_black_instead_of_failing():
    """timm keeps 0 bits at magnitude 10 ('inc1'); Pillow 13 rejects 0 bits, Pillow < 13 (the official runs)
    returned a black image: mdp_hf keeps the latter."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    tf = D.train_transform(32, 3, [0.5] * 3, [0.5] * 3, {"rand_augment": "rand-m10-inc1"})
    ops = [a for t in tf.transforms for op in getattr(t, "transforms", []) for a in getattr(op, "ops", [])]
    posterize = next(a for a in ops if isinstance(a, AugmentOp) and a.name == "PosterizeIncreasing")
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    posterize.prob, posterize.magnitude_std = 1.0, 0.0
    assert np.asarray(posterize(image)).max() == 0
