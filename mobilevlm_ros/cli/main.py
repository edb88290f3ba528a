"""``mobilevlm``: the package's one command; ``mobilevlm SUBCOMMAND --help`` for each. The ROS 2 executables are
separate (``mobilevlm_node``, ``mobilevlm_lifecycle_node``: ``ros2 run`` and launch files start them), and the
developer tools, not part of the runtime, sit under ``mobilevlm dev``."""
from __future__ import annotations

import importlib
import sys

# name: (module whose main(argv) runs it, what it is for)
COMMANDS = {
    "ask": ("mobilevlm_ros.cli.ask", "answer a question about images (free text or --choice), without ROS"),
    "build-engines": ("mobilevlm_ros.cli.build_engines", "export the vision encoder and build its engine"),
    "manifest": ("mobilevlm_ros.cli.manifest", "write or check a model directory's manifest"),
    "replay-bag": ("mobilevlm_ros.bags", "replay a camera bag through ROS 2 publishers"),
    "demo": ("mobilevlm_ros.demo.run", "the end-to-end demo on the bundled model"),
    "finetune": ("mobilevlm_ros.finetune.cli", "LoRA fine-tuning of a checkpoint on your data"),
    "bag-to-dataset": ("mobilevlm_ros.finetune.bag_to_dataset", "sample a bag into images and a dataset to label"),
}
DEV_TOOLS = {
    "bench": ("mobilevlm_ros.bench.cli", "the speed and memory benchmark against the reference stacks"),
    "train-demo": ("mobilevlm_ros.train.cli", "train the bundled demo model from scratch"),
}


def _usage(table: dict, prefix: str) -> str:
    width = max(map(len, table))
    return "\n".join(f"  {prefix}{name.ljust(width)}  {what}" for name, (_, what) in table.items())


USAGE = f"""usage: mobilevlm COMMAND [ARGS...]

commands:
{_usage(COMMANDS, "")}

developer tools (not part of the runtime):
{_usage(DEV_TOOLS, "dev ")}
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    table = COMMANDS
    if args[:1] == ["dev"]:
        table, args = DEV_TOOLS, args[1:]
    if not args or args[0] in ("-h", "--help") or args[0] not in table:
        stream = sys.stdout if args[:1] in (["-h"], ["--help"]) else sys.stderr
        if args and args[0] not in ("-h", "--help"):
            print(f"mobilevlm: unknown command {args[0]!r}", file=sys.stderr)
        print(USAGE, file=stream, end="")
        return 0 if stream is sys.stdout else 2
    module, _ = table[args[0]]
    return importlib.import_module(module).main(args[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
