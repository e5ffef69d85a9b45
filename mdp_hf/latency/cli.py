"""`mdp-hf latency ...`: build, inspect, use and share latency tables.

    mdp-hf latency build MODEL -o table.json [--device cpu] [--batch-size 1] [--image-size 224]
                         [--dtype float32] [--threads 1] [--attn-implementation sdpa]
                         [--group-sizes embed=16,heads=1,qk=2,v=2,mlp=32] [--subgrid 2 | embed=2,qk=4]
                         [--repeats 15] [--warmup 3] [--validate 8] [--no-calibrate] [--overwrite]
    mdp-hf latency show table.json [--allow-mismatch]
    mdp-hf latency predict table.json PRUNED_MODEL_DIR [--model-type table|linear|flops] [--allow-mismatch]
    mdp-hf latency measure MODEL [--batch-size 1] [--threads 1] [--repeats 30]
    mdp-hf latency push table.json REPO_ID [--filename latency_table.json]
    mdp-hf latency pull REPO_ID -o table.json [--filename latency_table.json] [--revision main]

MODEL is a local directory with config.json (weights are not needed: random weights time the same),
or a preset that a registered family offers (ModelFamily.presets; e.g. deit-small, resnet50, timm-deit-small,
timm-resnet50d, mobilenet-v2-1.0, convnext-tiny; an unknown name lists them all).
A build writes the table after every chunk of cells; running the same command again resumes it.

Bad input never ends in a traceback: one line on stderr names the file, flag or model and the problem.
Exit codes (as ``mdp-hf solve``, docs/problem_format.md#exit-codes): 0 done, 2 invalid input (a file or folder
that does not exist, a damaged or invalid table, a table that does not fit the model, a bad option value),
7 the Hugging Face Hub could not be reached or does not hold the repository / file, 130 interrupted (a build
resumes when the same command runs again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_INVALID_INPUT = 2
EXIT_HUB = 7
EXIT_INTERRUPTED = 130


class CLIInputError(ValueError):
    """Bad input on the command line: printed as one line, exit code 2."""


def presets() -> dict:
    """Named model shapes every registered family offers (``ModelFamily.presets``): name -> builder."""
    from ..adapters import registered_families

    return {name: builder for family in registered_families() for name, builder in family.presets.items()}


def _model_spec_error(spec: str, available: dict) -> CLIInputError:
    from ..paths import missing_path_error

    missing = missing_path_error(spec, "model folder")
    if missing is not None:
        return CLIInputError(str(missing))
    if os.path.isdir(spec):
        return CLIInputError(f"model folder {spec} has no config.json (give a saved model's folder, or a preset)")
    return CLIInputError(f"{spec!r} is neither a preset ({', '.join(available)}) nor a folder with config.json")


def _read_config(spec: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec)
    except (OSError, ValueError, KeyError) as error:
        raise CLIInputError(f"cannot read {Path(spec, 'config.json')}: {str(error).splitlines()[0]}") from None


def load_config(spec: str):
    """What ``predict`` reads widths from: a preset's model skeleton on the meta device, or a directory's config."""
    import torch

    available = presets()
    if spec in available:
        with torch.device("meta"):
            return available[spec]()
    if Path(spec, "config.json").exists():
        return _read_config(spec)
    raise _model_spec_error(spec, available)


def load_model(spec: str):
    """A model for timing: a preset name, or a directory with config.json (random weights)."""
    import torch
    import transformers

    from ..adapters import TASK_AUTO_CLASSES, task_of

    available = presets()
    torch.manual_seed(0)
    if spec in available:
        return available[spec]().eval()
    if Path(spec, "config.json").exists():
        config = _read_config(spec)
        head = getattr(transformers, TASK_AUTO_CLASSES[task_of(config.model_type)])  # its family's task
        return head.from_config(config).eval()
    raise _model_spec_error(spec, available)


def _key_values(text: str | None, cast=int, flag: str = "--group-sizes") -> dict | None:
    if not text:
        return None
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise CLIInputError(f"{flag}: expected KIND=VALUE pairs separated by commas, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = cast(value)
        except ValueError:
            raise CLIInputError(f"{flag}: {key.strip()}={value!r} is not an integer") from None
        if out[key.strip()] < 1:
            raise CLIInputError(f"{flag}: {key.strip()}={value} must be >= 1")
    return out


def _subgrid(text: str | None):
    if text is None:
        return None
    return int(text) if text.isdigit() else _key_values(text, flag="--subgrid")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="latency_command", required=True)

    def timing_args(p, repeats=15):
        p.add_argument("--device", default="cpu")
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument("--image-size", type=int, default=None, help="default: the model config's image size")
        p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
        p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads); 0 = torch default")
        p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--repeats", type=int, default=repeats)
        p.add_argument("--statistic", default="median", choices=["median", "min"])

    b = sub.add_parser("build", help="measure a latency table for a model")
    b.add_argument("model", help="directory with config.json, or a family preset (e.g. deit-small, resnet50)")
    b.add_argument("-o", "--output", required=True, help="table file (JSON); resumed if it exists")
    timing_args(b)
    b.add_argument("--group-sizes", default=None, help="per dimension kind, e.g. embed=16,heads=1,qk=2,v=2,mlp=32")
    b.add_argument("--min-keep", default=None, help="per dimension kind, e.g. heads=1")
    b.add_argument(
        "--subgrid",
        default=None,
        help="measure every k-th choice (int or per kind, e.g. embed=2,qk=4); the rest is interpolated",
    )
    b.add_argument("--validate", type=int, default=0, help="also time N random off-sub-grid cells per grid")
    b.add_argument("--no-calibrate", action="store_true", help="skip timing the dense model end to end")
    b.add_argument(
        "--recheck",
        type=float,
        default=0.15,
        help="re-time cells this far (relative) from their neighbours' median, keeping the faster timing; 0 disables",
    )
    b.add_argument("--chunk-size", type=int, default=64)
    b.add_argument("--overwrite", action="store_true", help="start from scratch instead of resuming")
    b.add_argument("--no-progress", action="store_true")

    allow = dict(action="store_true", help="use a table whose reference or costs look wrong (warns instead)")
    s = sub.add_parser("show", help="print a table's metadata and terms")
    s.add_argument("table")
    s.add_argument("--allow-mismatch", **allow)

    p = sub.add_parser("predict", help="predict the latency of a (pruned) model from a table")
    p.add_argument("table")
    p.add_argument("model", help="directory with config.json (e.g. a saved pruned model) or a preset")
    p.add_argument("--model-type", default="table", choices=["table", "linear", "flops", "params"])
    p.add_argument("--calibration", default="scale", choices=["scale", "offset", "none"])
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--allow-mismatch", **allow)

    m = sub.add_parser("measure", help="time a model end to end with the table protocol")
    m.add_argument("model")
    timing_args(m, repeats=30)

    u = sub.add_parser("push", help="upload a table to a Hub repository (or copy it into a local directory)")
    u.add_argument("table")
    u.add_argument("repo_id")
    u.add_argument("--filename", default="latency_table.json")
    u.add_argument("--token", default=None)

    d = sub.add_parser("pull", help="download a table from a Hub repository (or a local directory)")
    d.add_argument("repo_id")
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--filename", default="latency_table.json")
    d.add_argument("--revision", default=None)


def _settings(args):
    from .timing import TimingSettings

    return TimingSettings(
        device=args.device,
        batch_size=args.batch_size,
        image_size=args.image_size,
        dtype=args.dtype,
        threads=args.threads or None,
        attn_implementation=args.attn_implementation,
        warmup=args.warmup,
        repeats=args.repeats,
        statistic=args.statistic,
    )


def run(args) -> int:
    """Run a latency sub-command; bad input is one line on stderr and an exit code (module doc)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from ..adapters import PruningSpaceError
    from .table import LatencyTableError

    def error(message: str, code: int) -> int:
        print(f"error: {message}", file=sys.stderr)
        return code

    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.latency_command == "build":
            return error(f"interrupted; run the same command again to resume {args.output}", EXIT_INTERRUPTED)
        return error("interrupted", EXIT_INTERRUPTED)
    except (CLIInputError, LatencyTableError, PruningSpaceError, HFValidationError) as e:
        return error(str(e), EXIT_INVALID_INPUT)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        return error(str(e), EXIT_INVALID_INPUT)
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError) as e:
        return error(f"Hugging Face Hub: {str(e).splitlines()[0]}", EXIT_HUB)


def _run(args) -> int:
    from . import (
        FlopsLatencyModel,
        LatencyTable,
        LinearLatencyModel,
        TableLatencyModel,
        build_table,
        interpolation_report,
    )
    from .table import pull_table, push_table

    cmd = args.latency_command
    if cmd == "build":
        if os.path.isdir(args.output):
            raise CLIInputError(f"--output {args.output} is a directory; give the table's file name")
        model = load_model(args.model)
        table = build_table(
            model,
            args.output,
            settings=_settings(args),
            group_sizes=_key_values(args.group_sizes),
            min_keep=_key_values(args.min_keep, flag="--min-keep"),
            subgrid=_subgrid(args.subgrid),
            validate=args.validate,
            calibrate=not args.no_calibrate,
            recheck=args.recheck or None,
            chunk_size=args.chunk_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        lm = TableLatencyModel(table)
        print(
            f"wrote {args.output}: {len(table.tables)} grids, {table.num_measured}/{table.num_cells} cells measured, "
            f"{table.metadata['build_seconds']:.0f} s; dense predicted {lm.dense_ms():.3f} ms"
            + (f", measured {table.reference['dense_measured_ms']:.3f} ms" if table.reference else "")
        )
        report = interpolation_report(table)
        if report.get("cells"):
            print(
                f"interpolation error at {report['cells']} off-grid cells: mean {report['mean_abs_pct']:.1f}%, max {report['max_abs_pct']:.1f}%"
            )
        return 0
    if cmd == "show":
        table = LatencyTable.load(args.table, allow_mismatch=args.allow_mismatch)
        print(json.dumps(table.metadata, indent=2, default=str))
        print(f"reference: {table.reference}")
        print(
            f"{len(table.tables)} grids ({table.num_measured}/{table.num_cells} sub-grid cells measured, complete={table.complete}):"
        )
        for t in table.tables.values():
            print(f"  {t.key}: shape {t.shape}, measured {int(t.measured.sum())}")
        print(f"{len(table.terms)} terms; first: " + ", ".join(f"{t.name}{t.dims}" for t in table.terms[:4]))
        return 0
    if cmd == "predict":
        allow = args.allow_mismatch
        table = LatencyTable.load(args.table, allow_mismatch=allow)
        model = load_config(args.model)  # widths come from the config; no weights needed
        if args.model_type == "table":
            lm = TableLatencyModel(table, calibration=args.calibration, allow_mismatch=allow)
        elif args.model_type == "linear":
            lm = LinearLatencyModel(table, calibration=args.calibration, allow_mismatch=allow)
        else:
            lm = FlopsLatencyModel(table, metric=args.model_type, allow_mismatch=allow)
        if args.breakdown:
            for name, ms in lm.breakdown(model):
                print(f"  {name:<48} {ms:9.4f} ms")
        print(f"{lm.predict(model):.4f} ms predicted ({lm.name} model; dense {lm.dense_ms():.4f} ms)")
        return 0
    if cmd == "measure":
        from .timing import measure_latency

        result = measure_latency(load_model(args.model), _settings(args))
        print(
            f"{result.ms:.4f} ms ({args.statistic} of {args.repeats}; min {result.min_ms:.4f}, spread {100 * result.spread:.1f}%)"
        )
        return 0
    if cmd == "push":
        if not os.path.isfile(args.table):
            raise FileNotFoundError(f"latency table {args.table} does not exist")
        print(f"uploaded to {push_table(args.table, args.repo_id, filename=args.filename, token=args.token)}")
        return 0
    if cmd == "pull":
        table = pull_table(args.repo_id, filename=args.filename, revision=args.revision)
        table.save(args.output)
        print(f"wrote {args.output}")
        return 0
    raise CLIInputError(f"unknown latency command {cmd!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="mdp-hf latency")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
