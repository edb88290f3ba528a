"""test/ros_test_files.txt, the ROS test files that scripts/test_jazzy.sh runs on a second ROS 2 distribution, is
complete and current: read from the test files' own imports (``import``/``from`` statements anywhere in a file and
``require_module(...)`` calls), a file that reaches ROS 2, directly or through a test helper or another test file it
imports, is listed, and every listed file exists and reaches ROS 2."""
from __future__ import annotations

import ast
from pathlib import Path

TEST_DIR = Path(__file__).resolve().parent
ROOT = TEST_DIR.parent
LIST = TEST_DIR / "ros_test_files.txt"
# Top-level modules that are ROS 2 (interface packages by their suffix), and this package's modules that import rclpy
ROS_MODULES = ("rclpy", "launch", "launch_ros", "ros2cli", "rosidl_runtime_py", "ament_index_python")
ROS_SUFFIXES = ("_msgs", "_srvs", "_interfaces")
PACKAGE_ROS_MODULES = ("mobilevlm_ros.msg", "mobilevlm_ros.srv", "mobilevlm_ros.action", "mobilevlm_ros.ros",
                       "mobilevlm_ros.node", "mobilevlm_ros.lifecycle_node", "mobilevlm_ros.demo.run")


def listed() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in LIST.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def imported_modules(path: Path) -> set[str]:
    """Every module a file names in an import statement or a require_module("...") call."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "require_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def is_ros_module(name: str) -> bool:
    top = name.split(".")[0]
    return (top in ROS_MODULES or top.endswith(ROS_SUFFIXES)
            or any(name == m or name.startswith(m + ".") for m in PACKAGE_ROS_MODULES))


def reaches_ros(path: Path, test_dir: Path = TEST_DIR, seen: set[Path] | None = None) -> bool:
    """Whether the file imports ROS 2, itself or through a module of ``test_dir`` it imports (rosgraph, test_node)."""
    seen = set() if seen is None else seen
    seen.add(path)
    for name in imported_modules(path):
        if is_ros_module(name):
            return True
        local = test_dir / f"{name.split('.')[0]}.py"
        if local.is_file() and local not in seen and reaches_ros(local, test_dir, seen):
            return True
    return False


def test_every_test_file_that_imports_ros_is_listed():
    ros_files = {p.relative_to(ROOT).as_posix() for p in sorted(TEST_DIR.glob("test_*.py")) if reaches_ros(p)}
    unlisted = sorted(ros_files - set(listed()))
    assert not unlisted, f"{unlisted} import ROS 2: add them to {LIST.relative_to(ROOT)}"


def test_every_listed_file_exists_and_imports_ros():
    for name in listed():
        path = ROOT / name
        assert path.is_file(), f"{LIST.relative_to(ROOT)} lists {name}, which does not exist"
        assert reaches_ros(path), f"{LIST.relative_to(ROOT)} lists {name}, which imports nothing of ROS 2"


def test_the_rule_tells_ros_files_from_others(tmp_path):
    """The rule on small files: ROS reached through a helper and through another test file (imports cycling
    between them), a require_module() call inside a test, the package's generated interfaces; not ROS: bags
    written with rosbags (mobilevlm_ros.bags imports rclpy only to replay), the model."""
    files = {
        "helper.py": "import json\nfrom rclpy.node import Node\n",
        "test_via_helper.py": "from helper import Node\n",
        "test_via_test.py": "import test_cycle\nfrom test_via_helper import Node\n",
        "test_cycle.py": "import test_via_test\n",
        "test_required.py": "def test_x():\n    require_module('lifecycle_msgs', 'why')\n",
        "test_interfaces.py": "from mobilevlm_ros.srv import AskScene\n",
        "test_bags.py": "from mobilevlm_ros.bags import write_camera_bag\nimport rosbags\n",
        "test_model.py": "import torch\nfrom mobilevlm_ros.model import MobileVLMPipeline\nimport helpers_absent\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    ros = {name for name in files if name.startswith("test_") and reaches_ros(tmp_path / name, tmp_path)}
    assert ros == {"test_via_helper.py", "test_via_test.py", "test_cycle.py", "test_required.py",
                   "test_interfaces.py"}
