"""The options of `dis pretrain` and `dis finetune`: now :mod:`dis_plugins.options` (this older
name is kept for plugins that import it)."""

from __future__ import annotations

from dis_plugins.options import *  # noqa: F401,F403
from dis_plugins.options import (_FIELDS, build_config, key_option, parse_ints,  # noqa: F401
                                 parse_sets, shown_default)
