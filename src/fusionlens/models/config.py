"""Configuration of the reference fusion models: which modalities, how big, which plug-ins.

A :class:`ModelConfig` is a plain dataclass that round-trips through :meth:`ModelConfig.to_dict` /
:meth:`ModelConfig.from_dict` (checkpoints store it), and three size presets follow SimpleBEV (LMD appendix
A.2, Table 3) at decreasing scale:

* ``paper``: ResNet-101, 224x400 images, a 200x200x8 grid over +-50 m, 128 latent channels (SimpleBEV).
* ``small``: ResNet-34, 128x224 images, 100x100x8 grid, 64 channels.
* ``tiny``: ResNet-18, 64x112 images, 96x96x8 grid, 16 channels -- trains on two CPU cores in minutes.

Point modalities go through a *point encoder* chosen per modality by name (``point_encoders``); the built-in
``"raster"`` encoder rasterises points into the voxel grid (SimpleBEV) and optionally adds a few learnable BEV
convolutions. Other encoders (e.g. pillars) and extra output heads (e.g. a CenterPoint detection head)
register themselves in :mod:`fusionlens.models.registry` and are selected here by name, with
keyword arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from fusionlens.data.sample import BEVGrid
from fusionlens.modalities import NAMES as MODALITIES

CAMERA_DEPTHS: tuple[int, ...] = (18, 34, 50, 101)
PRESETS: tuple[str, ...] = ("tiny", "small", "paper")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a fusion model (and nothing about training)."""

    modalities: tuple[str, ...] = ("camera", "radar")
    preset: str = "tiny"
    # the built-in world's default grid: SimpleBEV's bounds at ~1 m cells
    grid: BEVGrid = field(default_factory=lambda: BEVGrid(((-50.0, 50.0), (-50.0, 50.0), (-5.0, 5.0)),
                                                          (96, 96, 8)))
    image_size: tuple[int, int] = (64, 112)  # (H, W) the preset is sized for; the model accepts any size
    camera_depth: int = 18  # torchvision ResNet depth
    camera_weights: str | None = None  # optional local state-dict file for the ResNet trunk (no downloads)
    latent_dim: int = 16  # C: camera feature channels per voxel before BEV compression (C*Z channels)
    use_radar_metadata: bool = True  # 16 channels per height bin (SimpleBEV); else occupancy only
    point_encoders: dict[str, str] = field(default_factory=dict)  # modality -> registered encoder name
    point_encoder_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    point_bev_layers: int = 1  # learnable 3x3 BEV convs after the built-in rasteriser (0 = parameter-free)
    point_bev_channels: int = 32
    fusion_dim: int = 64  # output channels of the fusion layer (3x3 conv, InstanceNorm, GELU)
    decoder_width: int = 32  # ResNet-18 base width of the BEV decoder (64 in the paper)
    head_dim: int = 32  # hidden channels of the seg / centre / offset heads
    extra_heads: dict[str, dict[str, Any]] = field(default_factory=dict)  # registered head name -> kwargs

    def __post_init__(self) -> None:
        mods = tuple(self.modalities)
        if not mods:
            raise ValueError("ModelConfig.modalities must name at least one of " + ", ".join(MODALITIES))
        unknown = [m for m in mods if m not in MODALITIES]
        if unknown:
            raise ValueError(f"ModelConfig.modalities: unknown {unknown}; choose from {list(MODALITIES)}")
        if len(set(mods)) != len(mods):
            raise ValueError(f"ModelConfig.modalities has duplicates: {list(mods)}")
        # canonical order so that 'radar,camera' and 'camera,radar' are the same model
        object.__setattr__(self, "modalities", tuple(m for m in MODALITIES if m in mods))
        if self.preset not in PRESETS and self.preset != "custom":
            raise ValueError(f"ModelConfig.preset must be one of {list(PRESETS)} or 'custom', "
                             f"got {self.preset!r}")
        if self.camera_depth not in CAMERA_DEPTHS:
            raise ValueError(f"ModelConfig.camera_depth must be one of {CAMERA_DEPTHS}, "
                             f"got {self.camera_depth}")
        for name in ("latent_dim", "point_bev_channels", "fusion_dim", "decoder_width", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.point_bev_layers < 0:
            raise ValueError(f"ModelConfig.point_bev_layers must be >= 0, got {self.point_bev_layers}")
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise ValueError(f"ModelConfig.image_size must be (H, W) >= 8, got {self.image_size}")
        for mod in list(self.point_encoders) + list(self.point_encoder_kwargs):
            if mod not in ("radar", "lidar"):
                raise ValueError(f"ModelConfig.point_encoders: {mod!r} is not a point modality "
                                 "(radar, lidar)")
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))

    def point_encoder(self, modality: str) -> tuple[str, dict[str, Any]]:
        """The registered encoder name and its keyword arguments for a point modality."""
        return self.point_encoders.get(modality, "raster"), dict(self.point_encoder_kwargs.get(modality, {}))

    def with_(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        if "grid" in changes and isinstance(changes["grid"], dict):
            changes["grid"] = _grid_from_dict(changes["grid"])
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["grid"] = {"bounds": [list(b) for b in self.grid.bounds], "shape": list(self.grid.shape)}
        out["modalities"] = list(self.modalities)
        out["image_size"] = list(self.image_size)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown} (checkpoint from a newer fusionlens?)")
        kwargs = dict(data)
        if "grid" in kwargs:
            kwargs["grid"] = _grid_from_dict(kwargs["grid"])
        for key in ("modalities", "image_size"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def _grid_from_dict(data: dict[str, Any] | BEVGrid) -> BEVGrid:
    if isinstance(data, BEVGrid):
        return data
    bounds = tuple(tuple(float(v) for v in b) for b in data["bounds"])
    return BEVGrid(bounds=bounds, shape=tuple(int(v) for v in data["shape"]))  # type: ignore[arg-type]


_PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "tiny": {},  # the dataclass defaults
    "small": dict(
        grid=BEVGrid(((-50.0, 50.0), (-50.0, 50.0), (-5.0, 5.0)), (100, 100, 8)), image_size=(128, 224),
        camera_depth=34, latent_dim=64, point_bev_channels=64, fusion_dim=128, decoder_width=64, head_dim=64,
    ),
    # SimpleBEV as configured in LMD Table 3 (ResNet-101, 224x400, 200x8x200); its radar/LiDAR branch is
    # the parameter-free rasteriser, so no learnable point convolutions.
    "paper": dict(
        grid=BEVGrid(((-50.0, 50.0), (-50.0, 50.0), (-5.0, 5.0)), (200, 200, 8)), image_size=(224, 400),
        camera_depth=101, latent_dim=128, point_bev_layers=0, fusion_dim=128, decoder_width=64, head_dim=128,
    ),
}


def preset_config(preset: str = "tiny", modalities: tuple[str, ...] | list[str] | str = ("camera", "radar"),
                  **overrides: Any) -> ModelConfig:
    """The config of a size preset for a subset of modalities (``"camera,radar"`` or a sequence)."""
    if preset not in _PRESET_FIELDS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    if isinstance(modalities, str):
        modalities = tuple(m.strip() for m in modalities.split(",") if m.strip())
    values = dict(_PRESET_FIELDS[preset], preset=preset, modalities=tuple(modalities))
    values.update(overrides)
    if "grid" in values and isinstance(values["grid"], dict):
        values["grid"] = _grid_from_dict(values["grid"])
    return ModelConfig(**values)
