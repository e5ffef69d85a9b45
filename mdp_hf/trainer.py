"""MDPTrainer: MDP inside ordinary Hugging Face training, on one process or many.

A few short overrides on top of ``transformers.Trainer`` (as in trl):
- ``__init__`` installs gates and builds the latency terms; a callback accumulates importance after
  every optimizer step and runs the scheduled pruning steps (main rank solves, all ranks apply);
- ``train`` evaluates the dense model first (for the report, once the loggers are set up) and restores pruning
  state on resume;
- ``save_model`` writes the physically pruned model with its card, report, plot and image processor, once per
  state, and refuses before the schedule has finished; ``push_to_hub`` uploads that folder;
  ``create_model_card`` merges into its card;
- checkpoints carry the pruning state, written into the checkpoint folder before Trainer's own files (its
  ``trainer_state.json``, written last, marks a checkpoint complete), so ``resume_from_checkpoint`` continues
  exactly and an interrupted save is never mistaken for a complete one; only checkpoints with the final structure
  compete for ``load_best_model_at_end``, and none is pushed to the Hub.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapters.registry import task_of, task_of_architecture
from .config import PrunableConfig
from .data import check_dataset, num_labels_of
from .distributed import use_cpu_ranks_without_gpu, world_size
from .hub import _as_list, hub_repo_id, model_card, push_folder_to_hub, save_pruned_model
from .latency_check import (
    budget_of,
    dense_reference,
    read_against_dense,
    table_timer,
    unverifiable_reason,
    verification_settings,
)
from .losses import DistillationSettings, MDPLoss
from .optimizer_state import OptimizerNotSliceable, check_sliceable, slice_optimizer_
from .pruning import PruningSession, _returns_own_loss, latency_model_for, refuse_meta_model
from .reporting import kept_dims, latency_breakdown, plot_report
from .surgery import NotASelectionError

logger = logging.getLogger(__name__)

STATE_JSON = "mdp_state.json"
STATE_TENSORS = "mdp_scores.safetensors"
REPORT_NAME = "pruning_report.json"
PLOT_NAME = "pruning_report.png"
LATENCY_TABLE_NAME = "latency_table.json"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers writes it last into a checkpoint


def check_schedule_fits(config: PrunableConfig, total_steps: int, source: str) -> None:
    """Refuse a run whose ``total_steps`` optimizer steps end before the pruning schedule's last step: it would
    export a dense or partly pruned model as the result. ``source`` says where the step count comes from."""
    steps = config.pruning_steps()
    if total_steps >= steps[-1]:
        return
    if len(steps) == 1:
        when = (
            f"prunes once, at optimizer step {steps[0]} (PrunableConfig.accumulation_steps={config.accumulation_steps})"
        )
    else:
        when = (
            f"prunes last at optimizer step {steps[-1]} (PrunableConfig.accumulation_steps={config.accumulation_steps}"
            f" + (num_pruning_steps={config.num_pruning_steps} - 1) x pruning_interval={config.pruning_interval})"
        )
    raise ValueError(
        f"the pruning schedule cannot finish within this run: it {when}, but the run has only {total_steps} "
        f"optimizer steps ({source}), so a dense or partly pruned model would be the result. Raise "
        f"TrainingArguments.max_steps (or num_train_epochs) to at least {steps[-1]} steps, or lower "
        "PrunableConfig.accumulation_steps, pruning_interval or num_pruning_steps."
    )


def planned_optimizer_steps(args, num_samples: int, world: int = 1) -> int:
    """The optimizer steps ``args`` gives on ``num_samples`` training samples over ``world`` processes (Trainer's
    own count: max_steps, else epochs x ceil(batches per process / gradient accumulation))."""
    if args.max_steps > 0:
        return args.max_steps
    batch = args.per_device_train_batch_size
    batches = num_samples // batch if args.dataloader_drop_last else math.ceil(num_samples / batch)
    per_process = math.ceil(batches / max(world, 1))
    per_epoch = max(math.ceil(per_process / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def checkpoint_missing(folder: str) -> list[str]:
    """What a complete MDPTrainer checkpoint has and ``folder`` lacks: the pruning state (written first), the
    model weights, and Trainer's trainer_state.json (written last)."""
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    missing = [name for name in (STATE_JSON, STATE_TENSORS, TRAINER_STATE_NAME) if name not in names]
    if not any(n.startswith(("model", "pytorch_model", "adapter_model", "global_step")) for n in names):
        missing.append("model weights (model.safetensors)")
    return missing


def complete_checkpoints(output_dir: str) -> tuple[list[str], dict[str, list[str]]]:
    """(complete checkpoint folders in ``output_dir``, newest first; {incomplete folder: what it lacks})."""
    if not os.path.isdir(output_dir):
        return [], {}
    found = []
    for name in os.listdir(output_dir):
        step = name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if (
            name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
            and step.isdigit()
            and os.path.isdir(os.path.join(output_dir, name))
        ):
            found.append((int(step), os.path.join(output_dir, name)))
    complete, incomplete = [], {}
    for _, folder in sorted(found, reverse=True):
        missing = checkpoint_missing(folder)
        if missing:
            incomplete[folder] = missing
        else:
            complete.append(folder)
    return complete, incomplete


# A user's script under `accelerate launch` / torchrun (several processes, no GPU) creates its TrainingArguments
# after its imports: let them set up CPU ranks (gloo) instead of one independent single-process run per rank.
use_cpu_ranks_without_gpu()


class _MDPCallback(TrainerCallback):
    """Accumulate scores before each optimizer step; prune on schedule."""

    def __init__(self, trainer: MDPTrainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        # Trainer's loop zeroes the gradients of the model it started with after each optimizer step; after slicing
        # the live model's are zeroed here, before the step's first micro-batch
        if self.trainer._sliced:
            self.trainer.model_wrapped.zero_grad()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # gradients of the whole (accumulated, rank-averaged) step, unscaled, before the optimizer moves w; on the
        # sliced model they are read in the gated model's coordinates (its entries mirror the sliced model's)
        session = self.trainer.mdp
        if not session.finished:
            session.pull_from_sliced(grads=True)
            session.accumulate(self.trainer._gradient_scale())

    def on_step_end(self, args, state, control, **kwargs):
        trainer, session = self.trainer, self.trainer.mdp
        if session.finished:
            return
        steps = trainer.prunable_config.pruning_steps()
        if state.global_step >= steps[len(session.results)]:
            session.pull_from_sliced(grads=False)  # the weights as trained (magnitude scores read them)
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
                if trainer.prunable_config.slice_after_pruning:
                    trainer._continue_on_sliced_model()
            elif trainer._slices_at_every_step():  # each interval up to the next step is cheaper than the last
                trainer._continue_on_sliced_model()
            trainer._set_loss_phase()


class _DenseEvaluation(TrainerCallback):
    """The dense model's evaluation, in on_train_begin as the last callback: every logger (report_to's, and any
    callback added later) has opened its run by then, so the dense metrics land in the run's logging dir."""

    def __init__(self, trainer: MDPTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer._dense_evaluation_pending:
            trainer._dense_evaluation_pending = False
            trainer.dense_metrics = trainer.evaluate(metric_key_prefix="dense")


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
        latency_timer: ``timer([dense, pruned]) -> [Measurement, Measurement]`` for the final measured-latency
            check (``PrunableConfig.verify_latency``), e.g. timing on a remote target; default: timed here with
            the table's protocol.
        Everything else is passed to ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args,
        prunable_config: PrunableConfig,
        latency_model=None,
        distillation: DistillationSettings | None = None,
        eval_data_collator=None,
        latency_timer=None,
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
                    check_dataset(dataset, f"MDPTrainer {name}", num_labels_of(model), task=task_of(model))
        if training_args is not None:
            _check_process_setup(training_args)
            if training_args.push_to_hub and training_args.hub_strategy != "end":
                logger.warning(
                    "MDPTrainer pushes only the pruned model (save_model / push_to_hub), never a checkpoint: "
                    "hub_strategy=%r uploads nothing during training (a checkpoint holds the full-size model and "
                    "pickled training state)",
                    str(training_args.hub_strategy),
                )
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
        if self.args.max_steps > 0:  # epoch-based runs are checked when Trainer counts the steps
            check_schedule_fits(
                prunable_config, self.args.max_steps, f"TrainingArguments.max_steps={self.args.max_steps}"
            )
        if latency_model is None:
            table_path = os.path.join(self.args.output_dir, LATENCY_TABLE_NAME)
            latency_model = latency_model_for(self.model, prunable_config, table_path)
        self.latency_model = latency_model
        self.mdp = PruningSession(self.model, prunable_config, latency_model, latency_timer)
        self.dense_metrics: dict | None = None
        self._dense_evaluation_pending = False
        self.export_report: dict | None = None  # what the last export wrote (main process), see save_model
        self._last_export_key = None
        self._weights_version = 0  # bumped when weights are reloaded (best model, resume): an export is stale then
        self._sliced = False  # training continues on the sliced model (PrunableConfig.slice_after_pruning)
        self._resume_into_sliced = False  # the checkpoint resumed from holds the sliced model
        self._slicing_refused = False  # the optimizer or model cannot follow onto the sliced model (warned once)
        self.add_callback(_MDPCallback(self))
        self._dense_evaluation = _DenseEvaluation(self)
        self.add_callback(self._dense_evaluation)

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
        norm = super()._clip_grad_norm(self._live_model(model))
        total = float(norm)
        self._clip_coefficient = min(1.0, self.args.max_grad_norm / (total + 1e-6)) if math.isfinite(total) else 1.0
        return norm

    # fine-tuning on the sliced model ----------------------------------------------------------------------
    def _live_model(self, model):
        """The model being trained: Trainer's inner loop keeps the (wrapped) model it started with in a local
        variable for the whole train() call, so after slicing the live one is ``self.model_wrapped``."""
        return self.model_wrapped if self._sliced else model

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._sliced or model is self.model_wrapped:
            return super().training_step(model, inputs, num_items_in_batch)
        # the loop's no_sync context was the gated model's: the sliced model skips its own all-reduce on the
        # accumulation micro-batches (DDP)
        model = self.model_wrapped
        sync = contextlib.nullcontext() if self.accelerator.sync_gradients else self.accelerator.no_sync(model)
        with sync:
            return super().training_step(model, inputs, num_items_in_batch)

    def _get_grad_norm(self, model, grad_norm=None):
        return super()._get_grad_norm(self._live_model(model), grad_norm)

    def _masked_only_reason(self) -> str | None:
        """Why this run cannot continue on the sliced model (None: it can): setups whose wrapping of the model
        and optimizer MDPTrainer does not redo."""
        wrapped_by = [
            name
            for name, on in (
                ("DeepSpeed", self.is_deepspeed_enabled),
                ("FSDP", self.is_fsdp_enabled or self.is_fsdp_xla_enabled),
                ("torch.nn.DataParallel (several GPUs in one process)", self.args.n_gpu > 1),
                ("tensor parallelism", self.is_distributed_loading_by_transformers),
            )
            if on
        ]
        if wrapped_by:
            return f"the model and optimizer are wrapped by {wrapped_by[0]}, which MDPTrainer does not re-wrap"
        try:
            check_sliceable(self.optimizer)
        except OptimizerNotSliceable as error:
            return str(error)
        return None

    def _slices_at_every_step(self) -> bool:
        """Whether training moves onto the sliced model after every pruning step (else: after the last one). Only
        under the monotone schedule (a pruned unit never comes back) and with scores read from the weights'
        gradients, which the sliced model has; scores from gate gradients need the gated model."""
        config = self.prunable_config
        return config.slice_after_pruning and config.monotone and not self.mdp.scores_from_gates

    def _continue_on_sliced_model(self, weights_from: str | None = None) -> bool:
        """After a pruning step: continue this train() call on the physically sliced model (cut from the model
        trained so far). The optimizer keeps its groups and hyperparameters with its state sliced to the kept
        entries (so the LR scheduler and the step count go on unchanged), and Accelerate prepares the sliced model
        as it did the dense one (device, mixed precision, torch.compile, DDP: every rank holds the same sliced
        model). ``weights_from``: a checkpoint holding the sliced model's weights (resume). Every rank calls it at
        the same step.

        Returns False, warning with the reason, when the optimizer state cannot be sliced exactly (training then
        goes on masked, as with ``slice_after_pruning=False``)."""
        session = self.mdp
        if self._slicing_refused:
            return False
        live = session.sliced_model if session.sliced_model is not None else session.model
        reason = self._masked_only_reason()
        if reason is None:
            try:
                sliced, sources, gated_sources = session.slice_for_training()
            except NotASelectionError as error:
                reason = str(error)
        if reason is not None:
            if self._sliced:  # cannot happen for a sliceable optimizer that sliced before; never silently
                raise RuntimeError(f"MDPTrainer: the sliced model cannot be sliced further: {reason}")
            logger.warning(
                "MDPTrainer: fine-tuning continues on the masked dense-shaped model, not on the sliced one "
                "(PrunableConfig.slice_after_pruning): %s",
                reason,
            )
            self._slicing_refused = True
            return False
        old_params = dict(live.named_parameters())
        for name, param in sliced.named_parameters():
            param.requires_grad_(old_params[sources[name][0]].requires_grad)
        sliced.to(self.args.device)
        if weights_from is not None:
            self._load_from_checkpoint(weights_from, model=sliced)
        slice_optimizer_(self.optimizer, old_params, dict(sliced.named_parameters()), sources)
        live.zero_grad(set_to_none=True)
        # Accelerate keeps every prepared model; the one trained so far is not trained any more (frees its buffers)
        old = self.model_wrapped
        self.accelerator._models = [m for m in self.accelerator._models if m is not old and m is not live]
        self.model_wrapped = self.accelerator.prepare_model(sliced)
        self.model = self.callback_handler.model = sliced
        session.train_on_sliced(sliced, gated_sources)
        self._sliced = True
        logger.info(
            "MDP step %d: training continues on the sliced model (%d parameters, dense %d)",
            len(session.results),
            sum(p.numel() for p in sliced.parameters()),
            sum(p.numel() for p in session.model.parameters()),
        )
        return True

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None and self._resume_into_sliced and not self._sliced:
            # the checkpoint holds the sliced model and the sliced optimizer state: the optimizer Trainer built for
            # the gated model is sliced the same way first, so the saved state fits it entry by entry
            self._resume_into_sliced = False
            if not self._continue_on_sliced_model(weights_from=checkpoint):
                raise ValueError(
                    f"{checkpoint} holds the sliced model, but this run cannot continue on it (see the warning "
                    "above); resume with the optimizer and setup of the run that wrote it"
                )
        return super()._load_optimizer_and_scheduler(checkpoint)

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        max_steps = values[-1]
        source = (
            f"TrainingArguments.max_steps={args.max_steps}"
            if args.max_steps > 0
            else f"num_train_epochs={args.num_train_epochs} x {values[1]} optimizer steps per epoch"
        )
        check_schedule_fits(self.prunable_config, max_steps, source)  # before the first training step
        return values

    def _resume_checkpoint(self, resume_from_checkpoint):
        """The checkpoint to resume from: ``True`` takes the newest complete one (an interrupted save, lacking
        its pruning state or trainer_state.json, is skipped with a warning); a path must be complete."""
        complete, incomplete = complete_checkpoints(self.args.output_dir)
        if resume_from_checkpoint is True:
            newer = {f: m for f, m in incomplete.items() if not complete or _step_of(f) > _step_of(complete[0])}
            skipped = [f"{os.path.basename(f)} (missing {', '.join(m)})" for f, m in newer.items()]
            if not complete:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no complete checkpoint"
                    + (f": {'; '.join(skipped)} — its save was interrupted" if skipped else "")
                    + "; start the run without resume_from_checkpoint"
                )
            if skipped:
                logger.warning(
                    "skipping incomplete checkpoint(s) %s: the save was interrupted; resuming from %s, the newest "
                    "complete checkpoint",
                    "; ".join(skipped),
                    complete[0],
                )
            return complete[0]
        missing = checkpoint_missing(resume_from_checkpoint)
        if missing:
            here = os.path.abspath(os.path.dirname(os.path.normpath(resume_from_checkpoint)))
            others = [
                f
                for f in complete_checkpoints(here)[0]
                if os.path.abspath(f) != os.path.abspath(resume_from_checkpoint)
            ]
            instead = (
                f"The newest complete checkpoint is {others[0]}: resume from it (or pass resume_from_checkpoint=True)."
                if others
                else f"{here} holds no complete checkpoint; start without resume_from_checkpoint."
            )
            raise ValueError(
                f"cannot resume from {resume_from_checkpoint}: it lacks {', '.join(missing)} (its save was "
                f"interrupted, or it was not written by MDPTrainer). {instead}"
            )
        return resume_from_checkpoint

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint:
            resume_from_checkpoint = self._resume_checkpoint(resume_from_checkpoint)
            self._load_pruning_state(resume_from_checkpoint)
        else:  # evaluated in on_train_begin, once every logger is set up (a logger opens its run there)
            self._dense_evaluation_pending = self.eval_dataset is not None and self.dense_metrics is None
        # last in the callback list, so that callbacks added after construction have set up before it evaluates
        self.callback_handler.remove_callback(self._dense_evaluation)
        self.callback_handler.add_callback(self._dense_evaluation)
        self._set_loss_phase()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # best model: only checkpoints with the final structure compete -------------------------------------------------
    def _determine_best_metric(self, metrics, trial) -> bool:
        # An evaluation before the final pruning step scored another structure (the dense model, or an earlier
        # step's): exporting its weights under the final masks would be a model nobody evaluated.
        if not self.mdp.finished:
            return False
        return super()._determine_best_metric(metrics, trial)

    def _load_best_model(self) -> None:
        checkpoint = self.state.best_model_checkpoint
        with open(os.path.join(checkpoint, STATE_JSON), encoding="utf-8") as handle:
            meta = json.load(handle)
        results = meta["results"]
        final = self.mdp.results[-1].choice
        saved = results[-1]["choice"] if len(results) == len(self.mdp.results) else None
        if saved != {"kept": final.kept, "removed_blocks": final.removed_blocks}:
            raise ValueError(
                f"load_best_model_at_end: {checkpoint} was saved before the final pruning step (another structure); "
                "only checkpoints with the final structure can be the best model of a pruned run"
            )
        if bool(meta.get("sliced", False)) != self._sliced:
            held, training = (
                ("sliced", "masked dense-shaped") if not self._sliced else ("masked dense-shaped", "sliced")
            )
            raise ValueError(
                f"load_best_model_at_end: {checkpoint} holds the {held} model but training ended on the {training} "
                "one; only checkpoints of this run's form can be loaded into it"
            )
        logger.info("Loading the best model (final structure) from %s, %s = %s", checkpoint,
                    self.args.metric_for_best_model, self.state.best_metric)  # fmt: skip
        self._load_from_checkpoint(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # transformers 5.24 writes ViT/DeiT checkpoints with legacy key names (encoder.layer.N...) and
        # Trainer reloads them without converting back, keeping the random weights with only a warning;
        # from_pretrained applies the conversion, so the weights are loaded through it.
        if model is None and self._resume_into_sliced and not self._sliced:
            return  # a sliced checkpoint: loaded into the sliced model once it exists (_load_optimizer_and_scheduler)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        self._weights_version += 1
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
        os.makedirs(folder, exist_ok=True)
        tensor_path = os.path.join(folder, STATE_TENSORS)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tensor_path + ".tmp")
        os.replace(tensor_path + ".tmp", tensor_path)
        meta = {
            "results": state["results"],
            "scores": {
                "kind": scores["kind"],
                "ema_decay": scores["ema_decay"],
                "count": scores["count"],
                "has_ema": scores["ema"] is not None,
            },
            "dense_metrics": self.dense_metrics,
            "sliced": self._sliced,  # the checkpoint's model is the sliced one (pruned format)
            "prunable_config": self.prunable_config.to_dict(),
            "latency_model": getattr(self.latency_model, "describe", lambda: type(self.latency_model).__name__)(),
        }
        json_path = os.path.join(folder, STATE_JSON)
        with open(json_path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1)
        os.replace(json_path + ".tmp", json_path)

    def _load_pruning_state(self, folder: str) -> None:
        json_path, tensor_path = os.path.join(folder, STATE_JSON), os.path.join(folder, STATE_TENSORS)
        if not (os.path.isfile(json_path) and os.path.isfile(tensor_path)):
            raise ValueError(
                f"{folder} has no MDP pruning state ({STATE_JSON} / {STATE_TENSORS}): its save was interrupted, or "
                "it was not written by MDPTrainer; resume from a complete checkpoint (resume_from_checkpoint=True "
                "finds the newest one)"
            )
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
        differing = _config_differences(meta["prunable_config"], self.prunable_config, json_path)
        if differing:
            raise ValueError(
                f"the checkpoint in {folder} was made with a different PrunableConfig ({'; '.join(differing)}); "
                "resume with the same one"
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
        self._resume_into_sliced = bool(meta.get("sliced", False))

    # export ---------------------------------------------------------------------------------------------
    def save_model(
        self, output_dir: str | None = None, _internal_call: bool = False, allow_unfinished: bool = False
    ) -> dict | None:
        """Checkpoints (internal calls) keep full shapes; a user's call writes the physically pruned model (once per
        training state: a second call for the same folder reuses it) and, as Trainer does, pushes it when
        ``args.push_to_hub``. Returns the report (main process; None elsewhere).

        Refused (ValueError) before the pruning schedule has finished, unless ``allow_unfinished``: then the
        partly pruned model is written with ``schedule_finished: false`` in its report and a warning in its card.
        Before the first pruning step there is no pruned model to write."""
        if _internal_call:
            if output_dir is not None and self.args.should_save:
                self._begin_checkpoint(output_dir)
            return super().save_model(output_dir, _internal_call=True)
        self._check_exportable(allow_unfinished)
        report = self._export(output_dir or self.args.output_dir)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        return report

    def _export(self, output_dir: str) -> dict | None:
        """Evaluate and export the pruned model into ``output_dir`` unless it already holds this state's export.
        Every process calls it (evaluation is collective); the main process writes."""
        key = (os.path.abspath(output_dir), self.state.global_step, len(self.mdp.results), self._weights_version)
        if key == self._last_export_key:
            return self.export_report
        pruned_metrics = self.evaluate(metric_key_prefix="pruned") if self.eval_dataset is not None else None
        report = self.export_pruned(output_dir, pruned_metrics) if self.is_world_process_zero() else None
        self.accelerator.wait_for_everyone()
        self._last_export_key, self.export_report = key, report
        return report

    def _begin_checkpoint(self, folder: str) -> None:
        """Inside Trainer._save_checkpoint, before any of Trainer's files: the pruning state goes in first and a
        stale trainer_state.json (an earlier save of this step) goes out, so the folder only looks complete once
        Trainer has written everything (and only then rotates older checkpoints away)."""
        if not os.path.basename(os.path.normpath(folder)).startswith(f"{PREFIX_CHECKPOINT_DIR}-"):
            return
        stale = os.path.join(folder, TRAINER_STATE_NAME)
        if os.path.exists(stale):
            os.remove(stale)
        self._save_pruning_state(folder)

    def _check_exportable(self, allow_unfinished: bool) -> None:
        session, steps = self.mdp, self.prunable_config.pruning_steps()
        where = f"training stopped at optimizer step {self.state.global_step}"
        if session.choice is None:
            raise ValueError(
                f"nothing to export: no pruning step has run yet ({where}; the first is at step {steps[0]}, "
                f"PrunableConfig.accumulation_steps={self.prunable_config.accumulation_steps}), so the model is still "
                f"dense. Train to step {steps[-1]} (TrainingArguments.max_steps) before save_model."
            )
        if not session.finished and not allow_unfinished:
            done = len(session.results)
            raise ValueError(
                f"the pruning schedule has not finished: {done} of {len(steps)} pruning steps done ({where}; the "
                f"last is at step {steps[-1]}), so the model meets step {done}'s budget "
                f"{session.results[-1].budget_ms:.4g} ms, not the final {session.final_budget_ms:.4g} ms. Train to "
                f"step {steps[-1]} (TrainingArguments.max_steps), or call save_model(..., allow_unfinished=True) to "
                "export it marked unfinished in its report and card."
            )

    def export_pruned(self, output_dir: str, pruned_metrics: dict | None = None) -> dict:
        """Slice, measure, and write the pruned model folder (main process only). Returns the report."""
        session, config = self.mdp, self.prunable_config
        model = session.model  # the gated dense model (after slicing, self.model is the sliced one)
        pruned = session.export()
        dense = dense_reference(model, session.space)
        # the table's own protocol and settings, dense and pruned interleaved in one process: comparable
        metadata = self.latency_model.table.metadata
        settings = verification_settings(self.latency_model)
        unmeasurable = unverifiable_reason(self.latency_model)
        reading = None
        unit, budget = budget_of(config)
        if session.latency_timer is not None or unmeasurable is None:
            # the same reading as the latency check's: repeated until its noise is under half the tolerance
            reading = read_against_dense(
                dense,
                pruned,
                unit,
                session.latency_timer or table_timer(settings),
                target_noise=config.latency_tolerance / 2,
                max_seconds=config.verify_latency_max_seconds,
                statistic=settings.statistic if settings is not None else "median",
            )
        else:
            logger.warning("MDP export: the pruned model is not timed: %s", unmeasurable)
        dense_m, pruned_m = (None, None) if reading is None else (reading.dense, reading.pruned)
        result = session.results[-1]
        report = {
            "budget_ms": result.budget_ms,
            "final_budget_ms": session.final_budget_ms,
            "schedule_finished": session.finished,
            "pruning_steps_done": len(session.results),
            "pruning_steps_planned": config.num_pruning_steps,
            "budget_fraction": config.budget_fraction,
            "dense_latency_ms": None if dense_m is None else dense_m.ms,
            "pruned_latency_ms": None if pruned_m is None else pruned_m.ms,
            "dense_latency_spread": None if dense_m is None else dense_m.spread,
            "pruned_latency_spread": None if pruned_m is None else pruned_m.spread,
            "measured_over_budget": None if reading is None else reading.measured / budget,
            "measured_noise": None if reading is None else reading.noise,
            "latency_repeats_timed": None if reading is None else len(reading.pruned.samples_ms),
            "latency_check": {"status": "off"} if session.latency_check is None else session.latency_check.to_dict(),
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
            "dense_map": _metric(self.dense_metrics, "_map"),  # detectors: COCO mAP (compute_metrics "map")
            "pruned_map": _metric(pruned_metrics, "_map"),
            "world_size": world_size(),
            "base_model": source_name(model),
            "base_model_id": source_repo_id(model),
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
        card = self._model_card(report, output_dir, pipeline_tag=_pipeline_tag(type(pruned).__name__))
        # the run's image processor (processing_class), so pipeline() / AutoImageProcessor load from the folder
        processor = self.processing_class if hasattr(self.processing_class, "save_pretrained") else None
        if processor is None and not getattr(pruned.config, "preprocessing", None):
            logger.warning(
                "MDPTrainer has no processing_class: %s gets no image processor, so pipeline() and "
                "AutoImageProcessor cannot load it; pass processing_class=<the model's image processor>",
                output_dir,
            )
        # one atomic save: the model, its card, report, config, the latency table it was solved with and the plot
        save_pruned_model(
            pruned,
            output_dir,
            image_processor=processor,
            extra_files={
                REPORT_NAME: json.dumps(report, indent=1),
                "pruning_config.json": config.to_json_string(),
                "README.md": str(card),
                LATENCY_TABLE_NAME: self.latency_model.table.save,
                PLOT_NAME: lambda path: plot_report(
                    path, session.space, result.choice, session.latency_terms, title=f"MDP: {report['base_model']}"
                ),
            },
        )
        return report

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer's push during training copies a checkpoint's full-size weights into output_dir and uploads them
        # with the pickled training_args.bin (hub_strategy="checkpoint": the optimizer state too). The repo of a
        # pruned run holds only the pruned model, which push_to_hub / save_model upload.
        return

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Upload the pruned model folder ``args.output_dir`` to ``args.hub_model_id``: the folder ``save_model``
        exported (exported now only if it is not this state's), with its card merged with ``kwargs`` (passed to
        :meth:`create_model_card`, as Trainer does). Never the dense checkpoint, nor pickled state.

        ``token`` / ``revision`` default to ``args.hub_token`` / ``args.hub_revision`` (a missing branch is
        created); ``blocking=False`` returns a ``Future`` of the commit. Returns the commit URL (``CommitInfo``)
        on the main process, None on the others. Every process must call it."""
        if self.mdp.choice is None:
            raise RuntimeError(
                "push_to_hub before the first pruning step: MDPTrainer uploads only a pruned model (train past "
                f"accumulation_steps={self.prunable_config.accumulation_steps} first)"
            )
        self._export(self.args.output_dir)
        if not self.is_world_process_zero():
            return None
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        model_name = kwargs.pop("model_name", None) or self.hub_model_id.split("/")[-1]
        self.create_model_card(model_name=model_name, **kwargs)
        return push_folder_to_hub(
            self.args.output_dir,
            self.hub_model_id,
            token=token,
            private=private if private is not None else self.args.hub_private_repo,
            commit_message=commit_message or "End of training",
            revision=revision if revision is not None else self.args.hub_revision,
            blocking=blocking,
        )

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Trainer's card call, merged into the pruned model's card in ``args.output_dir``: the MDP body (budget,
        device, latencies, kept dimensions) stays, the arguments go into its metadata (tags join the existing
        ones; datasets, license, language replace them when given; ``finetuned_from`` becomes ``base_model``
        when it is a Hub repo id). Without a pruned export in the folder it is Trainer's own card."""
        if not self.is_world_process_zero():
            return None
        output_dir = self.args.output_dir
        report_path = os.path.join(output_dir, REPORT_NAME)
        if not os.path.isfile(report_path):
            return super().create_model_card(
                language, license, tags, model_name, finetuned_from, tasks, dataset_tags, dataset, dataset_args
            )
        with open(report_path, encoding="utf-8") as handle:
            report = json.load(handle)
        with open(os.path.join(output_dir, "config.json"), encoding="utf-8") as handle:
            architectures = json.load(handle).get("architectures") or [""]
        card = self._model_card(
            report,
            output_dir,
            pipeline_tag=(_as_list(tasks) or [_pipeline_tag(architectures[0])])[0],
            model_name=model_name,
            base_model=finetuned_from,
            tags=tags,
            language=language,
            license=license,
            datasets=dataset_tags,
            dataset_name=(_as_list(dataset) or [None])[0],
            dataset_config=(_as_list(dataset_args) or [None])[0],
        )
        card.save(os.path.join(output_dir, "README.md"))
        return None

    def _model_card(self, report: dict, output_dir: str, datasets=None, dataset_config=None, **metadata):
        """The card for ``report``, merged with the card already in ``output_dir``; the dataset defaults to the
        evaluation set's (a ``datasets.Dataset``: its builder, config and split, as Trainer's card does)."""
        from huggingface_hub import ModelCard

        readme = os.path.join(output_dir, "README.md")
        # a card already there (this run's, or the user's): its metadata is merged, unreadable metadata dropped
        existing = ModelCard.load(readme, ignore_metadata_errors=True).data if os.path.isfile(readme) else None
        data = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        builder = getattr(data, "builder_name", None)
        if builder in (None, "csv", "json", "pandas", "parquet", "text", "generator"):  # not datasets on the Hub
            builder = None
        if not datasets and not (existing is not None and existing.datasets):
            datasets = builder
        split = getattr(data, "split", None)
        card = model_card(
            report,
            self.hub_model_id or self.args.hub_model_id or output_dir,
            datasets=datasets,
            dataset_config=dataset_config or (getattr(data, "config_name", None) if builder else None),
            dataset_split=str(split) if split is not None and builder else None,
            existing=existing,
            **metadata,
        )
        if report.get("schedule_finished") is False:  # said first, under the metadata, in every version of the card
            card = ModelCard(_mark_unfinished(str(card), report))
        return card


def source_name(model) -> str:
    """What a model was loaded from: its Hub id / folder, else its type (timm: hub id or architecture)."""
    config = getattr(model, "config", None)
    if config is not None:
        return config.name_or_path or config.model_type
    timm_cfg = getattr(model, "pretrained_cfg", None) or {}
    return timm_cfg.get("hf_hub_id") or timm_cfg.get("architecture") or type(model).__name__


def _config_differences(saved: dict, current: PrunableConfig, source: str) -> list[str]:
    """The fields in which the PrunableConfig a checkpoint was made with differs from ``current``, as
    "field: checkpoint X, now Y". A field the checkpoint lacks (written by an earlier mdp_hf) counts with its
    default, so adding a field does not lock out old checkpoints."""
    try:
        saved = type(current).from_dict(saved).to_dict()
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source} holds a PrunableConfig this mdp_hf cannot read ({error})") from None

    def normal(value):  # the checkpoint's side went through JSON (tuples are lists there)
        return json.loads(json.dumps(value))

    now = current.to_dict()
    return [
        f"{name}: checkpoint {normal(saved[name])!r}, now {normal(now[name])!r}"
        for name in now
        if normal(saved[name]) != normal(now[name])
    ]


def _step_of(folder: str) -> int:
    return int(os.path.basename(folder).rsplit("-", 1)[1])


def _mark_unfinished(card: str, report: dict) -> str:
    """The card of a model exported before its schedule finished says so first, under the metadata."""
    warning = (
        f"> **Unfinished pruning schedule.** This is the model after pruning step {report['pruning_steps_done']} of "
        f"{report['pruning_steps_planned']}: it meets that step's budget ({report['budget_ms']:.4g} ms), not the "
        f"run's final budget ({report['final_budget_ms']:.4g} ms). It was exported with `allow_unfinished=True`.\n\n"
    )
    if card.startswith("---\n") and "\n---\n" in card[4:]:
        end = card.index("\n---\n", 4) + len("\n---\n")
        return card[:end] + "\n" + warning + card[end:].lstrip("\n")
    return warning + card


def source_repo_id(model) -> str | None:
    """The Hub repo a model's weights came from (a card's ``base_model``), None for a local folder, a model built
    from a config, or timm random weights."""
    config = getattr(model, "config", None)
    if config is not None:
        return hub_repo_id(config.name_or_path)
    return hub_repo_id((getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id"))


def _pipeline_tag(architecture: str) -> str:
    return task_of_architecture(architecture) or "image-feature-extraction"


def _check_process_setup(training_args) -> None:
    """Refuse a launch whose processes TrainingArguments does not see: each rank would train its own model while
    mdp_hf averages their scores, and every rank would write the export."""
    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        launched = max(launched, dist.get_world_size())
    if launched > 1 and training_args.world_size != launched:
        raise ValueError(
            f"this process is one of {launched} launched processes (WORLD_SIZE={launched}) but its TrainingArguments "
            f"set up {training_args.world_size} (parallel_mode={training_args.parallel_mode.value}): every rank "
            "would train a separate model. Without GPUs, create TrainingArguments with use_cpu=True (--use_cpu) or "
            "set ACCELERATE_USE_CPU=true before creating them (importing mdp_hf.trainer first does that)."
        )


def _accuracy(metrics: dict | None):
    if not metrics:
        return None
    for key, value in metrics.items():
        if key.endswith("_accuracy"):
            return float(value)
    return None


def _metric(metrics: dict | None, suffix: str):
    """The first metric whose prefixed name ends with ``suffix`` (``dense_map`` for "_map"), else None."""
    return next((float(v) for k, v in (metrics or {}).items() if k.endswith(suffix)), None)


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
