"""mobilevlm dev train-demo: train the bundled demo MobileVLM from scratch on generated road scenes."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from .recipe import Recipe


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobilevlm dev train-demo", description=__doc__)
    p.add_argument("--out", required=True, help="output checkpoint directory (created)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything: scenes, initialisation, data order")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the result is bit-exact for the same "
                                                          "thread count and torch build)")
    p.add_argument("--workers", type=int, default=2, help="scene-rendering processes")
    p.add_argument("--lora-rank", type=int, default=0, help="instruction-tune the LLM with LoRA of this rank "
                                                            "(merged into the weights on export); 0: full")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. --set instruct_epochs=1 (repeatable)")
    p.add_argument("--eval-scenes", type=int, default=0,
                   help="after training, score the model on this many held-out scenes (seed + 1000)")
    return p


def _override(recipe: Recipe, assignments: list[str], parser: argparse.ArgumentParser) -> Recipe:
    kinds = {f.name: f.type for f in fields(Recipe)}
    changes = {}
    for item in assignments:
        name, _, value = item.partition("=")
        if name not in kinds:
            parser.error(f"unknown recipe field {name!r} (known: {', '.join(kinds)})")
        kind = {"int": int, "float": float}.get(str(kinds[name]), str)
        changes[name] = kind(value)
    return replace(recipe, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    recipe = Recipe(seed=args.seed, threads=args.threads, workers=args.workers, lora_rank=args.lora_rank)
    recipe = _override(recipe, args.set, parser)
    out = Path(args.out)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    from .recipe import train

    timings = train(recipe, out, log)
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB); "
        f"training took {timings['total'] / 60:.1f} min")
    if args.eval_scenes:
        from .evaluate import evaluate

        report = evaluate(out, seed=args.seed + 1000, scenes=args.eval_scenes)
        print(report.table())
        info = json.loads((out / "training.json").read_text())
        info["eval"] = {"seed": args.seed + 1000, "scenes": report.scenes,
                        "accuracy": {k: round(report.accuracy(k), 4) for k in report.asked},
                        "caption_covers": report.caption_covers / report.scenes}
        (out / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
