"""MobileVLM for ROS 2: an exact, fast vision-language core (``mobilevlm_ros.model``) and a thin node on top.

On a ROS machine colcon installs the generated interface modules (``msg``, ``srv``, ``action``) into the same
package directory; in a development checkout they are built into a separate prefix, and ``extend_path`` lets both
halves be found under the one package name.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
