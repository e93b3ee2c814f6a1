"""Adapters that put gfl_ops' fused losses into the frameworks detectors train with.

- gfl_ops.integrations.mmdet: mmdetection 3.x (registered loss classes; stock names opt-in).
- gfl_ops.integrations.ultralytics: ultralytics' detection loss (patch / unpatch).

Each module imports its framework; gfl_ops itself never does.
"""
