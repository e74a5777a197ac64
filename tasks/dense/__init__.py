"""Dense tasks on OpenMMLab: our Encoders as an mmengine backbone, data conversion, heads, training and
metrics. Nothing here is imported when the tasks register (``tasks.segmentation`` / ``tasks.detection``
import :mod:`tasks.dense.run`, which imports mmcv, mmdet and mmseg only when a dense run starts)."""
