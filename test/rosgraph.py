"""Test harness for real ROS 2 graphs: node processes with a params file, and a client node in the test process.

Every graph gets its own isolated environment (localhost-only discovery, a unique ROS_DOMAIN_ID, logs in a temp
dir). Waits are on conditions with generous timeouts, never fixed sleeps.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import rclpy
from rclpy.executors import MultiThreadedExecutor

from mobilevlm_ros.rosenv import isolated_ros_env

TIMEOUT_S = 60.0
HELPERS = Path(__file__).resolve().parent / "ros_helpers"
NODE_EXE = [sys.executable, "-m", "mobilevlm_ros.node"]
LIFECYCLE_EXE = [sys.executable, "-m", "mobilevlm_ros.lifecycle_node"]
# The same node with a model that fails or holds on marked questions (ros_helpers/scripted_node.py)
SCRIPTED_NODE_EXE = [sys.executable, str(HELPERS / "scripted_node.py")]
SCRIPTED_LIFECYCLE_EXE = [*SCRIPTED_NODE_EXE, "--lifecycle"]
# A camera no node configures: a request naming it is answered UNKNOWN_CAMERA by a serving node, without inference
PROBE_CAMERA = "__readiness_probe__"


def _yaml(value, indent: int) -> list[str]:
    """A tiny YAML emitter for nested dicts of scalars and lists (JSON scalars are valid YAML)."""
    lines = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(" " * indent + f"{key}:")
            lines += _yaml(item, indent + 2)
        else:
            lines.append(" " * indent + f"{key}: {json.dumps(item)}")
    return lines


def write_params(path: Path, params: dict) -> Path:
    path.write_text("\n".join(["/**:", "  ros__parameters:", *_yaml(params, 4)]) + "\n")
    return path


def interrupt(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """Ctrl-C for a process (a bag replay, a ros2 command): SIGINT, and SIGKILL if it has not exited in timeout."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def wait_until(condition, timeout: float = TIMEOUT_S, interval: float = 0.05, what: str = "condition",
               details=None):
    """condition()'s first truthy value within timeout. details: a callable whose text the TimeoutError adds (what
    the tries saw), to tell apart why a condition never held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}" + (f"; {details()}" if details else ""))


class NodeProcess:
    """mobilevlm_node (or ``command``) in its own process, its output in a log file. ``params_file`` is one file or
    a list (later files win)."""

    def __init__(self, env: dict, params_file, log_path: Path, ros_args: list[str] = (), command=NODE_EXE):
        self.log_path = log_path
        self._log = open(log_path, "w")
        files = params_file if isinstance(params_file, (list, tuple)) else [params_file]
        params = [arg for path in files for arg in ("--params-file", str(path))]
        self.proc = subprocess.Popen([*command, "--ros-args", *params, *ros_args],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Graph:
    """An isolated ROS domain: this process's client node (spun in the background) plus node processes."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.env = isolated_ros_env(tmp_dir=tmp_path)
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)  # rcl reads the domain and discovery settings at init
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"test_client_{os.getpid()}", context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self._spinner = threading.Thread(target=self._spin, daemon=True)
        self._spinner.start()
        self.processes: list[NodeProcess] = []

    def _spin(self):
        try:
            self.executor.spin()
        except Exception:  # noqa: BLE001 - the context is shut down under it at the end of a test
            pass

    def start_node(self, params: dict, name: str = "node", ros_args: list[str] = (),
                   command=NODE_EXE) -> NodeProcess:
        params_file = write_params(self.tmp_path / f"{name}.yaml", params)
        process = NodeProcess(self.env, params_file, self.tmp_path / f"{name}.log", list(ros_args), command)
        self.processes.append(process)
        return process

    def wait_for_service(self, client, process: NodeProcess | None = None, timeout: float = 120.0) -> None:
        """Model loading plus discovery: wait for the service, failing early if the node process died."""
        def ready():
            if process is not None and process.proc.poll() is not None:
                raise RuntimeError(f"node exited with {process.proc.returncode}:\n{process.log()}")
            return client.service_is_ready()
        wait_until(ready, timeout, what=f"service {client.srv_name}")

    def wait_until_serving(self, client, process: NodeProcess | None = None, timeout: float = 180.0) -> None:
        """Until the node behind an AskScene ``client`` answers requests as an active node, not merely until its
        service exists: a lifecycle node (and an autostarting one) has the service while it is still unconfigured
        or loading the model, answering NOT_ACTIVE. The probe names PROBE_CAMERA: an active node answers it
        UNKNOWN_CAMERA at once, without a frame and without running the model. Each probe waits a short while and is
        sent again: a response sent before discovery has settled in both directions can be lost."""
        from mobilevlm_ros.srv import AskScene

        self.wait_for_service(client, process, timeout)
        probe = AskScene.Request(question="are you serving?", camera_id=PROBE_CAMERA)
        answers = []

        def serving() -> bool:
            if process is not None and process.proc.poll() is not None:
                raise RuntimeError(f"node exited with {process.proc.returncode}:\n{process.log()}")
            try:
                response = self.call(client, probe, 10.0)
            except TimeoutError:
                return False
            answers.append(response.error_code)
            if response.error_code == "NOT_ACTIVE":
                return False
            assert response.error_code == "UNKNOWN_CAMERA", (response.error_code, response.error_message)
            return True
        wait_until(serving, timeout, interval=0.2, what=f"{client.srv_name} serving",
                   details=lambda: f"probe answers: {answers or 'none'}")

    def call(self, client, request, timeout: float = TIMEOUT_S):
        return self.result(client.call_async(request), timeout)

    @staticmethod
    def result(future, timeout: float = TIMEOUT_S):
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout):
            raise TimeoutError(f"no response within {timeout} s")
        return future.result()

    def close(self) -> None:
        for process in self.processes:
            process.stop()
        self.executor.shutdown()
        self._spinner.join(5)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
