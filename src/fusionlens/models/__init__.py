"""Reference fusion models (SimpleBEV-style): configs, camera / point encoders, BEV decoder, heads."""

from fusionlens.models.config import PRESETS, ModelConfig, preset_config
from fusionlens.models.fusion import FusionModel, batch_to_inputs, build_model
from fusionlens.models.points import RasterEncoder  # registers the built-in "raster" point encoder
from fusionlens.models.registry import register_head, register_point_encoder

__all__ = [
    "PRESETS", "FusionModel", "ModelConfig", "RasterEncoder", "batch_to_inputs", "build_model",
    "preset_config",
    "register_head", "register_point_encoder",
]
