"""Importing this module opts in to gfl_ops.integrations.mmdet.use_fused_losses(): from a
config, ``custom_imports = dict(imports=["gfl_ops.integrations.mmdet.stock_names"])`` makes
its unchanged loss dicts ("QualityFocalLoss", ...) and GFLHead's Integral build the fused
classes. restore_stock_losses() forgets this import, so the next config that names it opts
in again."""

from . import use_fused_losses

use_fused_losses()
