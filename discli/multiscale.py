"""Multi-scale and flip testing (the paper's Table 4, column "multi."), combined with t_ts.

The views live in the inference runtime (:mod:`discli.runtime`, one place for every consumer);
this module keeps their public names: :func:`infer_views`, :func:`check_scales`,
:func:`parse_scales`, :func:`views`, :class:`FullResult`.
"""

from discli.runtime import (MIN_SIDE, FullResult, check_scales, infer_views,  # noqa: F401
                            parse_scales, views)

__all__ = ["MIN_SIDE", "FullResult", "check_scales", "infer_views", "parse_scales", "views"]
