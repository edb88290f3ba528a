"""ros2 launch mobilevlm_ros vlm.launch.py [model_path:=DIR] [namespace:=/robot7] [params_file:=FILE]
[camera_topic:=/camera/color/image_raw]

Thin on purpose: everything is a node parameter, so the node runs the same without launch
(mobilevlm_node --ros-args --params-file config/vlm.yaml), which is how it is tested (launch_ros cannot be
installed on the CI machines).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("mobilevlm_ros"), "config", "vlm.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("model_path", default_value="", description="MobileVLM checkpoint dir; empty: demo"),
        DeclareLaunchArgument("namespace", default_value="", description="e.g. /robot7 for fleets"),
        DeclareLaunchArgument("params_file", default_value=default_params),
        DeclareLaunchArgument("camera_topic", default_value="front/image_raw",
                              description="topic of the default camera (config/vlm.yaml's front/image_raw)"),
        Node(package="mobilevlm_ros", executable="mobilevlm_node", name="mobilevlm_node",
             namespace=LaunchConfiguration("namespace"), output="screen",
             parameters=[LaunchConfiguration("params_file"), {"model_path": LaunchConfiguration("model_path")}],
             remappings=[("front/image_raw", LaunchConfiguration("camera_topic"))]),
    ])
