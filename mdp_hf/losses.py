"""The loss MDPTrainer optimises while importance scores accumulate and while it fine-tunes.

Official definition (NVlabs/MDP, commit 975f7c7, DeiT-B run ``deit/prune_ngc_ours.sh`` "Final V0.1",
lines 27-28, and fine-tuning ``deit/finetune_ngc_ours.sh`` line 3)::

    loss = kl_weight * KL_T(student, dense)  +  1.0 * [ (1 - a) * base(s_avg, y)  +  a * CE(s_dist, argmax t_hard) ]

- ``kl_weight`` = 1e5 (``--kl_loss_coeff=100000``; parser default 1000), the bracket's weight 1.0
  (``--original_loss_coeff=1.0``); combined in ``deit/engine.py`` line 252 (pruning) / 54 (fine-tuning).
- ``KL_T`` is ``Knowledge_Distillation_Loss`` (``deit/main_full_global_latency.py`` lines 343-353,
  same class in ``deit/finetune_dense.py`` lines 244-254): ``torch.nn.KLDivLoss()`` with its default
  ``reduction='mean'`` on ``log_softmax(s / T)`` against ``softmax(t / T)``, i.e.
  ``sum(p_t * (log p_t - log p_s)) / (N * C)`` -- divided by batch size *and* number of classes, with no
  ``T**2`` factor. So 1e5 * KL equals 100 * the 'batchmean' KL on ImageNet's 1000 classes.
  T = 3 while pruning (class default, ``main_full_global_latency.py`` line 622), T = 20 while fine-tuning
  (``--distillation-tau 20.0`` passed to it in ``finetune_dense.py`` line 591).
- The KL teacher is the dense pretrained model itself, in eval mode (``teacher_model = create_model(args.model,
  pretrained=...)``, ``main_full_global_latency.py`` line 458 with ``--pretrained``; ``finetune_dense.py`` line 351).
  While pruning, both sides are the mean of the cls and distillation logits (``engine.py`` lines 238, 245);
  while fine-tuning, the KL is the mean of a per-head KL (cls vs cls, dist vs dist; ``engine.py`` line 47).
  While pruning, the KL weight is 0 until the first pruning step (before it the student *is* the teacher;
  ``engine.py`` lines 184-185, restored at 281 when the student is switched to eval mode).
- The bracket is DeiT's ``DistillationLoss`` (``deit/losses.py`` lines 23-63) with ``distillation_type
  'hard'`` and ``alpha = 0.5`` (``--distillation-alpha`` default, ``main_full_global_latency.py`` line 161):
  ``base`` is applied to the *mean* of cls and distillation logits (``losses.py`` lines 36-37 -- a change
  from facebookresearch/deit, which applies it to the cls logits only), the hard term is
  ``F.cross_entropy(dist_logits, teacher.argmax(1))`` without smoothing (line 60), combined
  ``base * (1 - alpha) + hard * alpha`` (line 62); ``tau`` is unused for 'hard'. With no distillation
  (``'none'``) the bracket is ``base`` alone, with weight 1 (line 39).
  The hard-distillation teacher is a separate CNN, RegNetY-160 (``--teacher-model regnety_160``,
  ``main_full_global_latency.py`` lines 157-159, 567-583), not the dense model.
- ``base`` is ``SoftTargetCrossEntropy`` under mixup/cutmix (mixup 0.8 on by default; label smoothing
  0.1 folded into the mixed targets), else label-smoothed CE (``main_full_global_latency.py`` 555-563).

Here: ``DistillationSettings.teacher`` is the KL teacher ("dense" by default in the recipes),
``hard_teacher`` the hard-distillation teacher (``None`` = the same module). ``MDPLoss.phase`` selects
"warmup" (KL off, before the first pruning step), "pruning" (KL on mean logits, ``temperature``) or
"finetuning" (per-head KL, ``finetune_temperature``); the trainer sets it.

Deliberate differences:
- ``label_smoothing`` defaults to 0.0 (official 0.1) so that without a teacher the loss equals the HF
  model's own ``outputs.loss``; float (mixup) targets are used as given (smoothing is already in them).
- ``base_logits="cls"`` reproduces original DeiT; the default "mean" is the official MDP code.
- The KL is computed as ``kl_div(..., reduction='sum', log_target=True) / numel`` in float32: the same
  value as ``KLDivLoss()`` (which warns about 'mean') and more stable under bf16/fp16.
- A student without a distillation head gets ``kl_weight * KL + base`` (official code requires the head).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

OFFICIAL_KL_WEIGHT = 1e5  # prune_ngc_ours.sh / finetune_ngc_ours.sh --kl_loss_coeff=100000
OFFICIAL_TEMPERATURE = 3.0  # Knowledge_Distillation_Loss(T=3) while pruning
OFFICIAL_FINETUNE_TEMPERATURE = 20.0  # --distillation-tau 20.0 -> Knowledge_Distillation_Loss(T=tau) in fine-tuning
OFFICIAL_DISTILLATION_ALPHA = 0.5  # DistillationLoss alpha (--distillation-alpha default)

PHASES = ("warmup", "pruning", "finetuning")
TEACHER_LOGITS_KEY = "teacher_logits"
HARD_TEACHER_LOGITS_KEY = "hard_teacher_logits"


# ---------------------------------------------------------------------------------------------------------
# logits of any model
def _distillation_pair(outputs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cls_logits, distillation_logits) if ``outputs`` carry a distillation head, else None."""
    cls = getattr(outputs, "cls_logits", None)
    dist = getattr(outputs, "distillation_logits", None)
    if isinstance(cls, torch.Tensor) and isinstance(dist, torch.Tensor):
        return cls, dist
    if (
        isinstance(outputs, (tuple, list))
        and not hasattr(outputs, "keys")
        and len(outputs) == 2
        and all(isinstance(t, torch.Tensor) for t in outputs)
        and outputs[0].shape == outputs[1].shape
        and outputs[0].dim() == 2
    ):  # timm's distilled ViTs in training mode, and the official DeiT models, return (x, x_dist)
        return outputs[0], outputs[1]
    return None


def student_logits(outputs) -> torch.Tensor:
    """The classification logits of a model's outputs.

    HF outputs -> ``.logits`` (for ``DeiTForImageClassificationWithTeacher`` the mean of cls and
    distillation logits); a plain tensor (timm) -> itself; a ``(cls, dist)`` pair of equal-shaped 2-D
    tensors (timm distilled ViTs in training) -> their mean, as DeiT evaluates; another tuple -> its first
    element (HF ``return_dict=False``).
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    pair = _distillation_pair(outputs)
    if pair is not None:
        return (pair[0] + pair[1]) / 2
    if isinstance(outputs, dict) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"cannot find logits in model outputs of type {type(outputs).__name__}")


def _as_teacher_output(value):
    """Precomputed teacher logits: a tensor (N, C) or a (cls, dist) pair (list/tuple, or tensor (N, 2, C))."""
    if isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[1] == 2:
        return (value[:, 0], value[:, 1])
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return value


# ---------------------------------------------------------------------------------------------------------
# settings
@dataclass
class DistillationSettings:
    """How MDPLoss distils (defaults: the official MDP DeiT run, see the module docstring)."""

    teacher: str | None = (
        None  # None: no distillation; "dense": frozen copy of the student before pruning; or a Hub id / local folder
    )
    kl_weight: float = OFFICIAL_KL_WEIGHT  # weight of KL(teacher || student); official 1e5 (KL averaged over N*C)
    temperature: float = OFFICIAL_TEMPERATURE  # KL temperature while scores accumulate (official 3; no T^2 factor)
    finetune_temperature: float = OFFICIAL_FINETUNE_TEMPERATURE  # KL temperature while fine-tuning (official 20)
    hard_distillation: bool | None = (
        None  # distillation head vs teacher argmax; None: on iff the student has a distillation head
    )
    hard_teacher: str | None = (
        None  # teacher for hard distillation (official: RegNetY-160); None: the same as `teacher`
    )
    distillation_alpha: float = OFFICIAL_DISTILLATION_ALPHA  # (1 - a) * base + a * hard (official 0.5)
    label_smoothing: float = 0.0  # smoothing of the CE on integer labels (official 0.1; float/mixup targets unchanged)
    base_logits: str = (
        "mean"  # logits the base CE sees with a distillation head: "mean" (official MDP) or "cls" (original DeiT)
    )

    def __post_init__(self):
        for name in ("teacher", "hard_teacher"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(
                    f"DistillationSettings.{name} must be None, 'dense', or a Hub id / local folder, got {value!r}"
                )
        if self.hard_teacher == "dense":
            raise ValueError(
                "DistillationSettings.hard_teacher='dense' is the default already: leave it None "
                "(hard distillation then uses `teacher`)"
            )
        for name, low_ok in (("kl_weight", True), ("temperature", False), ("finetune_temperature", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"DistillationSettings.{name} must be a finite number, got {value!r}")
            if value < 0 or (value == 0 and not low_ok):
                bound = ">= 0" if low_ok else "> 0"
                raise ValueError(f"DistillationSettings.{name} must be {bound}, got {value!r}")
        if self.hard_distillation is not None and not isinstance(self.hard_distillation, bool):
            raise ValueError(
                f"DistillationSettings.hard_distillation must be True, False or None (auto), got {self.hard_distillation!r}"
            )
        if self.hard_distillation and self.teacher is None and self.hard_teacher is None:
            raise ValueError(
                "DistillationSettings.hard_distillation=True needs a teacher: set `teacher` or `hard_teacher`"
            )
        a = self.distillation_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"DistillationSettings.distillation_alpha must be in [0, 1], got {a!r}")
        s = self.label_smoothing
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ValueError(f"DistillationSettings.label_smoothing must be in [0, 1), got {s!r}")
        if self.base_logits not in ("mean", "cls"):
            raise ValueError(f"DistillationSettings.base_logits must be 'mean' or 'cls', got {self.base_logits!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillationSettings:
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------
# teachers
def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel
        model = model.module
    return model


def _clear_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for name in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_state_dict_hooks",
            "_state_dict_pre_hooks",
            "_load_state_dict_pre_hooks",
            "_load_state_dict_post_hooks",
        ):
            hooks = getattr(module, name, None)
            if hooks is not None and hasattr(hooks, "clear"):
                hooks.clear()


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _first_param(model: nn.Module) -> torch.Tensor | None:
    for p in model.parameters():
        return p
    return None


def _freeze(teacher: nn.Module) -> nn.Module:
    teacher.requires_grad_(False)
    return teacher.eval()


def _dense_copy(student: nn.Module) -> nn.Module:
    from transformers import PreTrainedModel

    if _has_hooks(student):
        logger.warning(
            "load_teacher('dense'): the student already has forward hooks (gates?); the teacher is "
            "rebuilt without them. Load the teacher before installing gates."
        )
    ref = _first_param(student)
    teacher = None
    if isinstance(student, PreTrainedModel):  # rebuilt: no hooks, no shared tensors, its own config
        try:
            teacher = type(student)(copy.deepcopy(student.config))  # slicing edits the student's config later
            teacher.load_state_dict(student.state_dict(), strict=True)
        except (TypeError, RuntimeError, ValueError) as err:  # e.g. extra constructor arguments
            logger.info(
                "load_teacher('dense'): rebuilding %s failed (%s); deep-copying it", type(student).__name__, err
            )
            teacher = None
    if teacher is None:
        teacher = copy.deepcopy(student)
        _clear_hooks(teacher)
    if ref is not None:
        teacher.to(device=ref.device, dtype=ref.dtype)
    return teacher


def _num_labels(model) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None) is not None:
        id2label = getattr(config, "id2label", None)
        return len(id2label) if id2label else int(config.num_labels)
    for name in ("num_classes", "num_labels"):  # timm
        value = getattr(model, name, None)
        if isinstance(value, int):
            return value
    return None


def _input_size(model) -> tuple[int | None, tuple[int, int] | None]:
    """(num_channels, (H, W)) from an HF config or a timm pretrained_cfg, None where unknown."""
    config = getattr(model, "config", None)
    channels = size = None
    if config is not None:
        channels = getattr(config, "num_channels", None)
        size = getattr(config, "image_size", None)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size") is not None and (channels is None or size is None):
        c, h, w = cfg["input_size"]
        channels = channels if channels is not None else c
        size = size if size is not None else (h, w)
    if isinstance(size, int):
        size = (size, size)
    elif size is not None:
        size = tuple(int(v) for v in size)
    return channels, size


def _call_model(model: nn.Module, pixel_values: torch.Tensor, extra: dict | None = None):
    target = _unwrap(model)
    try:
        params = inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "pixel_values" in params:
        return model(pixel_values=pixel_values, **(extra or {}))
    return model(pixel_values)


def _output_width(model: nn.Module, channels: int, size: tuple[int, int]) -> int:
    ref = _first_param(model)
    x = torch.zeros(
        1,
        channels,
        *size,
        device=ref.device if ref is not None else "cpu",
        dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.float32,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(student_logits(_call_model(model, x)).shape[-1])
    finally:
        model.train(was_training)


def check_teacher(teacher: nn.Module, student: nn.Module, name: str = "teacher") -> None:
    """Raise ValueError if ``teacher`` cannot teach ``student``: different label space or input size."""
    t_ch, t_size = _input_size(teacher)
    s_ch, s_size = _input_size(student)
    if t_size is not None and s_size is not None and t_size != s_size:
        raise ValueError(
            f"{name} expects images of {t_size[0]}x{t_size[1]} but the student {s_size[0]}x{s_size[1]}: "
            "pick a teacher trained at the student's resolution (or resize the student's inputs and config)"
        )
    if t_ch is not None and s_ch is not None and t_ch != s_ch:
        raise ValueError(
            f"{name} expects {t_ch} input channels but the student {s_ch}: pick a teacher with {s_ch} channels"
        )
    t_labels, s_labels = _num_labels(teacher), _num_labels(student)
    if t_labels is None or s_labels is None:  # timm or custom: look at the output width
        channels = s_ch or t_ch or 3
        size = s_size or t_size or (224, 224)
        t_labels, s_labels = _output_width(teacher, channels, size), _output_width(student, channels, size)
    if t_labels != s_labels:
        raise ValueError(
            f"{name} predicts {t_labels} classes but the student {s_labels}: use a teacher fine-tuned on the "
            "student's label set (same num_labels / id2label), or teacher='dense'"
        )
    t_map = getattr(getattr(teacher, "config", None), "id2label", None)
    s_map = getattr(getattr(student, "config", None), "id2label", None)
    generic = lambda m: all(str(v) == f"LABEL_{k}" for k, v in m.items())  # noqa: E731
    if t_map and s_map and not generic(t_map) and not generic(s_map) and dict(t_map) != dict(s_map):
        logger.warning(
            "%s and student name their %d labels differently; check they are in the same order", name, s_labels
        )


def load_teacher(spec: str, student: nn.Module, **hub_kwargs) -> nn.Module:
    """A frozen teacher (``requires_grad`` False, eval mode) for ``student``, checked against it.

    ``spec``: "dense" -> a copy of the student as it is now (call before gates are installed; the copy has
    no hooks and shares no parameters); otherwise a Hub id or local folder loaded with
    ``AutoModelForImageClassification.from_pretrained(spec, **hub_kwargs)``. Raises ValueError if the
    teacher's label space or input size differs from the student's.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"teacher must be 'dense' or a Hub id / local folder, got {spec!r}")
    student = _unwrap(student)
    if spec == "dense":
        teacher = _dense_copy(student)
    else:
        from transformers import AutoModelForImageClassification

        from .paths import check_local_path

        check_local_path(spec, "teacher model folder")
        teacher = AutoModelForImageClassification.from_pretrained(spec, **hub_kwargs)
        check_teacher(teacher, student, name=f"teacher {spec!r}")
        ref = _first_param(student)
        if ref is not None:
            teacher.to(ref.device)
    return _freeze(teacher)


# ---------------------------------------------------------------------------------------------------------
# the loss
def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE against probability targets (mixup / cutmix), as timm's SoftTargetCrossEntropy."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Official KL: ``KLDivLoss()(log_softmax(s/T), softmax(t/T))`` = sum p_t (log p_t - log p_s) / (N * C)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="sum", log_target=True) / s.numel()


class _Timer:
    """Wall time of teacher forwards; on CUDA with events, resolved only when read (no per-step sync)."""

    def __init__(self):
        self.seconds = 0.0
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def total(self) -> float:
        if self.pending:
            for start, end in self.pending:
                end.synchronize()
                self.seconds += start.elapsed_time(end) / 1000.0
            self.pending.clear()
        return self.seconds


class MDPLoss:
    """``loss, outputs = MDPLoss(settings, teacher)(model, inputs)``.

    ``inputs``: a dict with ``pixel_values``, ``labels`` (integer (N,) or float (N, C) mixup targets)
    and optionally precomputed
    ``teacher_logits`` / ``hard_teacher_logits`` (a tensor (N, C), or a (cls, dist) pair) used instead
    of running the teachers. Other keys are passed to an HF model. Labels are not passed to the model.

    After each call: ``last_parts`` (floats: "ce", "kl", "hard", "loss"; unweighted parts, ``loss`` the
    total) and ``teacher_seconds`` (accumulated wall time of teacher forwards). ``phase`` ("warmup",
    "pruning", "finetuning") is set by the trainer; see the module docstring.
    """

    def __init__(
        self,
        settings: DistillationSettings | None = None,
        teacher: nn.Module | None = None,
        hard_teacher: nn.Module | None = None,
        phase: str = "pruning",
    ):
        self.settings = settings if settings is not None else DistillationSettings()
        if not isinstance(self.settings, DistillationSettings):
            raise TypeError(f"settings must be a DistillationSettings, got {type(self.settings).__name__}")
        if teacher is not None and self.settings.teacher is None:
            raise ValueError(
                "a teacher module was given but DistillationSettings.teacher is None; set it "
                "(e.g. 'dense') or pass no teacher"
            )
        self.teacher = _freeze(teacher) if teacher is not None else None
        self.hard_teacher = _freeze(hard_teacher) if hard_teacher is not None else None
        self.phase = phase
        self._timer = _Timer()
        self._parts: dict[str, torch.Tensor] = {}

    @classmethod
    def from_settings(
        cls, settings: DistillationSettings, student: nn.Module, phase: str = "pruning", **hub_kwargs
    ) -> MDPLoss:
        """Load the teachers the settings name (call before gates are installed on ``student``)."""
        teacher = load_teacher(settings.teacher, student, **hub_kwargs) if settings.teacher else None
        hard = load_teacher(settings.hard_teacher, student, **hub_kwargs) if settings.hard_teacher else None
        return cls(settings, teacher, hard, phase=phase)

    # state --------------------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if value not in PHASES:
            raise ValueError(f"MDPLoss.phase must be one of {PHASES}, got {value!r}")
        self._phase = value

    @property
    def last_parts(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._parts.items()}

    @property
    def teacher_seconds(self) -> float:
        return self._timer.total()

    def reset_teacher_seconds(self) -> None:
        self._timer.total()
        self._timer.seconds = 0.0

    # teachers -------------------------------------------------------------------------------------------
    def _run_teacher(self, teacher: nn.Module, pixel_values: torch.Tensor, student_ref: torch.Tensor | None):
        ref = _first_param(teacher)
        if (
            ref is not None
            and student_ref is not None
            and (ref.device != student_ref.device or (ref.is_floating_point() and ref.dtype != student_ref.dtype))
        ):  # follow the student to its device and training dtype (once)
            teacher.to(device=student_ref.device, dtype=student_ref.dtype)
        if teacher.training:
            teacher.eval()
        cuda = pixel_values.is_cuda
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        with torch.no_grad():  # inside the caller's autocast, if any
            out = _call_model(teacher, pixel_values)
        pair = _distillation_pair(out)
        result = (pair[0].float(), pair[1].float()) if pair is not None else student_logits(out).float()
        if cuda:
            end.record()
            self._timer.pending.append((start, end))
        else:
            self._timer.seconds += time.perf_counter() - t0
        return result

    def _teacher_output(self, inputs: dict, key: str, module: nn.Module | None, pixel_values, student_ref, what: str):
        if key in inputs and inputs[key] is not None:
            value = _as_teacher_output(inputs[key])
            if isinstance(value, tuple):
                return tuple(v.detach().float() for v in value)
            return value.detach().float()
        if module is None:
            raise ValueError(
                f"{what} is set in DistillationSettings but MDPLoss has no {what} module and the batch "
                f"has no '{key}': build the loss with MDPLoss.from_settings(settings, student)"
            )
        return self._run_teacher(module, pixel_values, student_ref)

    # the loss -------------------------------------------------------------------------------------------
    def _base(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if labels.is_floating_point():
            if labels.shape != logits.shape:
                raise ValueError(
                    f"float labels must be (N, C) targets of shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
                )
            return soft_target_cross_entropy(logits, labels.float())
        return F.cross_entropy(logits, labels.view(-1).to(logits.device), label_smoothing=self.settings.label_smoothing)

    def __call__(self, model: nn.Module, inputs: dict, return_outputs: bool = True):
        s = self.settings
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        teacher_logits = inputs.pop(TEACHER_LOGITS_KEY, None)
        hard_logits = inputs.pop(HARD_TEACHER_LOGITS_KEY, None)
        pixel_values = inputs.pop("pixel_values")
        precomputed = {TEACHER_LOGITS_KEY: teacher_logits, HARD_TEACHER_LOGITS_KEY: hard_logits}

        outputs = _call_model(model, pixel_values, inputs)
        pair = _distillation_pair(outputs)
        logits = student_logits(outputs)
        student_ref = _first_param(_unwrap(model))
        zero = logits.new_zeros((), dtype=torch.float32)

        # base (+ hard distillation) -- DeiT's DistillationLoss
        if labels is None:
            raise ValueError("MDPLoss needs 'labels' in the batch")
        base_input = pair[0] if (pair is not None and s.base_logits == "cls") else logits  # logits: the mean
        ce = self._base(base_input, labels)
        hard_on = (
            s.hard_distillation
            if s.hard_distillation is not None
            else (pair is not None and (s.teacher is not None or s.hard_teacher is not None))
        )
        if hard_on and pair is None:
            raise ValueError(
                "DistillationSettings.hard_distillation=True but the student has no distillation head "
                "(cls_logits + distillation_logits); set hard_distillation=None or False"
            )

        kl_teacher_out = None
        need_kl = s.teacher is not None and s.kl_weight > 0 and self.phase != "warmup"
        if need_kl or (hard_on and s.hard_teacher is None):
            kl_teacher_out = self._teacher_output(
                precomputed, TEACHER_LOGITS_KEY, self.teacher, pixel_values, student_ref, "teacher"
            )

        hard = zero
        if hard_on:
            if s.hard_teacher is not None:
                hard_out = self._teacher_output(
                    precomputed, HARD_TEACHER_LOGITS_KEY, self.hard_teacher, pixel_values, student_ref, "hard_teacher"
                )
            else:
                hard_out = kl_teacher_out
            hard_target = _mean_logits(hard_out).argmax(dim=-1)
            hard = F.cross_entropy(pair[1].float(), hard_target)
            supervised = ce * (1 - s.distillation_alpha) + hard * s.distillation_alpha
        else:
            supervised = ce

        # KL to the dense teacher
        kl = zero
        if need_kl:
            t_pair = kl_teacher_out if isinstance(kl_teacher_out, tuple) else None
            if self.phase == "finetuning" and pair is not None and t_pair is not None:
                T = s.finetune_temperature
                kl = (kl_to_teacher(pair[0], t_pair[0], T) + kl_to_teacher(pair[1], t_pair[1], T)) / 2
            else:
                T = s.finetune_temperature if self.phase == "finetuning" else s.temperature
                kl = kl_to_teacher(logits, _mean_logits(kl_teacher_out), T)
            loss = s.kl_weight * kl + supervised
        else:
            loss = supervised

        self._parts = {"ce": ce.detach(), "kl": kl.detach(), "hard": hard.detach(), "loss": loss.detach()}
        return (loss, outputs) if return_outputs else loss


def _mean_logits(out) -> torch.Tensor:
    return (out[0] + out[1]) / 2 if isinstance(out, tuple) else out
