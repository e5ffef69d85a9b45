"""Saving and loading pruned models: safetensors + config + modeling files, atomically; Hub upload.

A pruned model is saved with transformers' own ``save_pretrained`` (safetensors, never pickle); the
pruned-model classes are registered for their Auto classes, so their source files and ``auto_map`` are
written beside the weights and ``trust_remote_code=True`` loads them without mdp_hf installed. The model card is
a ``huggingface_hub.ModelCard`` (metadata from ``ModelCardData``, the MDP figures as its body); uploads create the
repo and branch they need and never send checkpoints or pickles.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
from transformers.utils import cached_file

from .adapters import get_adapter, registered_families

PUSH_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "_*", "runs/**", "*.pt", "*.pth", "*.pkl", "*.bin"]


class CheckpointError(ValueError):
    """A saved pruned model is unreadable or its weights do not match its config."""


def save_pruned_model(
    model,
    save_directory: str | os.PathLike,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = True,
    image_processor=None,
) -> Path:
    """Write ``model`` (an mdp_* model) into ``save_directory``, all files or none.

    ``image_processor`` (an HF image processor) is saved with it so ``pipeline`` works; without one, a
    model pruned from timm gets one built from the timm preprocessing its config records.

    Everything is written to a temporary sibling folder first and each file is then renamed into
    place, so an error half-way (disk full, bad model) never leaves a half-written or mixed checkpoint
    behind. Other files in the folder (checkpoints, latency tables, logs) are left alone.
    ``extra_files`` maps file names to text (pruning_config.json, README.md, reports).
    """
    target = Path(save_directory)
    if (target / "model.safetensors").exists() and not overwrite:
        raise FileExistsError(f"{target} already holds a model; pass overwrite=True or choose another directory")
    formats = {f.pruned_classes[0].model_type: f.pruned_classes[0] for f in registered_families() if f.pruned_classes}
    if not isinstance(model.config, tuple(formats.values())):
        raise ValueError(
            f"save_pruned_model expects a sliced model ({' / '.join(formats)}), got model_type "
            f"{model.config.model_type!r}; call mdp_hf.slice_model(model, space, choice) first"
        )
    expected = get_adapter(model).expected_num_parameters(model.config)
    actual = sum(p.numel() for p in model.parameters())
    if expected != actual:
        raise ValueError(f"refusing to save: the model has {actual} parameters but its config implies {expected}")
    # every Auto class of the format, not only the saved class's: AutoModel loads the base model of a classifier
    model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}), **_auto_map(model)}
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)  # safetensors + config.json + modeling files + auto_map
        image_processor = image_processor or image_processor_from_preprocessing(model.config)
        if image_processor is not None:
            image_processor.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        _check_saved(staging)
        for stale in target.glob("*_mdp_*.py"):  # modeling files of a previously saved other family
            stale.unlink()
        for path in staging.iterdir():
            os.replace(path, target / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _auto_map(model) -> dict[str, str]:
    """``auto_map`` entries (Auto class -> ``module.Class``) of the format's model classes that ``model``'s
    modeling file defines: AutoModel -> the base model, AutoModelForImageClassification -> the classifier."""
    family = next(
        f for f in registered_families() if f.pruned_classes and isinstance(model.config, f.pruned_classes[0])
    )
    module = type(model).__module__
    return {
        cls._auto_class: f"{module.rsplit('.', 1)[-1]}.{cls.__name__}"
        for cls in family.pruned_classes[1:]
        if getattr(cls, "_auto_class", None) and cls.__module__ == module
    }


_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}


def image_processor_from_preprocessing(config):
    """An HF image processor reproducing timm's eval transform (resize the short side to size / crop_pct,
    centre crop, normalise) from ``config.preprocessing`` (recorded when a timm model is sliced); None if the
    config records none. ``ConvNextImageProcessor`` is transformers' processor with exactly that crop_pct rule."""
    pre = getattr(config, "preprocessing", None)
    if not pre:
        return None
    from transformers import ConvNextImageProcessor

    size = int(pre["input_size"][-1])
    interpolation = pre.get("interpolation", "bicubic")
    if interpolation not in _RESAMPLE:
        raise ValueError(f"config.preprocessing: unknown interpolation {interpolation!r}; one of {sorted(_RESAMPLE)}")
    return ConvNextImageProcessor(
        size={"shortest_edge": size},
        crop_pct=float(pre.get("crop_pct") or 1.0),
        resample=_RESAMPLE[interpolation],
        image_mean=list(pre["mean"]),
        image_std=list(pre["std"]),
    )


def _check_saved(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    missing = [name for name in ("model.safetensors",) if not (folder / name).exists()]
    if missing or "auto_map" not in config:
        raise RuntimeError(f"save_pretrained did not write {missing or 'auto_map'} in {folder}")


def _check_shapes_against_config(path_or_repo_id, config, auto_cls, kwargs) -> None:
    """Compare the safetensors header with the shapes config.json implies, before any weight is read."""
    weights_file = cached_file(
        path_or_repo_id,
        "model.safetensors",
        **{k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir")},
    )
    with torch.device("meta"):
        skeleton = auto_cls.from_config(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    with safe_open(weights_file, framework="pt") as handle:
        stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    mismatched = [
        f"{n}: file {stored[n]} vs config {expected[n]}" for n in expected if n in stored and stored[n] != expected[n]
    ]
    missing = sorted(set(expected) - set(stored))
    if mismatched or missing:
        raise CheckpointError(
            f"weights in {path_or_repo_id} do not match its config.json: "
            + "; ".join(mismatched[:3] + [f"missing {m}" for m in missing[:3]])
            + f" ({len(mismatched)} mismatched, {len(missing)} missing). The checkpoint is inconsistent — "
            "re-export it from the pruning run rather than editing config.json by hand."
        )


def load_pruned_model(path_or_repo_id: str | os.PathLike, **kwargs):
    """Load a pruned model (local folder or Hub id) and check that its weights match its structure.

    Raises CheckpointError with the reason when the file is corrupt or shapes disagree with config.json.
    """
    try:
        config = AutoConfig.from_pretrained(path_or_repo_id, **kwargs)
        auto_cls = (
            AutoModelForImageClassification
            if config.architectures and "ForImageClassification" in config.architectures[0]
            else AutoModel
        )
        _check_shapes_against_config(path_or_repo_id, config, auto_cls, kwargs)
        model, info = auto_cls.from_pretrained(path_or_repo_id, config=config, output_loading_info=True, **kwargs)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"cannot load pruned model from {path_or_repo_id}: {error}") from error
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(
            f"weights in {path_or_repo_id} do not match its config.json ({problems}); the checkpoint is "
            "inconsistent — re-export it from the pruning run rather than editing config.json by hand"
        )
    expected = get_adapter(model).expected_num_parameters(model.config)
    actual = sum(p.numel() for p in model.parameters())
    if expected != actual:
        raise CheckpointError(f"{path_or_repo_id}: {actual} parameters loaded but config.json implies {expected}")
    return model.eval()


def _preprocessing_line(pre: dict | None) -> str:
    if not pre:
        return "Preprocessing: the source model's own image processor (saved with the model when the run had one)."
    return (
        f"Preprocessing (the source's pretrained config, saved as `preprocessor_config.json`): input size "
        f"{list(pre.get('input_size', []))}, mean {list(pre.get('mean', []))}, std {list(pre.get('std', []))}, "
        f"{pre.get('interpolation', 'bicubic')} interpolation, crop_pct {pre.get('crop_pct')}."
    )


CARD_TAGS = ("mdp_hf", "pruning", "structured-pruning", "latency-constrained")


def hub_repo_id(name: str | None) -> str | None:
    """``name`` when it can only mean a Hub repo id ("org/model"), None for a local path, an empty name or
    anything the Hub would refuse (a card's ``base_model`` must name a Hub model, never a folder)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or os.path.exists(name) or os.path.isabs(name) or name.startswith("."):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def model_card(
    report: dict,
    repo_or_path: str,
    *,
    model_name: str | None = None,
    base_model: str | None = None,
    pipeline_tag: str = "image-classification",
    tags: str | list[str] | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    datasets: str | list[str] | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    dataset_split: str | None = None,
    existing=None,
):
    """The model card (a ``huggingface_hub.ModelCard``) of a pruned model: the MDP figures of ``report`` as the
    body (template ``mdp_hf.hub_cards/pruned_model.md``) and Hub metadata written by ``ModelCardData``:
    ``library_name``, ``pipeline_tag``, tags, ``base_model`` (only a Hub repo id: ``base_model`` or
    ``report["base_model_id"]``), datasets, and a ``model-index`` entry with the evaluated accuracy.

    ``existing``: the ``ModelCardData`` of a card already in the folder: its tags are kept (merged with
    ``tags``), its datasets, language, license and model name unless given here.
    """
    from importlib.resources import files
    from string import Template

    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .reporting import kept_dims_table

    template = Template(files("mdp_hf.hub_cards").joinpath("pruned_model.md").read_text(encoding="utf-8"))

    def fmt(value, digits=4):
        if value is None:
            return "n/a"
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    solver = report.get("solver", {})
    title = f"{report['base_model']} pruned to {fmt(report['budget_ms'])} ms with MDP"
    fields = {
        "title": title,
        "base_model": report["base_model"],
        "latency_model": report.get("latency_model", "table"),
        "device_name": report.get("device_name") or report["device"],
        "kept_table": kept_dims_table(report.get("kept_dims", []), report.get("removed_blocks", [])),
        "repo_or_path": repo_or_path,
        "pipeline_tag": pipeline_tag,
        "solver_backend": solver.get("backend", "n/a"),
        "solver_status": solver.get("status", "n/a"),
        "solver_gap": fmt(solver.get("gap")),
        "solver_time_s": fmt(solver.get("solve_time_s"), 3),
        "dense_predicted_ms": fmt(report.get("dense_predicted_latency_ms")),
        "preprocessing": _preprocessing_line(report.get("preprocessing")),
    }
    for key in (
        "dense_latency_ms",
        "pruned_latency_ms",
        "predicted_latency_ms",
        "budget_ms",
        "dense_params",
        "pruned_params",
        "dense_accuracy",
        "pruned_accuracy",
        "device",
        "batch_size",
        "image_size",
        "dtype",
        "num_threads",
    ):
        fields[key] = fmt(report.get(key))
    body = template.substitute(fields)

    old = existing.to_dict() if existing is not None else {}
    all_tags = list(dict.fromkeys([*CARD_TAGS, *_as_list(old.get("tags")), *_as_list(tags)]))
    all_datasets = _as_list(datasets) or _as_list(old.get("datasets")) or None
    model_name = model_name or old.get("model_name") or os.path.basename(os.path.normpath(repo_or_path)) or title
    eval_results = None
    if report.get("pruned_accuracy") is not None:
        dataset_id = (all_datasets or [None])[0] or dataset_name or "custom"
        eval_results = [
            EvalResult(
                task_type=pipeline_tag,
                dataset_type=dataset_id,
                dataset_name=dataset_name or dataset_id,
                dataset_config=dataset_config,
                dataset_split=dataset_split,
                metric_type="accuracy",
                metric_name="Accuracy",
                metric_value=float(report["pruned_accuracy"]),
            )
        ]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        base_model=hub_repo_id(base_model) or hub_repo_id(report.get("base_model_id")),
        tags=all_tags,
        language=language or old.get("language"),
        license=license or old.get("license"),
        datasets=all_datasets,
        model_name=model_name,
        eval_results=eval_results,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def hub_api_for(repo_id: str, token: str | None = None, private: bool | None = None, revision: str | None = None):
    """An ``HfApi`` for ``token`` after creating ``repo_id`` and its branch ``revision`` where they are missing."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "MDP pruned model",
    revision: str | None = None,
    blocking: bool = True,
):
    """Create ``repo_id`` (and branch ``revision``) if needed and upload ``folder`` (a saved pruned model) as one
    commit. Returns the commit URL (a ``CommitInfo``, a str), or with ``blocking=False`` a ``Future`` of it."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not a saved pruned model (config.json / model.safetensors missing)")
    api = hub_api_for(repo_id, token, private, revision)
    # A run's output folder also holds Trainer checkpoints (full-size weights, pickled optimizer/RNG state)
    # and logs: only the pruned model's own files go up.
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        commit_message=commit_message,
        ignore_patterns=PUSH_IGNORE_PATTERNS,
        revision=revision,
        run_as_future=not blocking,
    )
