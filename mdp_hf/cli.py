"""`mdp-hf` command line: one sub-command per pipeline stage.

Only the chosen sub-command's module is imported (and only after argument parsing has picked it), so
`mdp-hf solve` imports numpy and the solver, never torch or transformers; `mdp-hf --help` imports nothing.
"""

import argparse
import importlib
import sys

# name -> (module, help). Each module exposes `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS = {
    "solve": ("mdp_hf.solver.cli", "solve a saved pruning problem (JSON) and print its certificate"),
    "latency": ("mdp_hf.latency.cli", "build, inspect, share latency tables; predict and measure latency"),
}


def _chosen(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first argument that is not an option), if any."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="mdp-hf", description="Latency-constrained structural pruning (MDP)")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = _chosen(argv)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # the other sub-commands are never imported
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
