"""``python -m workbench sadm {finetune,points,evaluate,finetunes,cost}``: SADM (paper 5) on the toy world."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workbench.runtime import quick_mode


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench sadm", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    finetune = actions.add_parser("finetune", help="fine-tune toy-uncond plainly or with SADM -> data/")
    finetune.add_argument("variant", choices=("plain", "sadm"))
    finetune.add_argument("--steps", type=int, default=300)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", default=None, help="default: data/toy-uncond-plain-ft or data/toy-uncond-sadm")
    finetune.add_argument("--weight", type=float, default=None, help="structure weight (default: IMAGE_SADM's)")
    finetune.add_argument("--relation", choices=("cosine", "centred_cosine"), default=None)
    finetune.add_argument("--max-timestep", type=int, default=None, help="the term's window (default: IMAGE_SADM's)")
    points = actions.add_parser("points", help="the 2-D tier: plain vs SADM over seeds")
    points.add_argument("--steps", type=int, default=3000)
    points.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    points.add_argument("--kind", choices=("ring", "moons", "swissroll"), default="ring")
    points.add_argument("--weight", type=float, default=None, help="structure weight (default: POINT_SADM's)")
    points.add_argument("--max-timestep", type=int, default=None)
    points.add_argument("--critic-width", type=int, default=None)
    points.add_argument("--relation", choices=("cosine", "centred_cosine"), default=None)
    points.add_argument("--batch-size", type=int, default=None)
    points.add_argument(
        "--posterior-mean",
        action="store_true",
        help="also run the game against the exact posterior mean E[x_0 | x_t] (ring only)",
    )
    points.add_argument("--out", default=None, help="also write the per-seed results to this JSON file")
    evaluate = actions.add_parser("evaluate", help="Frechet and structure distances of the shipped fine-tunes")
    evaluate.add_argument("--quick", action="store_true")
    evaluate.add_argument("--num-samples", type=int, default=None, help="per seed (default 500; quick 64)")
    evaluate.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    evaluate.add_argument("--out", default=None, help="also write the per-seed results to this JSON file")
    evaluate.add_argument("--paths", nargs="+", default=None, help="evaluate these pipeline folders instead")
    finetunes = actions.add_parser(
        "finetunes", help="the image tier over training seeds: plain, SADM, plain at equal wall-clock"
    )
    finetunes.add_argument("--steps", type=int, default=150, help="SADM's and plain's fine-tuning steps")
    finetunes.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    finetunes.add_argument("--num-samples", type=int, default=192, help="images per fine-tune")
    finetunes.add_argument("--state-dir", default=None, help="keep (and resume) the training states here")
    finetunes.add_argument("--out", default=None, help="also write the per-seed results to this JSON file")
    actions.add_parser("cost", help="seconds per fine-tuning step, plain and SADM")
    args = parser.parse_args(argv)

    from dataclasses import replace

    from workbench.sadm import experiment

    try:
        if args.action == "finetune":
            changes = {"structure_weight": args.weight, "relation": args.relation, "max_timestep": args.max_timestep}
            sadm = replace(experiment.IMAGE_SADM, **{k: v for k, v in changes.items() if v is not None})
            out = experiment.finetune_toy_uncond(
                args.variant,
                steps=args.steps,
                seed=args.seed,
                out_dir=args.out,
                state_dir=None if args.out is None else Path("runs") / Path(args.out).name,
                sadm=sadm,
            )
            print(f"saved to {out}")
        elif args.action == "points":
            changes = {
                key: value
                for key, value in (
                    ("structure_weight", args.weight),
                    ("max_timestep", args.max_timestep),
                    ("critic_width", args.critic_width),
                    ("relation", args.relation),
                )
                if value is not None
            }
            results = experiment.compare_points(
                seeds=args.seeds,
                steps=args.steps,
                kind=args.kind,
                sadm=replace(experiment.POINT_SADM, **changes),
                batch_size=args.batch_size or 256,
                posterior_mean_arm=args.posterior_mean,
            )
            _print(results)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        elif args.action == "evaluate":
            quick = args.quick or quick_mode()
            pipes = (
                experiment.available_pipelines()
                if args.paths is None
                else {Path(path).name: experiment.load_finetune("sadm", path=path) for path in args.paths}
            )
            results = experiment.compare_images(
                pipes,
                num_samples=args.num_samples or (64 if quick else 500),
                num_inference_steps=10 if quick else 20,
                seeds=args.seeds,
                structure_batch=16 if quick else 32,
            )
            _print(results)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        elif args.action == "finetunes":
            results = experiment.compare_finetunes(
                seeds=args.seeds, steps=args.steps, num_samples=args.num_samples, state_dir=args.state_dir
            )
            _print(results)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        elif args.action == "cost":
            for variant, seconds in experiment.step_cost().items():
                print(f"{variant:6s} {seconds:.3f} s per step (batch 64)")
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error


def _print(results) -> None:
    from workbench.metrics import mean_interval

    for arm, figures in results.items():
        for key, values in figures.items():
            mean, half = mean_interval(values)
            print(f"{arm:24s} {key:18s} {mean:10.4f} ± {half:.4f}   ({', '.join(f'{v:.4f}' for v in values)})")
