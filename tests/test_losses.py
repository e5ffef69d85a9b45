"""MDPLoss: CE / soft-target CE, KL to the dense teacher and hard distillation, as in the official MDP DeiT run."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ResNetConfig,
    ResNetForImageClassification,
)

from mdp_hf.losses import (
    OFFICIAL_KL_WEIGHT,
    OFFICIAL_TEMPERATURE,
    DistillationSettings,
    MDPLoss,
    check_teacher,
    load_teacher,
    student_logits,
)

KW = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_labels=5,
)


def deit(seed=0, distilled=True, **over):
    torch.manual_seed(seed)
    cls = DeiTForImageClassificationWithTeacher if distilled else DeiTForImageClassification
    return cls(DeiTConfig(**{**KW, **over})).eval()


def batch(n=4, seed=1, c=5):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g), "labels": torch.randint(0, c, (n,), generator=g)}


def official_kl(s, t, T):  # KLDivLoss() (reduction 'mean') of log_softmax(s/T) vs softmax(t/T)
    s, t = s.double(), t.double()  # a reference in float64: the KL is tiny between similar models
    p_t = F.softmax(t / T, dim=1)
    return (p_t * (torch.log(p_t) - F.log_softmax(s / T, dim=1))).sum() / s.numel()


def test_official_defaults():
    s = DistillationSettings()
    assert (
        s.teacher is None and s.kl_weight == OFFICIAL_KL_WEIGHT == 1e5 and s.temperature == OFFICIAL_TEMPERATURE == 3.0
    )
    assert s.finetune_temperature == 20.0 and s.distillation_alpha == 0.5 and s.label_smoothing == 0.0
    assert DistillationSettings.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    "field, value",
    [
        ("kl_weight", -1.0),
        ("kl_weight", float("nan")),
        ("temperature", 0.0),
        ("finetune_temperature", -2),
        ("label_smoothing", 1.0),
        ("distillation_alpha", 1.5),
        ("teacher", ""),
        ("hard_distillation", "yes"),
        ("base_logits", "dist"),
        ("hard_teacher", "dense"),
    ],
)
def test_settings_validated_naming_field(field, value):
    kwargs = {"teacher": "dense", field: value} if field != "teacher" else {field: value}
    with pytest.raises(ValueError, match=field):
        DistillationSettings(**kwargs)


def test_student_logits_forms():
    x = torch.randn(2, 5)
    assert student_logits(x) is x
    assert student_logits((x, torch.randn(2, 7, 3))) is x
    y = torch.randn(2, 5)
    assert torch.equal(student_logits((x, y)), (x + y) / 2)  # timm distilled ViT in training
    m = deit()
    out = m(batch()["pixel_values"])
    assert getattr(out, "loss", None) is None  # no loss of its own
    assert torch.allclose(student_logits(out), (out.cls_logits + out.distillation_logits) / 2)


def test_no_teacher_equals_hf_loss():
    model, b = deit(distilled=False), batch()
    loss, out = MDPLoss(DistillationSettings())(model, b)
    ref = model(**b).loss
    assert torch.allclose(loss, ref, atol=1e-6), (loss, ref)
    assert MDPLoss(DistillationSettings()).last_parts == {}
    smoothed, _ = MDPLoss(DistillationSettings(label_smoothing=0.1))(model, b)
    assert torch.allclose(smoothed, F.cross_entropy(out.logits, b["labels"], label_smoothing=0.1), atol=1e-6)


def test_soft_targets_mixup():
    model, b = deit(distilled=False), batch()
    loss_fn = MDPLoss(DistillationSettings())
    onehot = F.one_hot(b["labels"], 5).float()
    hard, out = loss_fn(model, b)
    soft, _ = loss_fn(model, {**b, "labels": onehot})
    assert torch.allclose(hard, soft, atol=1e-6)
    mixed = 0.7 * onehot + 0.3 * onehot.flip(0)
    soft, _ = loss_fn(model, {**b, "labels": mixed})
    ref = -(mixed * F.log_softmax(out.logits, -1)).sum(-1).mean()
    assert torch.allclose(soft, ref, atol=1e-6)


def test_distilled_student_gets_full_official_loss():
    student, teacher, b = deit(0), deit(3), batch()
    with torch.no_grad():  # confident teacher: a KL well above float32 rounding, even at T = 20
        for head in (teacher.cls_classifier, teacher.distillation_classifier):
            head.weight.mul_(30.0)
    loss_fn = MDPLoss(DistillationSettings(teacher="dense"), teacher)
    loss, out = loss_fn(student, b)
    with torch.no_grad():
        t = teacher(b["pixel_values"])
    kl = official_kl(out.logits, t.logits, 3.0)  # mean logits on both sides while pruning
    hard = F.cross_entropy(out.distillation_logits, t.logits.argmax(1))
    ce = F.cross_entropy((out.cls_logits + out.distillation_logits) / 2, b["labels"])
    parts = loss_fn.last_parts
    assert math.isclose(parts["kl"], kl.item(), rel_tol=1e-4) and parts["kl"] > 0
    assert math.isclose(parts["hard"], hard.item(), rel_tol=1e-5)
    assert math.isclose(parts["ce"], ce.item(), rel_tol=1e-5)
    assert torch.allclose(loss.double(), 1e5 * kl + 0.5 * ce + 0.5 * hard, rtol=1e-4)
    assert loss_fn.teacher_seconds > 0
    # fine-tuning: per-head KL at T = 20
    loss_fn.phase = "finetuning"
    loss_fn(student, b)
    ft = (
        official_kl(out.cls_logits, t.cls_logits, 20.0)
        + official_kl(out.distillation_logits, t.distillation_logits, 20.0)
    ) / 2
    assert math.isclose(loss_fn.last_parts["kl"], ft.item(), rel_tol=1e-4)
    # warm-up (before the first pruning step): no KL
    loss_fn.phase = "warmup"
    loss, _ = loss_fn(student, b)
    assert loss_fn.last_parts["kl"] == 0 and torch.allclose(loss, 0.5 * ce + 0.5 * hard, rtol=1e-5)
    with pytest.raises(ValueError, match="phase"):
        loss_fn.phase = "train"


def test_base_on_cls_and_separate_hard_teacher():
    student, teacher, hard_teacher, b = deit(0), deit(3), deit(4, distilled=False), batch()
    s = DistillationSettings(teacher="dense", hard_teacher="some/cnn", base_logits="cls", kl_weight=0.0)
    loss_fn = MDPLoss(s, teacher, hard_teacher)
    loss, out = loss_fn(student, b)
    with torch.no_grad():
        target = hard_teacher(b["pixel_values"]).logits.argmax(1)
    ref = 0.5 * F.cross_entropy(out.cls_logits, b["labels"]) + 0.5 * F.cross_entropy(out.distillation_logits, target)
    assert torch.allclose(loss, ref, rtol=1e-5) and loss_fn.last_parts["kl"] == 0


def test_plain_student_with_teacher_kl_only():
    student, teacher, b = deit(0, distilled=False), deit(3, distilled=False), batch()
    loss_fn = MDPLoss(DistillationSettings(teacher="dense", kl_weight=10.0), teacher)
    loss, out = loss_fn(student, b)
    with torch.no_grad():
        t = teacher(b["pixel_values"]).logits
    ref = 10.0 * official_kl(out.logits, t, 3.0) + F.cross_entropy(out.logits, b["labels"])
    assert torch.allclose(loss.double(), ref, rtol=1e-5) and loss_fn.last_parts["hard"] == 0
    with pytest.raises(ValueError, match="distillation head"):
        MDPLoss(DistillationSettings(teacher="dense", hard_distillation=True), teacher)(student, b)


def test_precomputed_teacher_logits_same_loss():
    student, teacher, b = deit(0), deit(3), batch()
    s = DistillationSettings(teacher="dense")
    ref, _ = MDPLoss(s, teacher)(student, b)
    with torch.no_grad():
        t = teacher(b["pixel_values"])
    fn = MDPLoss(s, teacher=None)
    loss, _ = fn(student, {**b, "teacher_logits": (t.cls_logits, t.distillation_logits)})
    assert torch.allclose(loss, ref, rtol=1e-6) and fn.teacher_seconds == 0
    loss, _ = fn(student, {**b, "teacher_logits": torch.stack([t.cls_logits, t.distillation_logits], 1)})
    assert torch.allclose(loss, ref, rtol=1e-6)
    loss, _ = fn(student, {**b, "teacher_logits": t.logits})  # mean logits suffice while pruning
    assert torch.allclose(loss, ref, rtol=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        fn(student, b)


def test_dense_teacher_is_frozen_hookless_and_disjoint():
    student = deit(0)
    handle = student.deit.layers[0].register_forward_hook(lambda m, i, o: o * 0)
    teacher = load_teacher("dense", student)
    handle.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())
    assert not set(map(id, teacher.parameters())) & set(map(id, student.parameters()))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = batch()["pixel_values"]
    with torch.no_grad():
        assert torch.allclose(teacher(x).logits, student(x).logits)
    student.train()
    loss_fn = MDPLoss(DistillationSettings(teacher="dense"), teacher)
    loss, _ = loss_fn(student, batch())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    student.config.num_labels = 9  # later edits of the student's config do not reach the teacher
    assert teacher.config.num_labels == 5


def test_dense_copy_of_plain_module_clears_hooks():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
    student[1].register_forward_pre_hook(lambda m, i: None)
    teacher = load_teacher("dense", student)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())
    assert not set(map(id, teacher.parameters())) & set(map(id, student.parameters()))
    loss_fn = MDPLoss(DistillationSettings(teacher="dense", kl_weight=1.0), teacher)
    loss, out = loss_fn(student, batch())  # a plain module takes pixel_values positionally
    assert out.shape == (4, 5) and torch.isfinite(loss)


def test_teacher_mismatch_errors(tmp_path):
    student = deit(0)
    deit(1, num_labels=7).save_pretrained(tmp_path / "labels")
    deit(1, image_size=64).save_pretrained(tmp_path / "size")
    with pytest.raises(ValueError, match=r"7 classes.*student 5"):
        load_teacher(str(tmp_path / "labels"), student)
    with pytest.raises(ValueError, match=r"64x64.*32x32"):
        load_teacher(str(tmp_path / "size"), student)
    deit(1, distilled=False).save_pretrained(tmp_path / "ok")
    teacher = load_teacher(str(tmp_path / "ok"), student)
    assert isinstance(teacher, DeiTForImageClassification) and not teacher.training
    fn = MDPLoss.from_settings(DistillationSettings(teacher="dense", hard_teacher=str(tmp_path / "ok")), student)
    assert fn.teacher is not None and fn.hard_teacher is not None


def test_teacher_mismatch_by_output_width():
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
    torch.manual_seed(0)
    resnet = ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=7)
    )
    # ResNet has no image_size and the student no config: the width is compared on a dummy forward
    student.pretrained_cfg = {"input_size": (3, 32, 32)}
    with pytest.raises(ValueError, match=r"7 classes.*student 5"):
        check_teacher(resnet.eval(), student)


def test_bf16_autocast_cpu():
    student, b = deit(0), batch()
    teacher = load_teacher("dense", student)
    student.train()
    loss_fn = MDPLoss(DistillationSettings(teacher="dense"), teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = loss_fn(student, b)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_timm_distilled_student():
    deit_mod = pytest.importorskip("timm.models.deit")
    torch.manual_seed(0)
    student = deit_mod.VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=5
    )
    student.set_distilled_training(True)
    teacher = load_teacher("dense", student.train())
    assert not teacher.training
    b = batch()
    loss_fn = MDPLoss(DistillationSettings(teacher="dense"), teacher)
    loss, (cls, dist) = loss_fn(student, b)  # training: a (cls, dist) pair, called with pixel_values positionally
    with torch.no_grad():
        t = teacher(b["pixel_values"])  # eval: the mean of both heads
    ce = F.cross_entropy((cls + dist) / 2, b["labels"])
    hard = F.cross_entropy(dist, t.argmax(1))
    kl = official_kl((cls + dist) / 2, t, 3.0)
    assert torch.allclose(loss.double(), 1e5 * kl + 0.5 * ce + 0.5 * hard, rtol=1e-4)
