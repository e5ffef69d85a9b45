"""`mdp-hf` command line: one sub-command per pipeline stage.

Sub-commands are imported lazily so `mdp-hf solve` never imports torch.
"""

import argparse
import importlib
import sys

# name -> (module, help). Each module exposes `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS = {
    "solve": ("mdp_hf.solver.cli", "solve a saved pruning problem (JSON) and print its certificate"),
    "latency": ("mdp_hf.latency.cli", "build, inspect, share latency tables; predict and measure latency"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mdp-hf", description="Latency-constrained structural pruning (MDP)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
