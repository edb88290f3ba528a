"""The fine-tuning proof on the bundled demo model: teach it the stop-or-go question (scenes.stop_or_go), which it
has never seen, from a few hundred generated scenes, and check that the old question types still hold.

    python -m mobilevlm_ros.finetune.demo data --out DIR [--scenes 400 --seed 23]   # images + train.json
    python -m mobilevlm_ros.finetune.demo eval --model DIR [--adapter DIR] [--scenes 200 --seed 20240]
    python -m mobilevlm_ros.finetune.demo proof --out DIR                            # all of it, timed

The training data is LLaVA-style JSON like any user's: one single-turn record per question, the scene's frame as
a PNG. Each scene gives one stop-or-go record and ``old_per_scene`` records of the questions the model already
answers (its caption request among them), so that learning the new question does not wear the old ones away.
Held-out scenes come from another seed than the training scenes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..demo import DEFAULT_MODEL_DIR
from ..demo.scenes import STOP_OR_GO, answer_matches, make_scene, stop_or_go
from ..model.generate import SamplingParams
from ..train.evaluate import GREEDY
from .lora import LoraSettings
from .train import FinetuneSettings

SHIPPED_ADAPTER = Path(__file__).resolve().parent / "demo_adapter"  # the proof's adapter (docs/FINETUNE.md)
TRAIN_SEED = 23
HELD_OUT_SEED = 20240  # the demo model's own held-out scenes (docs/DEMO_MODEL.md)
# The proof's settings: the reference's recipe (LoRA on every decoder Linear layer, projector trained, AdamW,
# cosine schedule) at the demo model's scale: a smaller rank for a width-128 decoder and a higher rate for a few
# hundred steps.
PROOF_SETTINGS = FinetuneSettings(lora=LoraSettings(r=16, alpha=32.0, dropout=0.05), learning_rate=2e-3,
                                  epochs=3.0, batch_size=16, gradient_checkpointing=False)


def write_dataset(out_dir: str | Path, scenes: int, seed: int = TRAIN_SEED, old_per_scene: int = 2) -> Path:
    """Frames of scenes 0..scenes-1 of seed as PNGs under out_dir/images and their records in out_dir/train.json:
    per scene, its stop-or-go question and old_per_scene of its other questions. Returns the JSON's path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0xF17E])
    records = []
    for index in range(scenes):
        scene = make_scene(seed, index)
        image = f"images/{index:05d}.png"
        Image.fromarray(scene.image).save(out_dir / image)
        old = [scene.qa[i] for i in rng.permutation(len(scene.qa))[:old_per_scene]]
        for k, qa in enumerate([stop_or_go(scene, rng)] + old):
            records.append({"id": f"{index}-{k}", "image": image, "kind": qa.kind, "conversations": [
                {"from": "human", "value": "<image>\n" + qa.question}, {"from": "gpt", "value": qa.answer}]})
    path = out_dir / "train.json"
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return path


def evaluate_stop_or_go(pipeline, seed: int = HELD_OUT_SEED, scenes: int = 200,
                        params: SamplingParams = GREEDY) -> tuple[int, int, dict[str, int]]:
    """(correct, asked, answers given) for the stop-or-go question on held-out scenes, greedy, through
    MobileVLMPipeline.ask (the node's code path)."""
    rng = np.random.default_rng([seed, 0x570])
    correct, given = 0, {}
    for index in range(scenes):
        scene = make_scene(seed, index)
        qa = stop_or_go(scene, rng)
        answer = pipeline.ask(scene.image, qa.question, params).text
        given[answer] = given.get(answer, 0) + 1
        correct += answer_matches(answer, qa.answer)
    return correct, scenes, given


def evaluate_model(model: str | Path, adapter: str | Path | None, scenes: int, seed: int = HELD_OUT_SEED) -> dict:
    """Accuracy per question type (the old ones through train.evaluate, and stop_or_go) on held-out scenes."""
    from ..model import MobileVLMPipeline
    from ..model.pipeline import load_checkpoint
    from ..train.evaluate import evaluate
    from .lora import merge_adapter

    loaded, tokenizer = load_checkpoint(model)
    if adapter:
        merge_adapter(loaded, adapter)
    pipeline = MobileVLMPipeline(loaded, tokenizer, max_seq_len=512)
    report = evaluate(pipeline, seed=seed, scenes=scenes)
    correct, asked, given = evaluate_stop_or_go(pipeline, seed, scenes)
    accuracy = {kind: round(report.accuracy(kind), 4) for kind in report.asked}
    accuracy["caption_covers"] = round(report.caption_covers / report.scenes, 4)
    accuracy[STOP_OR_GO] = round(correct / asked, 4)
    asked_per_type = dict(report.asked) | {"caption_covers": report.scenes, STOP_OR_GO: asked}
    return {"model": str(model), "adapter": str(adapter) if adapter else None, "seed": seed, "scenes": scenes,
            "accuracy": accuracy, "asked": asked_per_type, "stop_or_go_answers": given}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobilevlm_ros.finetune.demo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="generate the training data")
    data.add_argument("--out", required=True)
    data.add_argument("--scenes", type=int, default=400)
    data.add_argument("--seed", type=int, default=TRAIN_SEED)
    data.add_argument("--old-per-scene", type=int, default=2)
    ev = sub.add_parser("eval", help="score a model (and adapter) on held-out scenes")
    ev.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ev.add_argument("--adapter")
    ev.add_argument("--scenes", type=int, default=200)
    ev.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    proof = sub.add_parser("proof", help="data, fine-tuning (adapter + merged checkpoint) and both evaluations")
    proof.add_argument("--out", required=True)
    proof.add_argument("--scenes", type=int, default=400)
    proof.add_argument("--eval-scenes", type=int, default=200)
    proof.add_argument("--epochs", type=float, default=PROOF_SETTINGS.epochs)
    args = parser.parse_args(argv)

    if args.command == "data":
        print(write_dataset(args.out, args.scenes, args.seed, args.old_per_scene))
        return 0
    if args.command == "eval":
        print(json.dumps(evaluate_model(args.model, args.adapter, args.scenes, args.seed), indent=2))
        return 0

    import torch

    from .train import finetune

    torch.set_num_threads(2)
    out = Path(args.out)
    t0 = time.perf_counter()
    data_path = write_dataset(out / "data", args.scenes)
    data_seconds = time.perf_counter() - t0
    settings = replace(PROOF_SETTINGS, epochs=args.epochs)
    result = finetune(DEFAULT_MODEL_DIR, data_path, out / "adapter", settings, merge=True,
                      log=lambda line: print(line, flush=True))
    before = evaluate_model(DEFAULT_MODEL_DIR, None, args.eval_scenes)
    after = evaluate_model(result.merged_dir, None, args.eval_scenes)
    report = {"command": "python -m mobilevlm_ros.finetune.demo proof " + " ".join(argv or sys.argv[1:]),
              "data_seconds": round(data_seconds, 1), "finetune_seconds": round(result.seconds, 1),
              "steps": result.steps, "examples": result.examples, "settings": asdict(settings),
              "first_loss": result.losses[0], "last_loss": result.losses[-1], "before": before, "after": after,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "proof.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("data_seconds", "finetune_seconds", "steps", "examples")}))
    for name in ("before", "after"):
        print(name, json.dumps(report[name]["accuracy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
