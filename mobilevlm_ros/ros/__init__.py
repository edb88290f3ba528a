"""The ROS 2 side of the node, one job per module: parameters, camera intake, the ask_scene endpoints, captions,
monitors and diagnostics. Everything that decides what happens to a request lives in the ROS-free core
(``mobilevlm_ros.server``, ``mobilevlm_ros.params``, ``mobilevlm_ros.monitors``); these modules only translate."""
