"""ros2 launch mobilevlm_ros vlm_lifecycle.launch.py [namespace:=/robot7] [camera_topic:=...] [params_file:=FILE]
[model_path:=DIR]

The managed node (mobilevlm_lifecycle_node, named mobilevlm_node) configured and activated at start, for robots
without a lifecycle manager: vlm.launch.py with lifecycle:=true autostart:=true. Same arguments otherwise.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource


def generate_launch_description():
    vlm_launch = os.path.join(get_package_share_directory("mobilevlm_ros"), "launch", "vlm.launch.py")
    # vlm.launch.py declares the other arguments; given on the command line, they reach it.
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(vlm_launch),
                                 launch_arguments={"lifecycle": "true", "autostart": "true"}.items()),
    ])
