"""Attribution methods, one file per family, registered by name.

>>> from saliencylab import methods
>>> methods.available()
>>> ig = methods.build("integrated_gradients", model, steps=32)
>>> maps = ig.attribute(x, target=None)
"""

from .base import Method, available, build, describe, get, parameters, register  # noqa: F401

# Importing the family modules registers their methods.
from . import gradient, integrated, smoothgrad  # noqa: F401,E402

for _family in ("guided", "cam", "fullgrad", "occlusion", "rise", "iba", "readout_iba", "input_iba", "igos", "extremal", "sag"):
    try:  # families under construction register themselves once their module exists
        __import__(f"{__name__}.{_family}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_family}":
            raise
