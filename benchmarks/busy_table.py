"""What a busy machine does to a latency table: the embedded DeiT's table (recipes/prune_deit.py's model, group
sizes and timing settings) built alone or beside N processes that each train a small MLP on one torch thread
without pause, as other tests' workers and the ranks they start do.

    python benchmarks/busy_table.py --busy 0     # alone
    python benchmarks/busy_table.py --busy 2     # beside two busy processes (3 on a 2-core machine)

Prints the dense reference the build timed (and its inter-quartile spread), the warnings the table raises on
validation, and for each removable block its least predicted cost over every width combination, as a fraction of
its dense cost (LatencyTable.block_floors): a cost well below zero makes keeping a block look free. Run it with
nothing else on the machine; the busy processes are its own. Results: docs/testing.md.
"""

import argparse
import os
import subprocess
import sys
import time
import warnings

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))

from prune_deit import DEFAULTS, TINY_DEIT  # noqa: E402

from mdp_hf.config import PrunableConfig  # noqa: E402
from mdp_hf.latency import build_table  # noqa: E402
from mdp_hf.surgery import build_space  # noqa: E402

BUSY = """
import torch
torch.set_num_threads(1)
model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
optimizer = torch.optim.SGD(model.parameters(), 0.01)
while True:
    loss = model(torch.randn(256, 512)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=0, help="busy processes beside the build")
    parser.add_argument("--output", default=None, help="write the table here (JSON)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = transformers.DeiTForImageClassification(TINY_DEIT).eval()
    space = build_space(model, DEFAULTS["group_sizes"])
    recipe = PrunableConfig(
        budget_fraction=DEFAULTS["budget_fraction"],
        latency_batch_size=DEFAULTS["latency_batch_size"],
        latency_image_size=TINY_DEIT.image_size,
    )
    settings = recipe.timing_settings()  # the recipe's timing protocol (CPU, 1 thread, its batch and repeats)
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.busy)]
    try:
        time.sleep(2 if busy else 0)  # let them start
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table = build_table(model, args.output, space=space, settings=settings, progress=False)
            table.validate("table")
    finally:
        for process in busy:
            process.kill()
    reference = table.reference
    print(
        f"machine: {os.uname().machine}, {os.cpu_count()} CPUs; torch {torch.__version__}; busy processes {args.busy}"
    )
    print(f"build {table.metadata['build_seconds']:.0f} s; dense reference {reference['dense_measured_ms']:.2f} ms, "
          f"inter-quartile spread {100 * reference['dense_spread']:.0f}%")  # fmt: skip
    for warning in caught:
        print("warning:", str(warning.message)[:240])
    for block, (least, dense, widths) in table.block_floors().items():
        print(f"{block}: least {least:.3f} ms = {100 * least / dense:+.0f}% of its dense {dense:.3f} ms at {widths}")


if __name__ == "__main__":
    main()
