"""Memory and layout planner (`moe plan`): per-rank memory from the model config alone, layouts ranked by an
estimated step time, and the start-up check `check_fits` that `moe train` runs before loading weights.

    from trainer.planner import check_fits
    check_fits(recipe, hf_config, world_size, torch.cuda.get_device_properties(0).total_memory / 2**30)
"""

from trainer.planner.fit_check import check_fits, request_from_recipe
from trainer.planner.hardware import GPU_PRESETS, gpu_preset
from trainer.planner.layout import Layout, PlanOptions
from trainer.planner.memory import MemoryEstimate, estimate_memory
from trainer.planner.model_shape import ModelShape, shape_from_config
from trainer.planner.model_source import load_model_config

__all__ = [
    "GPU_PRESETS", "Layout", "MemoryEstimate", "ModelShape", "PlanOptions", "check_fits", "estimate_memory",
    "gpu_preset", "load_model_config", "request_from_recipe", "shape_from_config",
]
