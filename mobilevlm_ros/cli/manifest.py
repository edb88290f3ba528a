"""mobilevlm manifest: write or check the manifest (names, sizes, sha256) of a model directory.

  mobilevlm manifest write DIR      where the model is known to be good (after training, download or export)
  mobilevlm manifest check DIR      on the robot after copying: names the first missing, truncated or corrupted file

Exit codes: 0 ok, 1 the directory does not match its manifest, 2 usage error or no manifest.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..manifest import MANIFEST_NAME, ManifestError, check_manifest, has_manifest, read_manifest, write_manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobilevlm manifest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help=f"hash every file of DIR into DIR/{MANIFEST_NAME}")
    w.add_argument("directory")
    w.add_argument("--force", action="store_true", help="replace an existing manifest")
    c = sub.add_parser("check", help="check DIR against its manifest")
    c.add_argument("directory")
    c.add_argument("--sizes-only", action="store_true", help="compare names and sizes only (no hashing)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "write":
            if has_manifest(args.directory) and not args.force:
                print(f"mobilevlm manifest: {args.directory}/{MANIFEST_NAME} exists; pass --force to replace it "
                      "(never re-write a manifest on a copy you have not verified)", file=sys.stderr)
                return 2
            path = write_manifest(args.directory)
            entries = read_manifest(args.directory)
            print(json.dumps({"manifest": str(path), "files": len(entries),
                              "total_bytes": sum(e.size for e in entries)}))
            return 0
        if not has_manifest(args.directory):
            print(f"mobilevlm manifest: {args.directory}: no {MANIFEST_NAME}", file=sys.stderr)
            return 2
        summary = check_manifest(args.directory, hash_files=not args.sizes_only)
    except ManifestError as e:
        print(f"mobilevlm manifest: {e}", file=sys.stderr)
        return 1 if args.command == "check" else 2
    print(json.dumps({"ok": True, "directory": summary.directory, "files": summary.files,
                      "total_bytes": summary.total_bytes, "hashed": not args.sizes_only,
                      "seconds": round(summary.seconds, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
