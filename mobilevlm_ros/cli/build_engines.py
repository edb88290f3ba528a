"""mobilevlm build-engines: export the visual encoder to ONNX and build its TensorRT (or ONNX Runtime) engine.

Engines are stored under --engines (default ./engines) with a key made of the ONNX file's hash, the runtime
version, the GPU name and compute capability, the precision and the batch limit; an existing engine is reused
when all of them match and rebuilt otherwise. A fresh engine is run against PyTorch on a random batch and
refused (deleted, exit code 3) when it disagrees.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..model.loader import expand_path
from ..options import ENGINE_BACKENDS, ENGINE_PRECISIONS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobilevlm build-engines", description=__doc__)
    # Paths: `~` and `$VARS` are expanded (also where a shell did not, e.g. in quotes or from a launcher).
    p.add_argument("--model", type=expand_path, help="MobileVLM checkpoint directory")
    p.add_argument("--vision-tower", type=expand_path,
                   help="CLIP directory, overriding config.json's mm_vision_tower")
    p.add_argument("--engines", type=expand_path, default="engines",
                   help="engine cache directory (default: ./engines)")
    p.add_argument("--backend", default="tensorrt", choices=ENGINE_BACKENDS)
    p.add_argument("--precision", default="fp16", choices=ENGINE_PRECISIONS, help="TensorRT precision")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch (cameras per call) the engine accepts")
    p.add_argument("--workspace-mib", type=int, default=1024, help="TensorRT workspace limit")
    p.add_argument("--device", default=None, help="cuda (default for tensorrt) or cpu")
    p.add_argument("--onnx-only", action="store_true", help="only export the ONNX file")
    p.add_argument("--check", action="store_true",
                   help="say whether the engine cache matches this device (runtime version, GPU, precision, ONNX "
                        "hash) without building; exit 0 match, 1 mismatch, 2 cannot check here")
    p.add_argument("--self-test", action="store_true",
                   help="build and run a tiny TensorRT engine to check this installation, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.self_test:
        from ..engines import tensorrt_backend

        if not tensorrt_backend.available():
            print("mobilevlm build-engines: TensorRT is not installed here", file=sys.stderr)
            return 2
        try:
            print(tensorrt_backend.self_test())
        except RuntimeError as e:
            print(f"mobilevlm build-engines: {e}", file=sys.stderr)
            return 3
        return 0
    if not args.model:
        parser.error("--model is required (or --self-test)")
    if args.max_batch < 1:
        parser.error("--max-batch must be at least 1")
    if args.check:
        from ..engines.provision import check_command

        return check_command(args)

    import torch

    from ..engines import EngineRejected, VisualEncoder, cached_onnx
    from ..engines.provision import provision_visual_encoder
    from ..model import CheckpointError, load_model

    device = args.device or ("cuda" if args.backend == "tensorrt" else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("mobilevlm build-engines: CUDA is not available on this machine", file=sys.stderr)
        return 2
    try:
        model, _ = load_model(args.model, args.vision_tower, "cpu" if args.onnx_only else device,
                              "float16" if device.startswith("cuda") else "float32")
    except CheckpointError as e:
        print(f"mobilevlm build-engines: {e}", file=sys.stderr)
        return 2
    if args.onnx_only:
        path = cached_onnx(VisualEncoder.from_model(model), args.engines, image_size=model.config.vision.image_size)
        print(json.dumps({"onnx": str(path)}))
        return 0
    if args.backend == "tensorrt":
        from ..engines import tensorrt_backend

        if not tensorrt_backend.available():
            print("mobilevlm build-engines: TensorRT is not installed here (use --backend onnxruntime, or run on "
                  "a Jetson with JetPack 6)", file=sys.stderr)
            return 2
    try:
        # Under the engine's build lock, so a node configuring on the same robot never builds it at the same time.
        encoder, _ = provision_visual_encoder(args.backend, model, args.engines, allow_build=True,
                                              max_batch=args.max_batch, precision=args.precision, fallback=False,
                                              workspace_bytes=args.workspace_mib << 20)
    except EngineRejected as e:
        print(f"mobilevlm build-engines: {e}", file=sys.stderr)
        return 3
    print(json.dumps({"backend": args.backend, "engine": str(getattr(encoder, "path", "")) or None,
                      "engines_dir": str(args.engines)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
