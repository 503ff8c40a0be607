"""Attribution methods, one file per family, registered by name.

>>> from saliencylab import methods
>>> methods.available()
>>> ig = methods.build("integrated_gradients", model, steps=32)
>>> e = ig.explain(x, target=None)        # Explanation: maps, lowres, targets, outputs, cost, extras
"""

from .base import (Method, Param, available, build, clean_outputs, describe, get, parameters, register,  # noqa: F401
                   registry)

# Importing the family modules registers their methods.
from . import gradient, integrated, smoothgrad, guided, cam, fullgrad, occlusion, rise  # noqa: F401,E402
from . import iba, readout_iba, input_iba, igos, extremal, sag, propagation, pathway  # noqa: F401,E402
from . import bcos  # noqa: F401,E402
from . import rollout  # noqa: F401,E402
from . import transformer  # noqa: F401,E402
