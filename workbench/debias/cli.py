"""``python -m workbench debias {train-classifier,train-adp,tune,evaluate,sweep}``: Balancing Act on the toy world."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workbench.runtime import quick_mode


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench debias", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    clf = actions.add_parser("train-classifier", help="the evaluation CNN on true labels -> data/")
    clf.add_argument("--steps", type=int, default=1500)
    clf.add_argument("--seed", type=int, default=0)
    adp = actions.add_parser("train-adp", help="per-step ADP heads for toy-uncond -> data/toy-uncond-adp")
    adp.add_argument("--num-generated", type=int, default=384)
    adp.add_argument("--num-real", type=int, default=384)
    adp.add_argument("--steps", type=int, default=10, help="sampler steps the heads are for")
    adp.add_argument(
        "--head",
        action="append",
        default=[],
        metavar="[ATTR=]HEAD",
        help="linear|mean|pooled|mlp, for all or one attribute",
    )
    adp.add_argument("--seed", type=int, default=0)
    adp.add_argument("--out", default=None, help="default: data/toy-uncond-adp")
    tune = actions.add_parser("tune", help="each target's guidance weight on held-out seeds (TARGET_WEIGHTS)")
    tune.add_argument("--mode", default="distribution", choices=["distribution", "h-sample", "x0-sample"])
    tune.add_argument("--quick", action="store_true")
    tune.add_argument("--out", default=None, help="also write the measured table to this JSON file")
    evaluate = actions.add_parser("evaluate", help="FD / Frechet distance / cost of every method")
    evaluate.add_argument("--quick", action="store_true")
    sweep = actions.add_parser("sweep", help="discrepancy against batch size at one scale")
    sweep.add_argument("--quick", action="store_true")
    sweep.add_argument("--out", default=None, help="also write the curves to this JSON file")
    args = parser.parse_args(argv)

    from workbench.attribute_classifier import train_attribute_classifier
    from workbench.debias import experiment

    try:
        if args.action == "train-classifier":
            _, accuracy = train_attribute_classifier(experiment.CLASSIFIER_DIR, steps=args.steps, seed=args.seed)
            print(f"held-out accuracy (true labels): {accuracy}; saved to {experiment.CLASSIFIER_DIR}")
        elif args.action == "train-adp":
            out = args.out or experiment.ADP_DIR
            record = experiment.train_toy_adps(
                out,
                num_generated=args.num_generated,
                num_real=args.num_real,
                num_inference_steps=args.steps,
                heads=_heads(args.head, experiment.VALUES),
                seed=args.seed,
            )
            for attribute, accuracy in record["accuracy"].items():
                for key, values in accuracy.items():
                    print(f"{attribute:7s} {key:15s} " + " ".join(f"{v:.2f}" for v in values))
            print(json.dumps(record["pseudo_label_agreement_with_truth"]), record["seconds"])
            print(f"saved to {out}")
        elif args.action == "tune":
            record = experiment.tune_weights(args.mode, **experiment.tuning_sizes(args.quick or quick_mode()))
            for row in record["rows"]:
                print(json.dumps(row))
            print("chosen weights:", json.dumps(record["chosen"]))
            _write(args.out, record)
        elif args.action == "evaluate":
            quick = args.quick or quick_mode()
            rows = experiment.compare_methods(**experiment.comparison_sizes(quick))
            for row in rows:
                print(json.dumps(row))
        elif args.action == "sweep":
            quick = args.quick or quick_mode()
            sweep = experiment.batch_size_sweep(**experiment.sweep_sizes(quick))
            print(json.dumps(sweep, indent=1))
            print("flatness of the pooled share:", json.dumps(experiment.flatness(sweep)))
            _write(args.out, sweep)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error


def _write(path: str | None, record: dict) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=1) + "\n")
        print(f"written to {path}")


def _heads(options: list[str], attributes) -> dict[str, str]:
    """``["pooled"]`` -> every attribute; ``["shape=mlp"]`` -> one attribute."""
    heads: dict[str, str] = {}
    for option in options:
        if "=" in option:
            attribute, head = option.split("=", 1)
            heads[attribute] = head
        else:
            heads |= dict.fromkeys(attributes, option)
    return heads
