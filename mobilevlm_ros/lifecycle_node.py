"""mobilevlm_lifecycle_node: the node (:class:`mobilevlm_ros.node.MobileVLMNode`) started unconfigured, for a
lifecycle manager or fleet tooling to drive through ``<node>/change_state``; ``autostart: true`` configures and
activates it on the executor, and a failed autostart leaves it unconfigured and reporting why rather than exiting
into a restart loop. Transitions and interfaces: see :mod:`mobilevlm_ros.node`."""
from __future__ import annotations

import sys

from .node import MobileVLMNode, run_node


def _wait_for_manager(node: MobileVLMNode) -> bool:
    node.get_logger().info(f"lifecycle node up (unconfigured): {node.get_fully_qualified_name()}/change_state"
                           + ("; autostart" if node.autostart else ""))
    if node.autostart:
        node.request_autostart()
    return True


def main(args: list[str] | None = None) -> int:
    return run_node(args, "mobilevlm_lifecycle_node", _wait_for_manager)


if __name__ == "__main__":
    sys.exit(main())
