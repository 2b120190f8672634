"""The options of the commands that run inference on a checkpoint (`dis infer`, `dis evaluate`,
`dis clean-tags run`): :mod:`dis_plugins.options` under their older names (``opt.BatchOpt``)."""

from __future__ import annotations

from dis_plugins.options import (DEVICE_HELP, FlipOpt, ScalesOpt, check_inputs, json_option,
                                 scales_of, steps_of)
from dis_plugins.options import InfAmpOpt as AmpOpt
from dis_plugins.options import InfBatchOpt as BatchOpt
from dis_plugins.options import InfDeviceOpt as DeviceOpt
from dis_plugins.options import InfLrOpt as LrOpt
from dis_plugins.options import InfMomentumOpt as MomentumOpt
from dis_plugins.options import InfQuietOpt as QuietOpt
from dis_plugins.options import InfOldWorkersOpt as OldWorkersOpt
from dis_plugins.options import InfWorkersOpt as WorkersOpt
from dis_plugins.options import OverlayFormatOpt

__all__ = ["AmpOpt", "BatchOpt", "DEVICE_HELP", "DeviceOpt", "FlipOpt", "LrOpt", "MomentumOpt",
           "OldWorkersOpt", "OverlayFormatOpt", "QuietOpt", "ScalesOpt", "WorkersOpt",
           "check_inputs", "json_option", "scales_of", "steps_of"]
