"""``python -m workbench bench toyworld``: toy-world drawing speed (images per second)."""

from __future__ import annotations

import argparse
import statistics
import time

from workbench.runtime import describe_machine
from workbench.toyworld import ToyWorld


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench bench toyworld")
    parser.add_argument("--n", type=int, default=5000, help="images per draw")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"machine: {describe_machine()}")
    print(f"{'image size':>10s} {'images':>7s} {'median s':>9s} {'images/s':>10s}")
    for size in (32, 64, 128):
        world = ToyWorld(image_size=size)
        world.sample(64, 0)  # warm-up
        times = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            world.sample(args.n, repeat)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(f"{size:>10d} {args.n:>7d} {median:>9.3f} {args.n / median:>10.0f}")


if __name__ == "__main__":
    main()
