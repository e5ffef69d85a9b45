"""The MDP engine shared by MDPTrainer and the one-shot API.

``PruningSession`` owns a model's pruning space, its gates, the importance accumulator and the
latency terms; ``prune_step`` reduces scores across ranks, solves on the main rank, broadcasts the
choice and applies it as gates. ``prune`` is the one-shot API for users with their own loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .adapters import ModelAdapter, PruningChoice, build_space, get_adapter
from .config import PrunableConfig
from .distributed import mean_across_ranks, run_on_main_and_broadcast, world_size
from .importance import ImportanceAccumulator
from .latency.models import dense_latency_ms
from .latency_check import LatencyCheck, budget_of, land_on_budget, unverifiable_reason, verification_settings
from .masks import build_problem, choice_from_solution, gate_model, kept_fraction_by_kind
from .solver import solve as solve_problem
from .surgery import choice_on_sliced, compose_sources, copy_sliced_model, parameter_sources, slice_model

logger = logging.getLogger(__name__)


@dataclass
class PruningStepResult:
    """What one pruning step decided (identical on every rank)."""

    step_index: int
    budget_ms: float
    choice: PruningChoice
    predicted_latency_ms: float
    objective: float
    bound: float
    gap: float
    status: str
    backend: str
    solve_time_s: float
    kept_fraction: dict[str, float] = field(default_factory=dict)
    solver_budget_ms: float | None = None  # the budget the solver got (tighter than budget_ms after a latency check)
    latency_check: dict | None = None  # final step: LatencyCheck.to_dict() of the measured check (None: off)

    def log_dict(self) -> dict[str, float]:
        logs = {
            "mdp/budget_ms": self.budget_ms,
            "mdp/predicted_latency_ms": self.predicted_latency_ms,
            "mdp/solver_time_s": self.solve_time_s,
            "mdp/solver_gap": self.gap,
            "mdp/step": float(self.step_index),
        }
        logs.update({f"mdp/kept_{kind}": value for kind, value in self.kept_fraction.items()})
        rounds = (self.latency_check or {}).get("rounds") or []
        if rounds:  # the final step's measured check: what the exported structure measured against the budget
            exported = rounds[self.latency_check.get("chosen", -1)]
            logs["mdp/measured_over_budget"] = exported["measured_over_budget"]
            logs["mdp/latency_check_resolves"] = float(len(rounds) - 1)
            logs["mdp/solver_budget_ms"] = exported["solver_budget_ms"]
        return logs


class PruningSession:
    """Gates, scores, latency terms and solver for one model under one PrunableConfig."""

    def __init__(self, model, config: PrunableConfig, latency_model, latency_timer=None):
        self.model = model
        self.latency_timer = latency_timer  # times [dense, pruned] for the final check (None: here, table protocol)
        self.config = config
        self.adapter = get_adapter(model)
        self.space = build_space(model, config.group_sizes, config.min_keep)
        self.latency_model = latency_model
        self.latency_terms = latency_model.solver_terms(self.space)
        self.dense_predicted_ms = dense_latency_ms(self.latency_terms)
        self.keep_full = _kept_full(self.adapter, self.space, config)
        self.merge_blocks = _merged_blocks(self.adapter, self.space, config)
        self.results: list[PruningStepResult] = []
        # MDPTrainer, once it trains the physically sliced model: that model, the choice it was sliced for, and per
        # parameter the gated model's parameter and entries it holds (the gated model stays the session's
        # coordinate system: scores, choices and the latency terms are over its space)
        self.sliced_model = None
        self.sliced_choice: PruningChoice | None = None
        self.sliced_sources: dict[str, tuple[str, torch.Tensor]] | None = None
        self.check_budget()  # before touching the model: a bad budget fails fast and leaves it as it was
        self.gates = gate_model(model, self.space)
        # "taylor": the family's official score (ViT: linked w * dL/dw); "taylor_gates": gate gradients
        self.scores_from_gates = config.importance == "taylor_gates" or self.adapter.scores_from_gates
        if not self.scores_from_gates:
            self.gates.freeze()  # plain masks: no autograd work for gates nobody reads
        sizes = {name: dim.size for name, dim in self.space.dimensions.items()}
        # a shared width's members: (score name, block) in the adapter's fixed order
        self.share_keys: dict[str, list[tuple[str, str | None]]] = {
            name: [(f"share/{name}/{i}", block) for i, (block, _) in enumerate(members)]
            for name, members in self._step_shares().items()
        }
        sizes.update(
            {key: self.space.dimensions[name].size for name, keys in self.share_keys.items() for key, _ in keys}
        )
        share_groups = {name: [key for key, _ in keys] for name, keys in self.share_keys.items()}
        self.scores = ImportanceAccumulator(sizes, self.adapter.default_score_kind, config.ema_decay, share_groups)

    def check_budget(self) -> None:
        """Raise InfeasibleBudgetError (stating the smallest reachable latency) now, before any training,
        if no sub-network of the allowed space meets the final budget."""
        _check_feasible(self.space, self.latency_terms, self.final_budget_ms, self.config)

    # budget and schedule -----------------------------------------------------------------------------
    @property
    def final_budget_ms(self) -> float:
        """The run's target; a fraction is taken of the dense latency predicted by the same model."""
        return _final_budget(self.config, self.dense_predicted_ms)

    def budget_for_step(self, step_index: int) -> float:
        if self.config.schedule == "one_shot":
            return self.final_budget_ms
        return self.config.step_budget(step_index, self.dense_predicted_ms, self.final_budget_ms)

    @property
    def choice(self) -> PruningChoice | None:
        return self.results[-1].choice if self.results else None

    @property
    def latency_check(self) -> LatencyCheck | None:
        """The measured-latency check of the final step (None before it, or with ``verify_latency=False``)."""
        check = self.results[-1].latency_check if self.finished else None
        return None if check is None else LatencyCheck.from_dict(check)

    @property
    def finished(self) -> bool:
        return len(self.results) >= self.config.num_pruning_steps

    # pruning --------------------------------------------------------------------------------------------
    def _step_shares(self) -> dict[str, list[tuple[str | None, torch.Tensor]]]:
        return self.adapter.score_shares(self.model, self.space, self.gates)

    def step_scores(self) -> dict[str, torch.Tensor]:
        """This step's signed per-unit scores (and shares), read from the gradients of the last backward."""
        if self.scores_from_gates:
            signed = ModelAdapter.taylor_scores(self.adapter, self.model, self.space, self.gates)
        else:
            signed = self.adapter.taylor_scores(self.model, self.space, self.gates)
        for name, members in self._step_shares().items():
            signed.update({key: value for (key, _), (_, value) in zip(self.share_keys[name], members)})
        return signed

    def accumulate(self, grad_scale: float = 1.0) -> bool:
        """Add this step's scores (``grad_scale``: what the gradients are multiplied by, e.g. an fp16 loss
        scale, or a gradient-clipping coefficient). Returns False for a skipped (non-finite) step."""
        added = self.scores.add(self.step_scores(), grad_scale, reduce=mean_across_ranks)
        self.gates.zero_grad()
        return added

    def prune_step(self) -> PruningStepResult:
        """Commit the scores (identical on every rank: gradients were reduced each step), solve on the main
        rank, apply the broadcast choice to the gates on every rank."""
        step_index = len(self.results) + 1
        committed = {name: value.numpy() for name, value in self.scores.commit().items()}
        if self.config.importance == "magnitude":  # baseline: weights only, identical on every rank
            scores = {k: v.numpy() for k, v in self.adapter.unit_magnitudes(self.model, self.space).items()}
        else:
            scores = {name: committed[name] for name in self.space.dimensions}
        shares = (
            {}
            if self.config.importance == "magnitude"
            else {name: [(block, committed[key]) for key, block in keys] for name, keys in self.share_keys.items()}
        )
        budget = self.budget_for_step(step_index)
        # monotone (official): a pruned unit or block stays pruned; later steps rank only the active units
        active = self.choice if self.config.monotone else None

        terms = self.latency_terms
        current = self.choice
        if getattr(self.latency_model, "relinearises", False) and current is not None:  # HALP: at the current widths
            around = {
                name: dim.widths().index(len(current.kept_indices(self.space, name)))
                for name, dim in self.space.dimensions.items()
            }
            terms = self.latency_model.solver_terms(self.space, around=around)

        def solve(budget_ms: float) -> PruningStepResult:
            problem = build_problem(
                self.space,
                scores,
                terms,
                budget_ms,
                self.config.prune,
                metadata={"step": step_index, "dense_predicted_ms": self.dense_predicted_ms},
                shares=shares,
                active=active,
                keep_full=self.keep_full,
                merge_blocks=self.merge_blocks,
            )
            if self.config.dump_problems_dir:
                os.makedirs(self.config.dump_problems_dir, exist_ok=True)
                suffix = "" if budget_ms == budget else f"_budget{budget_ms:.6g}"
                problem.to_json(os.path.join(self.config.dump_problems_dir, f"problem_step{step_index}{suffix}.json"))
            solution = solve_problem(problem, self.config.solver_backend, self.config.solver_time_limit_s)
            if solution.status != "optimal":
                logger.warning(
                    "MDP step %d: solver stopped with status %s, gap %.3g", step_index, solution.status, solution.gap
                )
            choice = choice_from_solution(self.space, scores, solution, active, self.merge_blocks)
            return PruningStepResult(
                step_index,
                budget,
                choice,
                solution.latency_ms,
                solution.objective,
                solution.bound,
                solution.gap,
                solution.status,
                solution.backend,
                solution.solve_time_s,
                kept_fraction_by_kind(self.space, choice),
                solver_budget_ms=budget_ms,
            )

        def solve_on_main():
            result = solve(budget)
            if step_index < self.config.num_pruning_steps or not self.config.verify_latency:
                return result, None
            return self._land_on_measured_budget(result, solve)

        result, latency_check = run_on_main_and_broadcast(solve_on_main)
        if latency_check is not None:
            result.latency_check = latency_check.to_dict()
        self.gates.apply_choice(result.choice)
        self.results.append(result)
        return result

    def _land_on_measured_budget(self, result: PruningStepResult, solve) -> tuple[PruningStepResult, LatencyCheck]:
        """Main rank: time the final choice on the table's device and re-solve until it fits (or skip, saying why)."""
        config = self.config
        unit, budget = budget_of(config)
        reason = None if self.latency_timer is not None else unverifiable_reason(self.latency_model)
        if reason is not None:
            logger.warning("MDP: the pruned model's latency is not verified: %s", reason)
            return result, LatencyCheck("skipped", unit, budget, config.latency_tolerance, reason=reason)
        result, check = land_on_budget(
            self.model,
            self.space,
            result,
            solve,
            budget_unit=unit,
            budget=budget,
            tolerance=config.latency_tolerance,
            max_rounds=config.verify_latency_rounds,
            dense_predicted_ms=self.dense_predicted_ms,
            settings=verification_settings(self.latency_model),
            timer=self.latency_timer,
            max_seconds=config.verify_latency_max_seconds,
        )
        logger.info("MDP: %s", check.summary())
        return result, check

    # training on the sliced model ------------------------------------------------------------------------------
    def slice_for_training(self):
        """The model that training continues on for the current choice, sliced from the model trained so far (the
        gated model, or the previous step's sliced one, so its weights and buffers are the trained ones). Returns
        (sliced model, per parameter its source in the model trained so far, per parameter its source in the gated
        model); call :meth:`train_on_sliced` once training has moved onto it."""
        if self.sliced_model is None:
            sources = parameter_sources(self.model, self.space, self.choice)
            return slice_model(self.model, self.space, self.choice), sources, sources
        live = self.sliced_model
        live_space = build_space(live, self.config.group_sizes, self.config.min_keep)
        live_choice = choice_on_sliced(self.space, self.sliced_choice, self.choice, live_space)
        sources = parameter_sources(live, live_space, live_choice)
        return slice_model(live, live_space, live_choice), sources, compose_sources(self.sliced_sources, sources)

    def train_on_sliced(self, sliced, gated_sources: dict[str, tuple[str, torch.Tensor]]) -> None:
        """Training continues on ``sliced`` (cut for the current choice; ``gated_sources`` from
        :meth:`slice_for_training`): exports copy it, and :meth:`pull_from_sliced` mirrors it into the gated model."""
        self.sliced_model, self.sliced_choice, self.sliced_sources = sliced, self.choice, gated_sources
        self.model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def pull_from_sliced(self, grads: bool) -> None:
        """Copy the sliced model's weights (and, with ``grads``, its gradients) into their entries of the gated
        model, so that scores are read there exactly as in masked training: a kept entry's weight and gradient are
        the masked model's (the two compute the same function), a pruned entry's gradient is 0 (it is no longer
        active under the monotone schedule, so its score is never used)."""
        if self.sliced_model is None:
            return
        gated = dict(self.model.named_parameters())
        for name, param in self.sliced_model.named_parameters():
            source, index = self.sliced_sources[name]
            target = gated[source]
            flat = index.flatten().to(target.device)
            target.data.view(-1).index_copy_(0, flat, param.data.reshape(-1).to(target.dtype))
            if grads and param.grad is not None:  # None: frozen, or not in this step's graph (as in masked training)
                if target.grad is None:
                    target.grad = torch.zeros_like(target)
                target.grad.view(-1).index_copy_(0, flat, param.grad.reshape(-1).to(target.dtype))

    def export(self):
        """The physically pruned model for the current choice: a copy of :attr:`sliced_model` once training
        continues on the sliced model, else the gated model sliced now."""
        if self.choice is None:
            raise RuntimeError("no pruning step has run yet: nothing to export")
        if self.sliced_model is not None:
            return copy_sliced_model(self.sliced_model)
        return slice_model(self.model, self.space, self.choice)

    # checkpoint state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "scores": self.scores.state_dict(),
            "results": [
                {**r.__dict__, "choice": {"kept": r.choice.kept, "removed_blocks": r.choice.removed_blocks}}
                for r in self.results
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        self.scores.load_state_dict(state["scores"])
        self.results = []
        for raw in state["results"]:
            raw = dict(raw)
            raw["choice"] = PruningChoice(**raw["choice"])
            self.results.append(PruningStepResult(**raw))
        if self.choice is not None:
            self.gates.apply_choice(self.choice)
        else:
            self.gates.reset()


def _final_budget(config: PrunableConfig, dense_ms: float) -> float:
    return float(config.budget_ms) if config.budget_ms is not None else config.budget_fraction * dense_ms


def _kept_full(adapter, space, config: PrunableConfig) -> list[str]:
    """Dimensions held at full width: the family's stem unless ``config.prune_stem``."""
    return [] if config.prune_stem else [name for name in adapter.stem_dimensions if name in space.dimensions]


def _merged_blocks(adapter, space, config: PrunableConfig) -> dict[str, str]:
    return adapter.layer_blocks(space) if config.block_granularity == "layer" else {}


def _check_feasible(space, latency_terms, budget_ms: float, config: PrunableConfig) -> None:
    uniform = {name: np.ones(dim.size) for name, dim in space.dimensions.items()}
    adapter = get_adapter(space.model_type)
    problem = build_problem(
        space,
        uniform,
        latency_terms,
        budget_ms,
        config.prune,
        keep_full=_kept_full(adapter, space, config),
        merge_blocks=_merged_blocks(adapter, space, config),
    )
    solve_problem(problem, config.solver_backend, config.solver_time_limit_s)


def check_budget(model, config: PrunableConfig, latency_model) -> None:
    """Fail fast (InfeasibleBudgetError with the smallest reachable latency) if ``config``'s budget cannot be
    met for ``model`` under ``latency_model`` — before hours of training are spent."""
    space = build_space(model, config.group_sizes, config.min_keep)
    terms = latency_model.solver_terms(space)
    _check_feasible(space, terms, _final_budget(config, dense_latency_ms(terms)), config)


def latency_model_for(model, config: PrunableConfig, table_path: str | None = None):
    """The latency model ``config`` asks for: its table loaded (file or Hub id, checked against this run's
    settings) or, without ``config.latency_table``, measured now for ``model`` on the configured device.

    Under several processes the main rank builds or loads the table and broadcasts it, so ranks never
    time concurrently on one device. ``table_path``: where a built table is written (resumable).
    """
    from .latency import FlopsLatencyModel, LinearLatencyModel, TableLatencyModel, build_table
    from .latency.profiler import load_table_for

    space = build_space(model, config.group_sizes, config.min_keep)
    settings = config.timing_settings()

    def load_or_build():
        if config.latency_table:  # a file, a folder or a Hub id; validated and checked against this run
            return load_table_for(config.latency_table, model, space, settings, config.latency_allow_mismatch)
        return build_table(model, table_path, space=space, settings=settings, subgrid=config.latency_subgrid)

    table = run_on_main_and_broadcast(load_or_build)
    model_cls = {"table": TableLatencyModel, "linear": LinearLatencyModel, "flops": FlopsLatencyModel}[
        config.latency_model
    ]
    return model_cls(table, space, allow_mismatch=config.latency_allow_mismatch)


class _ModelStatePreserved:
    """Scoring passes run in train mode (batch statistics, as in training) and write gradients; afterwards the
    caller's model is as it was: buffers (BatchNorm running statistics, num_batches_tracked), every
    submodule's train/eval flag and the parameters' ``.grad`` are put back."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.buffers = [(buffer, buffer.detach().clone()) for buffer in self.model.buffers()]
        self.modes = [(module, module.training) for module in self.model.modules()]
        self.grads = [(param, param.grad) for param in self.model.parameters()]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)
        for module, training in self.modes:
            module.training = training
        for param, grad in self.grads:
            param.grad = grad
        return False


def accumulate_importance(session: PruningSession, model, dataloader, num_batches: int, loss_fn=None) -> None:
    """Forward + backward over ``num_batches`` batches (no optimizer step), adding scores each batch.

    Batches are dicts (``pixel_values``, ``labels``) or ``(pixel_values, labels)`` tuples; a detector's ``labels`` are a
    list of dicts (``class_labels``, normalised cxcywh ``boxes``; checked first, see ``mdp_hf.data.detection_collate``).
    The loss is the model's own; for models without one (timm models, DeiT with its teacher head) cross-entropy on the
    labels; ``loss_fn(outputs, batch_or_labels)`` overrides both. The passes run in train mode; the model
    comes back unchanged (buffers such as BatchNorm statistics, train/eval flags and ``.grad`` restored)."""
    with _ModelStatePreserved(model):
        _score_batches(session, model, dataloader, num_batches, loss_fn)


def _score_batches(session: PruningSession, model, dataloader, num_batches: int, loss_fn) -> None:
    from .losses import MDPLoss

    model.train()
    device = next(model.parameters()).device
    cross_entropy = MDPLoss() if loss_fn is None and not _returns_own_loss(model) else None
    seen = 0
    for batch in dataloader:
        if seen >= num_batches:
            break
        if isinstance(batch, dict):
            inputs = {k: _to_device(v, device) for k, v in batch.items()}
            given = inputs
        else:
            inputs = dict(zip(("pixel_values", "labels"), (_to_device(t, device) for t in batch[:2])))
            given = inputs["labels"]
        if loss_fn is None:
            _check_labels_fit_task(model, inputs.get("labels"))
        if cross_entropy is not None:
            loss, _ = cross_entropy(model, inputs)
        elif loss_fn is not None:  # the user's loss on the model's outputs; labels are not passed to the model
            from .losses import _call_model

            extra = {k: v for k, v in inputs.items() if k not in ("pixel_values", "labels")}
            loss = loss_fn(_call_model(model, inputs["pixel_values"], extra), given)
        else:
            loss = getattr(model(**inputs), "loss", None)
        if loss is None:
            raise ValueError("the model returned no loss: give batches with labels, or pass loss_fn=")
        model.zero_grad(set_to_none=True)
        loss.backward()
        session.accumulate()
        seen += 1
    model.zero_grad(set_to_none=True)
    if seen == 0:
        raise ValueError("the dataloader yielded no batches: importance needs data")


def _to_device(value, device):
    """A batch field on ``device``: tensors moved, detection labels (lists of dicts of tensors) moved inside."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _check_labels_fit_task(model, labels) -> None:
    """Detection labels (a list of dicts with boxes) for a detector, checked before its loss reads them; refused
    for a model of another task, where they would fail deep inside its loss."""
    from .adapters import task_of

    task = task_of(model)
    if task == "object-detection":
        from .data import check_detection_labels

        if labels is not None:
            num_labels = getattr(getattr(model, "config", None), "num_labels", None)
            check_detection_labels(labels, "importance batch labels", num_labels)
    elif isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], dict):
        raise ValueError(
            f"the batches hold detection labels (a list of dicts: {sorted(labels[0])}) but the model is an {task} "
            f"model ({type(model).__name__}); prune a model of an object-detection family with them, or give "
            "this model integer class labels"
        )


def refuse_meta_model(model, where: str) -> None:
    """A model whose weights are on the meta device (``torch.device("meta")``, ``init_empty_weights``, a
    ``from_pretrained`` that never loaded the weights) has no values to score, train or slice: refuse it up
    front with the fix instead of failing deep inside Trainer or the solver."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    meta += [name for name, b in model.named_buffers() if b.is_meta]
    if meta:
        raise ValueError(
            f"{where}: the model's weights are on the meta device ({len(meta)} tensors, e.g. {meta[0]!r}): they "
            "hold no values. Load or initialise real weights first (from_pretrained without device_map='meta', "
            "or model.to_empty(device='cpu') followed by loading a state dict)"
        )


def _returns_own_loss(model) -> bool:
    """Whether ``model(pixel_values=..., labels=...)`` returns a loss (HF classifiers; not DeiT's teacher-head
    model, nor plain nn.Modules such as timm models)."""
    import inspect

    try:
        return "labels" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def prune(
    model,
    config: PrunableConfig,
    dataloader,
    latency_model,
    num_batches: int | None = None,
    loss_fn=None,
    latency_timer=None,
):
    """One-shot MDP: score units on ``dataloader``, solve for the budget, return (pruned model, step result).

    The input model is not modified: gates are removed again, and its buffers (BatchNorm running statistics),
    train/eval flags and gradients are restored after the scoring passes, so the pruned model is sliced from
    the model as given. ``num_batches`` defaults to ``config.accumulation_steps``. Fine-tune the returned
    model as usual.
    With ``config.verify_latency`` the chosen structure is timed and re-solved until it measures within the
    budget (``result.latency_check``); ``latency_timer([dense, pruned]) -> [Measurement, Measurement]`` times it
    elsewhere (a remote target).
    """
    refuse_meta_model(model, "prune()")
    session = PruningSession(model, config, latency_model, latency_timer)
    try:
        accumulate_importance(session, model, dataloader, num_batches or config.accumulation_steps, loss_fn)
        result = session.prune_step()
        pruned = session.export()
    finally:
        session.gates.remove()
    logger.info(
        "MDP one-shot: world size %d, predicted %.3f ms for budget %.3f ms",
        world_size(),
        result.predicted_latency_ms,
        result.budget_ms,
    )
    return pruned, result
