"""ros2 launch mobilevlm_ros vlm.launch.py [namespace:=/robot7] [camera_topic:=/camera/color/image_raw]
[params_file:=FILE] [model_path:=DIR] [lifecycle:=false] [autostart:=true]

mobilevlm_node with config/vlm.yaml (or params_file), in a namespace, its default camera (config/vlm.yaml's
front/image_raw) remapped to camera_topic. Thin on purpose: every setting is a node parameter, so the node runs the
same without launch (mobilevlm_node --ros-args --params-file config/vlm.yaml).

- model_path:=DIR, when given, overrides the params file's model_path; left out, the params file's value counts
  (config/vlm.yaml's empty default: the bundled demo model).
- lifecycle:=true starts the managed node (mobilevlm_lifecycle_node, also named mobilevlm_node, so
  `ros2 lifecycle get /robot7/mobilevlm_node` reaches it), configured and activated at start unless
  autostart:=false leaves it unconfigured for a lifecycle manager. vlm_lifecycle.launch.py and
  vlm_lifecycle_managed.launch.py are those two.
- A node that exits with an error (a bad parameter, for instance: its message is in the output) makes
  `ros2 launch` exit non-zero too, so scripts and service managers see the failure.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

NODE_NAME = "mobilevlm_node"


def _flag(context, name: str) -> bool:
    value = LaunchConfiguration(name).perform(context).lower()
    if value not in ("true", "false"):
        raise ValueError(f"{name}:={value}: expected true or false")
    return value == "true"


def _fail_on_error_exit(event, context):
    # launch itself exits 0 whatever its processes did; an exception raised here makes it exit 1.
    if event.returncode != 0:
        raise RuntimeError(f"{NODE_NAME} exited with code {event.returncode}")


def _node(context):
    parameters = [LaunchConfiguration("params_file")]
    lifecycle = _flag(context, "lifecycle")
    if lifecycle:
        parameters.append({"autostart": _flag(context, "autostart")})
    # Only a given model_path:= may override the params file: a default value here would always win over it.
    model_path = LaunchConfiguration("model_path").perform(context)
    if model_path:
        parameters.append({"model_path": os.path.expanduser(model_path)})  # the shell leaves ~ after := alone
    common = dict(package="mobilevlm_ros", name=NODE_NAME, namespace=LaunchConfiguration("namespace"),
                  output="screen", parameters=parameters,
                  remappings=[("front/image_raw", LaunchConfiguration("camera_topic"))])
    # LifecycleNode lets launch files react to the node's transitions (launch_ros OnStateTransition).
    node = (LifecycleNode(executable="mobilevlm_lifecycle_node", **common) if lifecycle
            else Node(executable="mobilevlm_node", **common))
    return [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_fail_on_error_exit))]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("mobilevlm_ros"), "config", "vlm.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="", description="e.g. /robot7 for fleets"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="node parameters"),
        DeclareLaunchArgument("model_path", default_value="",
                              description="MobileVLM checkpoint directory; overrides the params file's when given"),
        DeclareLaunchArgument("camera_topic", default_value="front/image_raw",
                              description="topic of the default camera (config/vlm.yaml's front/image_raw)"),
        DeclareLaunchArgument("lifecycle", default_value="false",
                              description="true: the managed node (mobilevlm_lifecycle_node)"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="lifecycle:=true only: configure and activate at start (false: leave it "
                                          "unconfigured for a lifecycle manager)"),
        OpaqueFunction(function=_node),
    ])
