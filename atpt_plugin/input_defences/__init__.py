"""Input defences: what changes a test image before any view is made (TTC's counterattack).

An input defence maps a batch of [0,1] images to defended [0,1] images of the same shape,
each image on its own, with its randomness from the adapter's per-image generator (so a
result depends only on the seed and the image). When the caller tracks the input's
gradient (an adaptive attack), the output must stay differentiable w.r.t. the input.
Register one with `@INPUT_DEFENCES.register("name")` or, from another package, under the
entry-point group `atpt_plugin.input_defences`; choose it with `input_defence="name"`.
"""

from .base import INPUT_DEFENCES, InputDefence
from .counterattack import TestTimeCounterattack, counterattack_weights

__all__ = ["INPUT_DEFENCES", "InputDefence", "TestTimeCounterattack", "counterattack_weights"]
