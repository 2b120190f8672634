"""The synthetic benchmark, now the package :mod:`discli.synth`; re-exported here for older
imports (``from discli.data.synthetic import generate_benchmark``)."""

from __future__ import annotations

from discli.synth import *  # noqa: F401,F403
from discli.synth import __all__  # noqa: F401
