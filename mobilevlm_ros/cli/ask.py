"""mobilevlm ask: try a MobileVLM checkpoint on an image (or several, in one batch), without ROS."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..model import CheckpointError, MobileVLMPipeline, PromptTooLongError, SamplingParams
from ..model.choices import check_choices
from ..model.loader import expand_path
from ..model.pipeline import choose_fast_paths, load_checkpoint
from ..options import BACKENDS, DTYPES, QUANTIZE_MODES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobilevlm ask", description=__doc__)
    p.add_argument("question", nargs="?", help="the question (omit when --chat is given)")
    # Paths: `~` and `$VARS` are expanded (also where a shell did not, e.g. in quotes or from a launcher).
    p.add_argument("--model", type=expand_path,
                   help="MobileVLM checkpoint directory (default: the bundled demo model)")
    p.add_argument("--vision-tower", type=expand_path,
                   help="CLIP directory, overriding config.json's mm_vision_tower")
    p.add_argument("--image", type=expand_path, required=True, action="append",
                   help="image file (JPEG, PNG, ...); given several times, the same question is asked about each, "
                   "all in one batch")
    p.add_argument("--chat", type=expand_path,
                   help="JSON list of turns: user, assistant, ..., user (the image goes with the first)")
    p.add_argument("--choice", action="append", default=[], metavar="ANSWER",
                   help="given (several times), the answer is the most likely of these (scored, not generated: no "
                   "sampling options); --json prints choice_probabilities in their order")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--max-seq-len", type=int, default=2048, help="KV cache length in positions")
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="CPU weight quantisation of the decoder's Linear layers")
    p.add_argument("--no-onednn", action="store_true",
                   help="keep torch's default (MKL) kernels for the float Linear layers on x86 CPUs instead of oneDNN")
    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="vision encoder backend (engines are built once and cached under --engines)")
    p.add_argument("--engines", type=expand_path, default="engines", help="engine cache directory for --backend")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the answer text (several images: a list of them, in order)")
    return p


def _turns(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    if args.chat is None:
        if not args.question:
            parser.error("give a QUESTION or --chat FILE")
        return [args.question]
    if args.question:
        parser.error("give either a QUESTION or --chat FILE, not both")
    try:
        turns = json.loads(Path(args.chat).read_text(encoding="utf-8"))
    except OSError as e:
        raise SystemExit(f"mobilevlm ask: cannot read --chat file: {e}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"mobilevlm ask: {args.chat}: not valid JSON: {e}") from None
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns) or len(turns) % 2 != 1:
        raise SystemExit(f"mobilevlm ask: {args.chat}: expected a JSON list of strings alternating user and "
                         "assistant, starting and ending with a user turn")
    return turns


def _load(args: argparse.Namespace) -> MobileVLMPipeline:
    """The pipeline as the node builds it (loading.load_pipeline): kernels from the options, then the vision
    encoder, here an engine that must be had (built under the cache's lock when missing) or the torch one."""
    from ..engines.provision import provision_visual_encoder

    fast_paths = choose_fast_paths(args.device, args.dtype, args.quantize, not args.no_onednn)
    model, tokenizer = load_checkpoint(args.model, args.vision_tower, args.device, args.dtype, args.quantize)
    try:
        engine, _ = provision_visual_encoder(args.backend, model, args.engines, allow_build=True, fallback=False)
    except RuntimeError as e:  # backend not installed, engine refused: an error message, not a traceback
        raise ValueError(f"--backend {args.backend}: {e}") from None
    return MobileVLMPipeline(model, tokenizer, args.max_seq_len, fast_paths, engine)


def _print_choices(choices: list, args: argparse.Namespace) -> int:
    """The chosen answers as text (one line, or one per image), or with --json their objects."""
    if args.json:
        objects = [{"answer": c.answer, "index": c.index, "choice_probabilities": c.probabilities,
                    "log_likelihoods": c.log_likelihoods, "input_ids": c.input_ids, "timings": c.timings}
                   for c in choices]
        print(json.dumps(objects[0] if len(objects) == 1 else objects, ensure_ascii=False))
    elif len(choices) == 1:
        print(choices[0].answer)
    else:
        for path, choice in zip(args.image, choices):
            print(f"{path}: {choice.answer}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    turns = _turns(args, parser)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    try:
        params.validate()
        if args.choice:
            check_choices(args.choice)
            if args.temperature > 0:
                raise ValueError(f"--temperature {args.temperature:g} with --choice: choices are scored, not sampled")
    except ValueError as e:
        parser.error(str(e))
    images = []
    for path in args.image:
        try:
            image = Image.open(path)
            image.load()
        except (OSError, UnidentifiedImageError) as e:
            print(f"mobilevlm ask: cannot read image {path}: {e}", file=sys.stderr)
            return 2
        images.append(image)
    if args.model is None:
        from ..demo import DEFAULT_MODEL_DIR

        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            print(f"mobilevlm ask: the bundled demo model ({DEFAULT_MODEL_DIR}) is not installed: pass --model",
                  file=sys.stderr)
            return 2
        args.model = DEFAULT_MODEL_DIR
    try:
        vlm = _load(args)
        if args.choice:
            return _print_choices(vlm.choose_batch(images, [turns] * len(images), [args.choice] * len(images)),
                                  args)
        if len(images) == 1:
            answers = [vlm.ask(images[0], turns, params,
                               on_text=None if args.json else lambda piece, _: print(piece, end="", flush=True))]
        else:
            answers = vlm.ask_batch(images, [turns] * len(images), params)
    except (CheckpointError, PromptTooLongError, ValueError) as e:
        print(f"mobilevlm ask: {e}", file=sys.stderr)
        return 2
    if args.json:
        objects = [{"answer": answer.text, "input_ids": answer.input_ids, "generated_ids": answer.generated_ids,
                    "stopped_by": answer.stopped_by, "timings": answer.timings} for answer in answers]
        print(json.dumps(objects[0] if len(objects) == 1 else objects, ensure_ascii=False))
    elif len(images) == 1:
        print()  # the answer was streamed
    else:
        for path, answer in zip(args.image, answers):
            print(f"{path}: {answer.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
