"""MDPTrainer: MDP inside ordinary Hugging Face training, on one process or many.

A few short overrides on top of ``transformers.Trainer`` (as in trl):
- ``__init__`` installs gates and builds the latency terms; a callback accumulates importance after
  every optimizer step and runs the scheduled pruning steps (main rank solves, all ranks apply);
- ``train`` evaluates the dense model first (for the report) and restores pruning state on resume;
- ``save_model`` writes the physically pruned model with its card, report and plot;
- checkpoints carry the pruning state (``on_save``), so ``resume_from_checkpoint`` continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .config import PrunableConfig
from .data import check_dataset, num_labels_of
from .distributed import world_size
from .hub import push_folder_to_hub, render_model_card, save_pruned_model
from .losses import DistillationSettings, MDPLoss
from .pruning import PruningSession, _returns_own_loss, latency_model_for, refuse_meta_model
from .reporting import kept_dims, kept_dims_markdown, latency_breakdown, plot_report
from .surgery import slice_model

logger = logging.getLogger(__name__)

STATE_JSON = "mdp_state.json"
STATE_TENSORS = "mdp_scores.safetensors"
REPORT_NAME = "pruning_report.json"
PLOT_NAME = "pruning_report.png"
LATENCY_TABLE_NAME = "latency_table.json"


class _MDPCallback(TrainerCallback):
    """Accumulate scores before each optimizer step; prune on schedule; save pruning state with checkpoints."""

    def __init__(self, trainer: MDPTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # gradients of the whole (accumulated, rank-averaged) step, unscaled, before the optimizer moves w
        if not self.trainer.mdp.finished:
            self.trainer.mdp.accumulate(self.trainer._gradient_scale())

    def on_step_end(self, args, state, control, **kwargs):
        trainer, session = self.trainer, self.trainer.mdp
        if session.finished:
            return
        steps = trainer.prunable_config.pruning_steps()
        if state.global_step >= steps[len(session.results)]:
            result = session.prune_step()
            trainer.log(result.log_dict())
            logger.info(
                "MDP step %d/%d at step %d: budget %.4g ms, predicted %.4g ms, solver %s %.3fs gap %.2g",
                result.step_index,
                len(steps),
                state.global_step,
                result.budget_ms,
                result.predicted_latency_ms,
                result.backend,
                result.solve_time_s,
                result.gap,
            )
            if session.finished:
                session.gates.freeze()
            trainer._set_loss_phase()

    def on_save(self, args, state, control, **kwargs):
        if not self.trainer.is_world_process_zero():
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            self.trainer._save_pruning_state(folder)


class MDPTrainer(Trainer):
    """``Trainer`` that prunes the model to a latency budget while it trains.

    Args:
        prunable_config: what to prune and to which budget (:class:`PrunableConfig`).
        latency_model: a latency model with ``solver_terms(space)``; by default loaded from
            ``prunable_config.latency_table`` or built for the model on the configured device.
        distillation: the official DeiT loss (:class:`mdp_hf.losses.DistillationSettings`): KL to a frozen
            teacher ("dense": the model before pruning; or a Hub id / folder) and hard distillation of a DeiT
            distillation head; None: the model's own loss (cross-entropy for models without one).
        eval_data_collator: collator for evaluation when it differs from ``data_collator`` (mixup).
        Everything else is passed to ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args,
        prunable_config: PrunableConfig,
        latency_model=None,
        distillation: DistillationSettings | None = None,
        eval_data_collator=None,
        **kwargs,
    ):
        if not isinstance(prunable_config, PrunableConfig):
            raise TypeError(f"prunable_config must be a PrunableConfig, got {type(prunable_config).__name__}")
        if distillation is not None and not isinstance(distillation, DistillationSettings):
            raise TypeError(
                f"distillation must be a mdp_hf.losses.DistillationSettings, got {type(distillation).__name__}"
            )
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:  # refused before Trainer moves the model or training fails mid-way
            refuse_meta_model(model, "MDPTrainer")
            for index, name in ((3, "train_dataset"), (4, "eval_dataset")):
                dataset = kwargs.get(name, args[index] if len(args) > index else None)
                if dataset is not None and not isinstance(dataset, dict):
                    check_dataset(dataset, f"MDPTrainer {name}", num_labels_of(model))
        smoothing = getattr(training_args, "label_smoothing_factor", 0)
        if smoothing and not hasattr(model, "config"):
            # transformers' Trainer reads model.config when label smoothing is on, which a plain module (timm)
            # lacks; such models are trained through MDPLoss, which applies the smoothing itself
            training_args.label_smoothing_factor = 0
        try:
            super().__init__(*args, **kwargs)
        finally:
            if smoothing:
                training_args.label_smoothing_factor = smoothing
        self.prunable_config = prunable_config
        self.eval_data_collator = eval_data_collator  # e.g. without mixup: evaluation sees integer labels
        self._model_has_loss = _returns_own_loss(self.accelerator.unwrap_model(self.model))
        if self.args.label_names is None and not self._model_has_loss:
            self.label_names = ["labels"]  # keep the labels in the batches of a model whose forward takes none
        # the loss: MDPLoss (teacher, soft targets, models without a loss of their own) or the model's own.
        # The teacher is copied/loaded before any gate is installed, lives outside the optimizer and the saves.
        self.mdp_loss: MDPLoss | None = None
        if distillation is not None:
            self.mdp_loss = MDPLoss.from_settings(distillation, self.accelerator.unwrap_model(self.model))
            for teacher in (self.mdp_loss.teacher, self.mdp_loss.hard_teacher):
                if teacher is not None:
                    teacher.to(self.args.device)
        if latency_model is None:
            table_path = os.path.join(self.args.output_dir, LATENCY_TABLE_NAME)
            latency_model = latency_model_for(self.model, prunable_config, table_path)
        self.latency_model = latency_model
        self.mdp = PruningSession(self.model, prunable_config, latency_model)
        self.dense_metrics: dict | None = None
        self.add_callback(_MDPCallback(self))

    # training -------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels") if isinstance(inputs, dict) else None
        soft_targets = torch.is_tensor(labels) and labels.is_floating_point()
        if self.mdp_loss is None and not soft_targets and self._model_has_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.mdp_loss is None:  # mixup/cutmix targets, or a model without a loss (DeiT with its teacher head)
            self.mdp_loss = MDPLoss(DistillationSettings(label_smoothing=self.args.label_smoothing_factor))
            self._set_loss_phase()
        self.loss_is_scaled_for_ga = False  # a per-batch mean: Trainer divides by the accumulation steps
        loss, outputs = self.mdp_loss(model, inputs)
        if return_outputs and not isinstance(outputs, dict):
            # a plain module's logits tensor: Trainer's prediction_step would read outputs[1:] (rows, not fields)
            outputs = {"logits": outputs}
        return (loss, outputs) if return_outputs else loss

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _set_loss_phase(self) -> None:
        """Official schedule: no KL before the first pruning step (the student is the teacher), the pruning
        temperature until the last step, the fine-tuning temperature (per head) after it."""
        if self.mdp_loss is not None:
            self.mdp_loss.phase = "finetuning" if self.mdp.finished else ("pruning" if self.mdp.results else "warmup")

    def _gradient_scale(self) -> float:
        """What this step's gradients were multiplied by before the optimizer sees them: parameter gradients
        are unscaled by Accelerate when the norm is taken, but clipped (coefficient <= 1); gate gradients
        are not parameters, so they still carry the fp16 loss scale."""
        if self.mdp.scores_from_gates:
            scaler = getattr(self.accelerator, "scaler", None)
            return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        return self._clip_coefficient

    _clip_coefficient = 1.0

    def _clip_grad_norm(self, model):
        # remember the clipping factor so that scores are taken from the unclipped gradients (as officially)
        norm = super()._clip_grad_norm(model)
        total = float(norm)
        self._clip_coefficient = min(1.0, self.args.max_grad_norm / (total + 1e-6)) if math.isfinite(total) else 1.0
        return norm

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but no checkpoint found in {self.args.output_dir}")
        if resume_from_checkpoint:
            self._load_pruning_state(resume_from_checkpoint)
        elif self.eval_dataset is not None and self.dense_metrics is None:
            self.dense_metrics = self.evaluate(metric_key_prefix="dense")
        self._set_loss_phase()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # transformers 5.24 writes ViT/DeiT checkpoints with legacy key names (encoder.layer.N...) and
        # Trainer reloads them without converting back, keeping the random weights with only a warning;
        # from_pretrained applies the conversion, so the weights are loaded through it.
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if isinstance(target, PreTrainedModel) and os.path.isfile(
            os.path.join(resume_from_checkpoint, "model.safetensors")
        ):
            loaded = type(target).from_pretrained(resume_from_checkpoint, config=target.config)
            target.load_state_dict(loaded.state_dict(), strict=True)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    # pruning state in checkpoints ------------------------------------------------------------------------------
    def _save_pruning_state(self, folder: str) -> None:
        state = self.mdp.state_dict()
        scores = state.pop("scores")
        tensors = {f"sums/{k}": v for k, v in scores["sums"].items()}
        if scores["ema"] is not None:
            tensors.update({f"ema/{k}": v for k, v in scores["ema"].items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, STATE_TENSORS))
        meta = {
            "results": state["results"],
            "scores": {
                "kind": scores["kind"],
                "ema_decay": scores["ema_decay"],
                "count": scores["count"],
                "has_ema": scores["ema"] is not None,
            },
            "dense_metrics": self.dense_metrics,
            "prunable_config": self.prunable_config.to_dict(),
            "latency_model": getattr(self.latency_model, "describe", lambda: type(self.latency_model).__name__)(),
        }
        with open(os.path.join(folder, STATE_JSON), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1)

    def _load_pruning_state(self, folder: str) -> None:
        json_path, tensor_path = os.path.join(folder, STATE_JSON), os.path.join(folder, STATE_TENSORS)
        if not (os.path.isfile(json_path) and os.path.isfile(tensor_path)):
            raise ValueError(f"{folder} has no MDP pruning state ({STATE_JSON}); it was not written by MDPTrainer")
        earlier = "Resume from an earlier checkpoint (resume_from_checkpoint='<output_dir>/checkpoint-N')"
        try:
            with open(json_path, encoding="utf-8") as handle:
                meta = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{json_path} is damaged ({error}): the pruning state cannot be restored. {earlier}"
            ) from None
        missing = [k for k in ("prunable_config", "scores", "results") if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise ValueError(
                f"{json_path} is damaged (it lacks {missing}): the pruning state cannot be restored. {earlier}"
            )
        try:
            tensors = load_file(tensor_path)
        except Exception as error:  # safetensors raises its own error types for a truncated or corrupt file
            raise ValueError(
                f"{tensor_path} is damaged ({type(error).__name__}: {error}): the importance scores cannot be "
                f"restored. {earlier}"
            ) from None
        if meta["prunable_config"] != self.prunable_config.to_dict():
            raise ValueError(
                f"the checkpoint in {folder} was made with a different PrunableConfig; resume with the same one"
            )
        score_meta = meta["scores"]
        scores = {
            "kind": score_meta["kind"],
            "ema_decay": score_meta["ema_decay"],
            "count": score_meta["count"],
            "sums": {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("sums/")},
            "ema": {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("ema/")}
            if score_meta["has_ema"]
            else None,
        }
        self.mdp.load_state_dict({"scores": scores, "results": meta["results"]})
        if self.mdp.finished:
            self.mdp.gates.freeze()
        self.dense_metrics = meta.get("dense_metrics")

    # export ---------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (internal calls) keep full shapes; a user's call writes the physically pruned model."""
        if _internal_call or self.mdp.choice is None:
            if not _internal_call:
                logger.warning("save_model before the first pruning step: saving the dense model")
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        pruned_metrics = self.evaluate(metric_key_prefix="pruned") if self.eval_dataset is not None else None
        if self.is_world_process_zero():
            self.export_pruned(output_dir, pruned_metrics)
        self.accelerator.wait_for_everyone()

    def export_pruned(self, output_dir: str, pruned_metrics: dict | None = None) -> dict:
        """Slice, measure, and write the pruned model folder (main process only). Returns the report."""
        from .latency import TimingSettings, measure_latencies

        session, config = self.mdp, self.prunable_config
        model = self.accelerator.unwrap_model(self.model)
        pruned = session.export()
        if hasattr(model, "config"):  # a clean copy (no gates): latency does not depend on weight values
            dense = type(model)(model.config)
        else:  # a plain module (timm): the dense model in the pruned format, sliced without gates
            dense = slice_model(model, session.space, session.space.full_choice())
        # the table's own protocol and settings, dense and pruned interleaved in one process: comparable
        metadata = self.latency_model.table.metadata
        settings = TimingSettings(**{**metadata["timing"], "repeats": max(30, metadata["timing"]["repeats"])})
        dense_ms, pruned_ms = (m.ms for m in measure_latencies([dense, pruned], settings))
        result = session.results[-1]
        report = {
            "budget_ms": result.budget_ms,
            "dense_latency_ms": dense_ms,
            "pruned_latency_ms": pruned_ms,
            "predicted_latency_ms": result.predicted_latency_ms,
            "dense_predicted_latency_ms": session.dense_predicted_ms,
            "dense_params": sum(p.numel() for p in dense.parameters()),
            "pruned_params": sum(p.numel() for p in pruned.parameters()),
            "device": settings.device,
            "device_name": metadata.get("device_name"),
            "batch_size": settings.batch_size,
            "image_size": metadata.get("image_size", settings.image_size),
            "dtype": settings.dtype,
            "num_threads": settings.threads,
            "latency_statistic": settings.statistic,
            "latency_repeats": settings.repeats,
            "dense_accuracy": _accuracy(self.dense_metrics),
            "pruned_accuracy": _accuracy(pruned_metrics),
            "world_size": world_size(),
            "base_model": source_name(model),
            "preprocessing": getattr(pruned.config, "preprocessing", None),
            "latency_model": config.latency_model,
            "distillation": None
            if self.mdp_loss is None
            else {
                **self.mdp_loss.settings.to_dict(),
                "teacher_forward_s": self.mdp_loss.teacher_seconds,
            },
            "solver": {
                k: getattr(result, k) for k in ("backend", "status", "gap", "objective", "bound", "solve_time_s")
            },
            "pruning_steps": [r.log_dict() for r in session.results],
            "kept_dims": kept_dims(session.space, result.choice),
            "removed_blocks": result.choice.removed_blocks,
            "latency_breakdown_predicted_ms": latency_breakdown(session.space, result.choice, session.latency_terms),
        }
        report = _jsonable(report)
        os.makedirs(output_dir, exist_ok=True)
        plot_path = os.path.join(output_dir, PLOT_NAME)
        card = render_model_card(
            report, kept_dims_markdown(session.space, result.choice), repo_or_path=self.args.hub_model_id or output_dir
        )
        processor = self.processing_class if hasattr(self.processing_class, "image_mean") else None
        save_pruned_model(
            pruned,
            output_dir,
            image_processor=processor,
            extra_files={
                REPORT_NAME: json.dumps(report, indent=1),
                "pruning_config.json": config.to_json_string(),
                "README.md": card,
            },
        )
        plot_report(
            plot_path, session.space, result.choice, session.latency_terms, title=f"MDP: {report['base_model']}"
        )
        return report

    def push_to_hub(self, commit_message: str | None = "MDP pruned model", **kwargs) -> str:
        """Upload the pruned model folder (not the dense checkpoint that Trainer.push_to_hub would save)."""
        self.save_model(self.args.output_dir)
        if not self.is_world_process_zero():
            return ""
        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        return push_folder_to_hub(
            self.args.output_dir,
            repo_id,
            token=self.args.hub_token,
            private=self.args.hub_private_repo,
            commit_message=commit_message,
        )


def source_name(model) -> str:
    """What a model was loaded from: its Hub id / folder, else its type (timm: hub id or architecture)."""
    config = getattr(model, "config", None)
    if config is not None:
        return config.name_or_path or config.model_type
    timm_cfg = getattr(model, "pretrained_cfg", None) or {}
    return timm_cfg.get("hf_hub_id") or timm_cfg.get("architecture") or type(model).__name__


def _accuracy(metrics: dict | None):
    if not metrics:
        return None
    for key, value in metrics.items():
        if key.endswith("_accuracy"):
            return float(value)
    return None


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
