"""Command line: ``python -m workbench {zoo,reproduce,bench,distrifusion} ...``.

python -m workbench zoo list                    # the zoo, and what is shipped in data/
python -m workbench zoo train toy-t2i           # train (or resume) one model
python -m workbench zoo load toyclip            # load one and describe it
python -m workbench zoo evaluate [--quick]      # the zoo's quality figures
python -m workbench reproduce [--quick] [--only NAME ...] [--out DIR]  # DIR/NAME.md + DIR/reproduce.md
python -m workbench bench NAME [ARGS]           # benchmarks: toyworld, timesteps, distrifusion
torchrun --nproc_per_node=2 -m workbench distrifusion ARGS
python -m workbench debias {train-classifier,train-adp,evaluate,sweep}   # paper 3 on the toy world
python -m workbench sadm {finetune,finetunes,points,evaluate,cost}   # paper 5 on the toy world
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from workbench.runtime import quick_mode, steady_cpu_allocator

BENCHMARKS = ("toyworld", "timesteps", "distrifusion")


def _zoo(args: argparse.Namespace) -> None:
    from workbench import zoo

    if args.action == "list":
        for name, entry in zoo.ZOO.items():
            folder = zoo.DATA_DIR / name
            shipped = "shipped" if folder.is_dir() else "not trained"
            print(f"{name:14s} {shipped:12s} {entry.description}")
    elif args.action == "train":
        options = {} if args.vision_steps is None else {"vision_steps": args.vision_steps}
        options |= {} if args.offset is None else {"offset": args.offset}
        path = zoo.train(args.name, steps=args.steps, seed=args.seed, **options)
        print(f"saved {args.name} to {path}")
    elif args.action == "load":
        model = zoo.load(args.name)
        modules = getattr(model, "components", {"model": model})
        for key, module in modules.items():
            count = sum(p.numel() for p in module.parameters()) if hasattr(module, "parameters") else 0
            print(f"{key:14s} {type(module).__name__:32s} {count / 1e6:7.2f} M parameters")
        record = zoo.DATA_DIR / args.name / "training.json"
        if record.is_file():
            print(json.dumps(json.loads(record.read_text()), indent=2))
    elif args.action == "evaluate":
        from workbench import zoo_report

        names = [args.name] if args.name else list(zoo_report.EVALUATED_MODELS)
        for name in names:
            for key, value in zoo_report.evaluate(name, quick=args.quick or quick_mode()).items():
                print(f"{name:12s} {key:48s} {value}")


def _reproduce(args: argparse.Namespace) -> None:
    from workbench.reproduce import run_reproduction

    report = run_reproduction(quick=args.quick or quick_mode(), only=args.only, out_dir=args.out)
    print(report.read_text())
    print(f"written to {report}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Subcommands that own their argument parsing.
    if argv and argv[0] == "bench":
        if len(argv) < 2 or argv[1] not in BENCHMARKS:
            raise SystemExit(f"usage: python -m workbench bench {{{','.join(BENCHMARKS)}}} [ARGS]")
        # The benchmarks' opt-in, process-wide and here only (no library code changes the allocator); each
        # benchmark's first line says it (runtime.describe_machine).
        steady_cpu_allocator()
        importlib.import_module(f"workbench.benchmarks.{argv[1]}").main(argv[2:])
        return
    if argv and argv[0] == "distrifusion":
        importlib.import_module("workbench.distrifusion.cli").main(argv[1:])
        return
    if argv and argv[0] == "debias":
        importlib.import_module("workbench.debias.cli").main(argv[1:])
        return
    if argv and argv[0] == "sadm":
        importlib.import_module("workbench.sadm.cli").main(argv[1:])
        return

    parser = argparse.ArgumentParser(prog="python -m workbench", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    zoo_parser = commands.add_parser("zoo", help="train, list, load and evaluate the model zoo")
    zoo_actions = zoo_parser.add_subparsers(dest="action", required=True)
    zoo_actions.add_parser("list")
    train = zoo_actions.add_parser("train")
    train.add_argument("name")
    train.add_argument("--steps", type=int, default=None, help="default: the zoo entry's")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vision-steps", type=int, default=None, help="toyclip only: locked-text steps (default 800)")
    train.add_argument("--offset", type=float, default=None, help="toy-t2i-offset only: the noise offset (default 0.1)")
    load = zoo_actions.add_parser("load")
    load.add_argument("name")
    evaluate = zoo_actions.add_parser("evaluate")
    evaluate.add_argument("name", nargs="?")
    evaluate.add_argument("--quick", action="store_true")
    zoo_parser.set_defaults(run=_zoo)
    reproduce = commands.add_parser("reproduce", help="re-measure each paper's claim; writes OUT/reproduce.md")
    reproduce.add_argument("--quick", action="store_true")
    reproduce.add_argument("--only", nargs="+", default=None)
    reproduce.add_argument("--out", default="reports", help="report folder (docs/results for the committed one)")
    reproduce.set_defaults(run=_reproduce)
    commands.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS))
    commands.add_parser("distrifusion", help="patch-parallel sampling (run under torchrun)")
    commands.add_parser("debias", help="Balancing Act: train the ADP heads and the evaluation classifier, evaluate")
    commands.add_parser("sadm", help="SADM: fine-tune toy-uncond with the structure game, the 2-D tier, evaluate")
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
