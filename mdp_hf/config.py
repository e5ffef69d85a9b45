"""PrunableConfig: what to prune, to which latency budget, with which schedule, tables and solver.

A dataclass users write in code, in a recipe's YAML, or load from ``pruning_config.json``
(``save_pretrained`` / ``from_pretrained``, like peft's configs). Every field is validated on
construction; an invalid value raises an error naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
from dataclasses import dataclass, field

from .solver.api import BACKENDS as SOLVER_BACKENDS

logger = logging.getLogger(__name__)

CONFIG_NAME = "pruning_config.json"
CONFIG_VERSION = 1


def prunable_kinds() -> tuple[str, ...]:
    """What ``prune`` may list: "all", every dimension kind of a registered family, and "blocks" (whole
    residual branches)."""
    from .adapters import registered_kinds

    return ("all", *registered_kinds(), "blocks")


# "taylor": each family's official score; "taylor_gates": gate gradients (ablation); "magnitude": weights only
IMPORTANCE_KINDS = ("taylor", "taylor_gates", "magnitude")
SCHEDULES = ("one_shot", "iterative")
LATENCY_MODELS = ("table", "linear", "flops")


@dataclass
class PrunableConfig:
    """Configuration of an MDP pruning run.

    Budget: give exactly one of ``budget_ms`` (absolute, on the latency table's device and settings)
    or ``budget_fraction`` (of the dense model's latency under the same latency model).

    Ablations from the paper are configurations: widths only = ``prune`` listing the kinds without "blocks";
    HALP's linear latency model = ``latency_model="linear"``.
    """

    budget_ms: float | None = field(
        default=None,
        metadata={
            "help": "Absolute latency budget in ms, on the latency table's device and settings. Exclusive with "
            "budget_fraction (a recipe's default fraction is dropped when it is given)."
        },
    )
    budget_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Budget as a fraction in (0, 1] of the dense model's latency under the same latency model "
            "(e.g. 0.5). Exclusive with budget_ms."
        },
    )
    # "all": every kind the model declares, and blocks; or a list of kinds (+ "blocks"), see prunable_kinds()
    prune: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={
            "help": "What may be pruned: 'all', or dimension kinds of the model's family (ViT: embed heads qk v "
            "mlp; CNNs: channels residual ...) plus 'blocks' (whole residual branches). Widths only: omit blocks."
        },
    )
    # keys: a kind ("mlp"), a dimension name ("layers.3.mlp_dim") or a glob ("stages.*.conv1"); or a preset name
    # (mdp_hf.presets.GROUP_SIZE_PRESETS, e.g. "resnet50_official", "deit_base_paper"). Empty -> the adapter's
    # defaults. On a command line: '{"embed": 16}', embed=16,mlp=32 or resnet50_official
    group_sizes: dict[str, int] | str | None = field(
        default_factory=dict,
        metadata={
            "help": "Units pruned together, per kind, dimension name or glob: embed=16,mlp=32, a JSON object, or a "
            "preset name (resnet50_official, deit_base_paper). Empty: the family's defaults."
        },
    )
    min_keep: dict[str, int] | str | None = field(
        default_factory=dict,
        metadata={"help": "Units always kept, per kind (e.g. heads=2,mlp=64). Empty: one group per dimension."},
    )
    importance: str = field(
        default="taylor",
        metadata={
            "help": "Unit importance: taylor (each family's official Taylor score), taylor_gates (gate gradients, "
            "ablation) or magnitude (weights only, baseline).",
            "choices": list(IMPORTANCE_KINDS),
        },
    )
    ema_decay: float = field(
        default=0.9, metadata={"help": "EMA decay in [0, 1) blending each pruning step's average score."}
    )
    monotone: bool = field(
        default=True,
        metadata={
            "help": "Iterative schedule: a pruned unit or block stays pruned; later steps rank only the active units."
        },
    )
    # ViT blocks: "sublayer" (attention and MLP removable separately: every whole-layer choice and more) or
    # "layer" (one keep bit per layer, as the official block notebook)
    block_granularity: str = field(
        default="sublayer",
        metadata={
            "help": "ViT blocks: sublayer (attention and MLP removable separately) or layer (one keep bit per layer).",
            "choices": ["sublayer", "layer"],
        },
    )
    prune_stem: bool = field(
        default=False,
        metadata={"help": "Prune CNN stems too (the official code keeps their full width)."},
    )
    schedule: str = field(
        default="one_shot",
        metadata={
            "help": "one_shot: prune once after accumulation_steps; iterative: num_pruning_steps steps every "
            "pruning_interval optimizer steps, with exponentially decreasing budgets.",
            "choices": list(SCHEDULES),
        },
    )
    accumulation_steps: int = field(
        default=100,
        metadata={"help": "Optimizer steps of score accumulation before the (first) pruning step."},
    )
    pruning_interval: int = field(
        default=100, metadata={"help": "Iterative schedule: optimizer steps between pruning steps."}
    )
    num_pruning_steps: int = field(
        default=1, metadata={"help": "Iterative schedule: the number of pruning steps T (one_shot: 1)."}
    )
    latency_model: str = field(
        default="table",
        metadata={
            "help": "How latency is predicted: table (measured multi-dimensional lookup tables), linear (HALP-style "
            "ablation) or flops.",
            "choices": list(LATENCY_MODELS),
        },
    )
    latency_table: str | None = field(
        default=None,
        metadata={
            "help": "A latency table to use instead of measuring one: a file, or a Hub id org/name (file "
            "latency_table.json). Default (or none): build it on latency_device when training starts."
        },
    )
    latency_device: str = field(
        default="cpu", metadata={"help": "Device the latency table is measured on (cpu, cuda, cuda:1, ...)."}
    )
    latency_batch_size: int = field(default=1, metadata={"help": "Batch size the latency is measured at."})
    latency_num_threads: int | None = field(
        default=1, metadata={"help": "CPU threads while measuring (none: torch's default)."}
    )
    latency_dtype: str = field(
        default="float32",
        metadata={"help": "Dtype the latency is measured in.", "choices": ["float32", "float16", "bfloat16"]},
    )
    latency_repeats: int = field(default=30, metadata={"help": "Timed repeats per measured cell."})
    latency_image_size: int | None = field(
        default=None,
        metadata={"help": "Input resolution of the latency measurement (none: the model config's image_size)."},
    )
    latency_subgrid: int | None = field(
        default=None,
        metadata={"help": "Measure every k-th width per axis and interpolate the rest (none: measure the full grid)."},
    )
    latency_allow_mismatch: bool = field(
        default=False,
        metadata={"help": "Use a latency table whose metadata differs from this run (device, batch ...), warning."},
    )
    solver_backend: str = field(
        default="auto",
        metadata={
            "help": "Solver: auto (chain_dp when the structure allows, else the MILP), chain_dp, milp, mindtpy, "
            "greedy or brute_force.",
            "choices": list(SOLVER_BACKENDS),
        },
    )
    solver_time_limit_s: float | None = field(
        default=60.0, metadata={"help": "Time limit of one solve in seconds (none: no limit)."}
    )
    dump_problems_dir: str | None = field(
        default=None,
        metadata={"help": "Write every solved problem as JSON into this folder (for `mdp-hf solve`, bug reports)."},
    )
    # after the final solve, time the sliced model against the dense one (table's device and protocol) and
    # tighten the solver's budget until the *measured* latency is within the budget (see docs/latency.md)
    verify_latency: bool = field(
        default=True,
        metadata={
            "help": "After the final solve, time the sliced model against the dense one on latency_device and "
            "tighten the solver's budget until the measured latency is within the budget (docs/latency.md)."
        },
    )
    latency_tolerance: float = field(
        default=0.01,
        metadata={
            "help": "Fraction by which the measured latency may exceed the budget, at two standard errors of the "
            "timing: a noisier timing makes the check keep the model further under the budget."
        },
    )
    verify_latency_rounds: int = field(
        default=4, metadata={"help": "Re-solves of the latency check at most; then LatencyBudgetError."}
    )
    verify_latency_max_seconds: float = field(
        default=30.0,
        metadata={
            "help": "Timing one structure repeats the table's protocol until its noise (two standard errors) is "
            "under half the tolerance, for at most this many seconds (and 20 repetitions)."
        },
    )
    slice_after_pruning: bool = field(
        default=True,
        metadata={
            "help": "MDPTrainer: after the last pruning step (with the monotone iterative schedule and scores from "
            "weight gradients: after every step) train the physically sliced model (its optimizer state sliced "
            "along) at the pruned model's speed; false: train the dense-shaped model with the pruned units masked."
        },
    )
    version: int = field(
        default=CONFIG_VERSION, metadata={"help": "Format version of the saved config (written by mdp_hf)."}
    )

    def __post_init__(self):
        if isinstance(self.prune, str):  # "channels,blocks" (a YAML scalar, a command line) is a list of kinds
            self.prune = [kind.strip() for kind in self.prune.split(",") if kind.strip()]
        self.group_sizes = _parse_mapping("group_sizes", _group_size_preset(self.group_sizes))
        self.min_keep = _parse_mapping("min_keep", self.min_keep)
        self.validate()

    # validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"PrunableConfig.{name}: {why}")

        _check_types(self, bad)

        if (self.budget_ms is None) == (self.budget_fraction is None):
            bad(
                "budget_ms/budget_fraction",
                "give exactly one: an absolute budget in ms, or a fraction of dense latency",
            )
        if self.budget_ms is not None and not self.budget_ms > 0:
            bad("budget_ms", f"must be > 0 ms, got {self.budget_ms}")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            bad("budget_fraction", f"must be in (0, 1], got {self.budget_fraction}")
        kinds = prunable_kinds()
        unknown = sorted(set(self.prune) - set(kinds))
        if unknown:
            bad("prune", f"unknown kinds {unknown}; choose from {list(kinds)}")
        if not self.prune:
            bad("prune", "is empty: nothing would be pruned")
        unknown = sorted(set(self.min_keep) - set(kinds[1:-1]))
        if unknown:
            bad("min_keep", f"unknown kinds {unknown}; choose from {list(kinds[1:-1])}")
        # group-size keys may also be dimension names or globs: they are checked against the model's space
        for name in ("group_sizes", "min_keep"):
            mapping = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in mapping.values()):
                bad(name, f"values must be integers >= 1, got {mapping}")
        if self.importance not in IMPORTANCE_KINDS:
            bad("importance", f"must be one of {IMPORTANCE_KINDS}, got {self.importance!r}")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.block_granularity not in ("sublayer", "layer"):
            bad("block_granularity", f"must be 'sublayer' or 'layer', got {self.block_granularity!r}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in (
            "accumulation_steps",
            "pruning_interval",
            "num_pruning_steps",
            "latency_batch_size",
            "latency_repeats",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, f"must be an integer >= 1, got {getattr(self, name)!r}")
        if self.schedule == "one_shot" and self.num_pruning_steps != 1:
            bad("num_pruning_steps", "one_shot prunes once; use schedule='iterative' for several steps")
        if self.latency_model not in LATENCY_MODELS:
            bad("latency_model", f"must be one of {LATENCY_MODELS}, got {self.latency_model!r}")
        if self.latency_image_size is not None and self.latency_image_size < 1:
            bad("latency_image_size", f"must be >= 1 or None, got {self.latency_image_size}")
        if self.latency_subgrid is not None and self.latency_subgrid < 1:
            bad("latency_subgrid", f"must be >= 1 or None, got {self.latency_subgrid}")
        if self.latency_num_threads is not None and self.latency_num_threads < 1:
            bad("latency_num_threads", f"must be >= 1 or None, got {self.latency_num_threads}")
        if self.latency_dtype not in ("float32", "float16", "bfloat16"):
            bad("latency_dtype", f"must be float32, float16 or bfloat16, got {self.latency_dtype!r}")
        if not isinstance(self.verify_latency, bool):
            bad("verify_latency", f"must be True or False, got {self.verify_latency!r}")
        if not 0 <= self.latency_tolerance < 1:
            bad("latency_tolerance", f"must be in [0, 1) (a fraction of the budget), got {self.latency_tolerance!r}")
        if not isinstance(self.verify_latency_rounds, int) or self.verify_latency_rounds < 0:
            bad("verify_latency_rounds", f"must be an integer >= 0, got {self.verify_latency_rounds!r}")
        if not self.verify_latency_max_seconds > 0:
            bad("verify_latency_max_seconds", f"must be > 0 seconds, got {self.verify_latency_max_seconds!r}")
        if self.solver_time_limit_s is not None and not self.solver_time_limit_s > 0:
            bad("solver_time_limit_s", f"must be > 0 or None, got {self.solver_time_limit_s}")
        if self.version > CONFIG_VERSION:
            bad("version", f"{self.version} is newer than this mdp_hf understands ({CONFIG_VERSION}); upgrade mdp_hf")

    # schedule ------------------------------------------------------------------------------------------
    def pruning_steps(self) -> list[int]:
        """Optimizer steps (global_step values) at which pruning happens."""
        return [self.accumulation_steps + t * self.pruning_interval for t in range(self.num_pruning_steps)]

    def step_budget(self, step_index: int, dense_ms: float, final_ms: float) -> float:
        """Budget of pruning step t (1-based): exp((t/T) ln final + (1 - t/T) ln dense) (paper's schedule)."""
        import math

        fraction = step_index / self.num_pruning_steps
        return math.exp(fraction * math.log(final_ms) + (1 - fraction) * math.log(dense_ms))

    def timing_settings(self):
        """The timing protocol of this run (``mdp_hf.latency.TimingSettings``): tables built for it and
        measurements of its models use the same settings."""
        from .latency.timing import TimingSettings

        return TimingSettings(
            device=self.latency_device,
            batch_size=self.latency_batch_size,
            image_size=self.latency_image_size,
            dtype=self.latency_dtype,
            threads=self.latency_num_threads,
            repeats=self.latency_repeats,
        )

    # serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())
        return path

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload pruning config",
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        blocking: bool = True,
    ):
        """Upload this config as ``pruning_config.json`` to ``repo_id`` (created if needed, and the branch
        ``revision``), as peft's configs do; ``from_pretrained(repo_id, revision=...)`` reads it back. Returns the
        commit URL (``CommitInfo``), or with ``blocking=False`` a ``Future`` of it."""
        from .hub import hub_api_for

        return hub_api_for(repo_id, token, private, revision).upload_file(
            path_or_fileobj=self.to_json_string().encode("utf-8"),
            path_in_repo=CONFIG_NAME,
            repo_id=repo_id,
            commit_message=commit_message,
            revision=revision,
            run_as_future=not blocking,
        )

    @classmethod
    def from_dict(cls, data: dict) -> PrunableConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("PrunableConfig: ignoring unknown keys %s (written by another mdp_hf version?)", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs) -> PrunableConfig:
        """Load from a folder holding pruning_config.json, the file itself, or a Hub repo id. A local path that
        does not exist is a FileNotFoundError saying so (it is never looked up on the Hub)."""
        from .paths import check_local_path

        path = str(path_or_repo_id)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path_or_repo_id} has no {CONFIG_NAME}: it is not a folder saved by "
                    "PrunableConfig.save_pretrained (or MDPTrainer.save_model); give that folder or the file itself"
                )
        elif not os.path.isfile(path):
            check_local_path(path, "PrunableConfig file or folder")
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(path, CONFIG_NAME, **hub_kwargs)
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a PrunableConfig is a JSON object, got a {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


#: the type every field must have (checked before any value is compared, so a wrong type names its field)
_NUMBER, _INT, _BOOL, _STR = (numbers.Real,), (numbers.Integral,), (bool,), (str,)
_FIELD_TYPES = {
    "budget_ms": (_NUMBER, True),
    "budget_fraction": (_NUMBER, True),
    "importance": (_STR, False),
    "ema_decay": (_NUMBER, False),
    "monotone": (_BOOL, False),
    "block_granularity": (_STR, False),
    "prune_stem": (_BOOL, False),
    "slice_after_pruning": (_BOOL, False),
    "schedule": (_STR, False),
    "latency_model": (_STR, False),
    "latency_table": ((str, os.PathLike), True),
    "latency_device": (_STR, False),
    "latency_num_threads": (_INT, True),
    "latency_dtype": (_STR, False),
    "latency_image_size": (_INT, True),
    "latency_subgrid": (_INT, True),
    "latency_allow_mismatch": (_BOOL, False),
    "solver_backend": (_STR, False),
    "solver_time_limit_s": (_NUMBER, True),
    "dump_problems_dir": ((str, os.PathLike), True),
    "version": (_INT, False),
}
_TYPE_NAMES = {_NUMBER: "a number", _INT: "an integer", _BOOL: "true or false", _STR: "a string"}


def _check_types(config, bad) -> None:
    for name, (types, optional) in _FIELD_TYPES.items():
        value = getattr(config, name)
        if value is None and optional:
            continue
        is_bool = isinstance(value, bool)
        if not isinstance(value, types) or (is_bool and types is not _BOOL):
            expected = _TYPE_NAMES.get(types, "a path")
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            bad(name, f"must be {expected}{' or None' if optional else ''}, got {shown} ({type(value).__name__})")
    if not isinstance(config.prune, (list, tuple)) or not all(isinstance(k, str) for k in config.prune):
        bad("prune", f"must be a list of kinds such as ['all'] or ['channels', 'blocks'], got {config.prune!r}")
    config.prune = list(config.prune)


def _group_size_preset(value):
    """A preset name -> its mapping (copied); anything else unchanged."""
    if isinstance(value, str) and value.strip() and not value.strip().startswith("{") and "=" not in value:
        from .presets import GROUP_SIZE_PRESETS

        if value.strip() not in GROUP_SIZE_PRESETS:
            raise ValueError(
                f"PrunableConfig.group_sizes: unknown preset {value.strip()!r}; presets: {sorted(GROUP_SIZE_PRESETS)} "
                "(or give a mapping such as embed=16,mlp=32)"
            )
        return dict(GROUP_SIZE_PRESETS[value.strip()])
    return value


def _parse_mapping(name: str, value) -> dict[str, int]:
    """A per-kind mapping from a dict, a JSON object string, or "kind=int,kind=int"."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = str(value).strip()
    if not text:
        return {}
    try:
        if text.startswith("{"):
            parsed = json.loads(text)
        else:
            parsed = {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(","))}
    except (ValueError, json.JSONDecodeError) as error:
        raise ValueError(
            f"PrunableConfig.{name}: cannot parse {text!r}; write '{{\"embed\": 16}}' or embed=16,mlp=32"
        ) from error
    if not isinstance(parsed, dict):
        raise ValueError(f"PrunableConfig.{name}: expected a mapping kind -> int, got {text!r}")
    return parsed
