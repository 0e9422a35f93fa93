"""``WorldConfig``: every knob of the built-in world, validated before any work starts.

Defaults are sized for CPU training (six 64x112 cameras — divisible by the camera encoders' stride 8 — a
96x96x8 BEV grid over SimpleBEV's +-50 m / +-5 m bounds, i.e. ~1.04 m cells so a car covers about 2x4 cells,
a 32-beam LiDAR at 1 degree azimuth steps and five radars with five sweeps). ``WorldConfig.paper()`` gives the
papers' resolution: 224x400 images and a 200x200x8 grid (LMD appendix A.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from fusionlens.data.sample import CLASSES, BEVGrid

TIMES_OF_DAY: tuple[str, ...] = ("day", "dusk", "night")
#: Independent per-sample events (weather, lighting, sensor faults) and what they do.
CONDITIONS: dict[str, str] = {
    "rain": "camera contrast loss and streaks; LiDAR range-dependent dropouts and near-range clutter",
    "fog": "camera haze towards the fog colour; LiDAR returns extinguished beyond a visibility distance",
    "glare": "one camera washed out by the sun (day or dusk only)",
    "camera_blackout": "one camera delivers black frames",
    "lens_occlusion": "a blob of dirt covers part of one camera",
    "radar_dropout": "one to three radars deliver nothing",
    "lidar_beam_loss": "half to most of the 32 LiDAR rings are missing",
}
ROAD_LAYOUTS: tuple[str, ...] = ("straight", "curve", "intersection")

DEFAULT_TIME_PROBS: dict[str, float] = {"day": 0.55, "dusk": 0.2, "night": 0.25}
DEFAULT_CONDITION_PROBS: dict[str, float] = {
    "rain": 0.2, "fog": 0.15, "glare": 0.2, "camera_blackout": 0.12, "lens_occlusion": 0.12,
    "radar_dropout": 0.12, "lidar_beam_loss": 0.2,
}
DEFAULT_LAYOUT_PROBS: dict[str, float] = {"straight": 0.4, "curve": 0.3, "intersection": 0.3}
DEFAULT_GRID = BEVGrid(bounds=((-50.0, 50.0), (-50.0, 50.0), (-5.0, 5.0)), shape=(96, 96, 8))
PAPER_GRID = BEVGrid(bounds=((-50.0, 50.0), (-50.0, 50.0), (-5.0, 5.0)), shape=(200, 200, 8))


def _check_probs(name: str, probs: dict[str, float], known: tuple[str, ...] | dict[str, str]) -> None:
    unknown = sorted(set(probs) - set(known))
    if unknown:
        raise ValueError(f"WorldConfig.{name}: unknown name(s) {unknown}; known: {sorted(known)}")
    for key, p in probs.items():
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"WorldConfig.{name}[{key!r}] must be a probability in [0, 1], got {p}")


@dataclass(frozen=True)
class WorldConfig:
    """Settings of the simulated world (sizes in pixels / metres / counts; probabilities in [0, 1])."""

    image_size: tuple[int, int] = (64, 112)  # (H, W) of each of the 6 cameras
    grid: BEVGrid = DEFAULT_GRID
    classes: tuple[str, ...] = CLASSES  # which labelled classes the world spawns
    vehicles: tuple[int, int] = (8, 20)  # min/max moving or stopped vehicles in lanes
    parked: tuple[int, int] = (2, 8)  # min/max parked vehicles at the kerb
    pedestrians: tuple[int, int] = (2, 10)
    time_probs: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIME_PROBS))
    condition_probs: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CONDITION_PROBS))
    layout_probs: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LAYOUT_PROBS))
    lidar_beams: int = 32
    lidar_azimuth_steps: int = 360  # horizontal samples per revolution (nuScenes' HDL-32E: ~1084)
    lidar_range: float = 70.0  # metres
    radar_sweeps: int = 5
    radar_range: float = 75.0  # metres (short-range mode of a Continental ARS408)
    radar_azimuth_step_deg: float = 1.0  # ray spacing of the radar's scene sampling
    radar_azimuth_noise_deg: float = 1.5  # the radar's coarse angular accuracy (1 sigma)
    sensor_noise: float = 1.0  # scales every random measurement error; 0 = exact sensors (for oracles)

    def __post_init__(self) -> None:
        if len(self.image_size) != 2 or any(int(s) <= 0 for s in self.image_size):
            raise ValueError(f"WorldConfig.image_size must be two positive integers (H, W), got {self.image_size}")
        if not isinstance(self.grid, BEVGrid):
            raise ValueError(f"WorldConfig.grid must be a BEVGrid, got {type(self.grid).__name__}")
        unknown = sorted(set(self.classes) - set(CLASSES))
        if unknown or not self.classes:
            raise ValueError(f"WorldConfig.classes: unknown or empty {unknown or list(self.classes)}; "
                             f"known: {list(CLASSES)}")
        for name in ("vehicles", "parked", "pedestrians"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"WorldConfig.{name} must be (min, max) with 0 <= min <= max, got {(lo, hi)}")
        _check_probs("time_probs", self.time_probs, TIMES_OF_DAY)
        if sum(self.time_probs.values()) <= 0:
            raise ValueError("WorldConfig.time_probs must give some time of day a positive weight")
        _check_probs("condition_probs", self.condition_probs, CONDITIONS)
        _check_probs("layout_probs", self.layout_probs, ROAD_LAYOUTS)
        if sum(self.layout_probs.values()) <= 0:
            raise ValueError("WorldConfig.layout_probs must give some road layout a positive weight")
        for name in ("lidar_beams", "lidar_azimuth_steps", "radar_sweeps"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"WorldConfig.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lidar_range", "radar_range", "radar_azimuth_step_deg"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"WorldConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("radar_azimuth_noise_deg", "sensor_noise"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        reach = max(abs(v) for lo_hi in self.grid.bounds[:2] for v in lo_hi)
        for name in ("lidar_range", "radar_range"):
            if reach > getattr(self, name):
                raise ValueError(f"WorldConfig.grid reaches {reach} m from the ego but {name} is only "
                                 f"{getattr(self, name)} m; shrink the grid bounds or raise {name}")

    @property
    def time_of_day_probs(self) -> dict[str, float]:
        """``time_probs`` with every time of day present and normalised to sum to 1."""
        total = sum(self.time_probs.values())
        return {t: self.time_probs.get(t, 0.0) / total for t in TIMES_OF_DAY}

    @classmethod
    def paper(cls, **overrides: Any) -> WorldConfig:
        """The papers' sensor resolution: 224x400 cameras, a 200x200x8 grid, ~1084 LiDAR azimuth steps."""
        base: dict[str, Any] = {"image_size": (224, 400), "grid": PAPER_GRID, "lidar_azimuth_steps": 1084}
        base.update(overrides)
        return cls(**base)

    def with_(self, **changes: Any) -> WorldConfig:
        """A copy with ``changes`` applied (and validated)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"WorldConfig has no setting(s) {unknown}; known: {sorted(names)}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (for cache manifests): equal configs give equal dicts."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["grid"] = {"bounds": [list(b) for b in self.grid.bounds], "shape": list(self.grid.shape)}
        for key in ("image_size", "classes", "vehicles", "parked", "pedestrians"):
            out[key] = list(out[key])
        for key in ("time_probs", "condition_probs", "layout_probs"):
            out[key] = dict(sorted(out[key].items()))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldConfig:
        data = dict(data)
        grid = data.pop("grid")
        g = BEVGrid(bounds=tuple(tuple(b) for b in grid["bounds"]), shape=tuple(grid["shape"]))  # type: ignore[arg-type]
        for key in ("image_size", "classes", "vehicles", "parked", "pedestrians"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(grid=g, **data)
