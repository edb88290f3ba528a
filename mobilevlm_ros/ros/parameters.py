"""Parameters as ROS sees them: each entry of :data:`mobilevlm_ros.params.PARAMETERS` declared with a descriptor
(description, allowed values or range, read-only for ``autostart``), so ``ros2 param describe`` documents it, and
every ``ros2 param set`` checked before it takes effect:

- a value outside its choices or range, or of the wrong type, is refused with the reason;
- a parameter read at configure is refused while the node is configured (it would be accepted and ignored);
- a live parameter (``params.LIVE``) is checked against the loaded model (a caption prompt too long for the context
  is refused, not failed at every tick) and applied to the next request.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, \
    SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter

from ..params import BY_NAME, LIVE, NodeConfig, Param, camera_parameters, monitor_parameters, read_config

_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
          float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
          list: ParameterType.PARAMETER_STRING_ARRAY}
READ_ONLY = frozenset({"autostart"})  # read once when the process starts


def descriptor(param: Param) -> ParameterDescriptor:
    kind = type(param.default)
    d = ParameterDescriptor(name=param.name, type=_TYPES[kind], read_only=param.name in READ_ONLY,
                            description=param.description.replace("`", "") + (
                                " [applies to the next request]" if param.live else
                                " [read at configure]" if param.name not in READ_ONLY else " [read at start]"))
    if param.choices:
        d.additional_constraints = "one of: " + ", ".join(repr(c) for c in param.choices)
    if param.minimum is not None or param.maximum is not None:
        if kind is int:
            d.integer_range = [IntegerRange(from_value=int(param.minimum if param.minimum is not None else -2**63),
                                            to_value=int(param.maximum if param.maximum is not None else 2**63 - 1))]
        else:
            d.floating_point_range = [FloatingPointRange(
                from_value=float(param.minimum if param.minimum is not None else -sys.float_info.max),
                to_value=float(param.maximum if param.maximum is not None else sys.float_info.max))]
    return d


class NodeParameters:
    """Declares the parameters on ``node`` and guards changes to them.

    ``configured()`` says whether a model is loaded (then configure-time parameters are refused);
    ``check_live(name, value)`` returns why a live value does not fit the loaded model, or None;
    ``apply_live(name, value)`` makes it take effect.
    """

    def __init__(self, node: Node, configured: Callable[[], bool],
                 check_live: Callable[[str, object], str | None], apply_live: Callable[[str, object], None]):
        self.node = node
        self._configured = configured
        self._check_live = check_live
        self._apply_live = apply_live
        self._per_item_params: dict[str, Param] = {}  # camera.ID.* and monitor.NAME.*
        self.declare(BY_NAME.values())
        node.add_on_set_parameters_callback(self._on_set)

    def declare(self, params: Iterable[Param]) -> None:
        """Declare each parameter not declared yet (a params file's value wins over the default). A value of the
        wrong type or out of range raises ValueError naming the parameter."""
        for param in params:
            if self.node.has_parameter(param.name):
                continue
            try:
                self.node.declare_parameter(param.name, param.default, descriptor(param))
            except Exception as e:  # rclpy raises its own types for wrong types and ranges
                # Our message for the value the params file gave, where it is a value of the right type.
                override = self.node._parameter_overrides.get(param.name)
                problem = None if override is None else param.check(override.value)
                raise ValueError(problem or f"parameter {param.name}: {e}") from e
            problem = param.check(self.node.get_parameter(param.name).value)
            if problem:
                raise ValueError(problem)

    def read(self, check_files: bool = True) -> NodeConfig:
        """The validated configuration from the current values (camera and monitor parameters are declared for the
        ids in ``cameras`` and names in ``monitors``, also ones added since the last configure); check_files: see
        params.read_config."""
        for camera_id in self.node.get_parameter("cameras").value:
            if camera_id:
                transport = self._declare_per_item(camera_parameters(camera_id)[:1])
                self._declare_per_item(camera_parameters(camera_id, transport)[1:])
        for name in self.node.get_parameter("monitors").value:
            if name:
                self._declare_per_item(monitor_parameters(name))
        return read_config(lambda name: self.node.get_parameter(name).value, check_files)

    def _declare_per_item(self, params: tuple[Param, ...]):
        for param in params:
            self._per_item_params[param.name] = param
        self.declare(params)
        return self.node.get_parameter(params[0].name).value

    def spec(self, name: str) -> Param | None:
        return BY_NAME.get(name) or self._per_item_params.get(name)

    def _on_set(self, parameters: list[Parameter]) -> SetParametersResult:
        for parameter in parameters:
            param = self.spec(parameter.name)
            if param is None:
                continue  # not ours (e.g. use_sim_time): rclpy's own rules apply
            problem = param.check(parameter.value)
            if problem is None and param.name not in LIVE and self._configured():
                problem = (f"{param.name} is read at configure and the node is configured: it would be ignored. "
                           + ("Change monitors at run time through the set_monitor service" if
                              param.name.startswith("monitor") else
                              "Deactivate and clean up the node (ros2 lifecycle set), set it, then configure again"))
            if problem is None and param.name in LIVE and self._configured():
                problem = self._check_live(param.name, parameter.value)
            if problem is not None:
                return SetParametersResult(successful=False, reason=problem)
        for parameter in parameters:
            if parameter.name in LIVE and self._configured():
                self._apply_live(parameter.name, parameter.value)
        return SetParametersResult(successful=True)
