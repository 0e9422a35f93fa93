"""The reference fusion model (SimpleBEV-style, LMD appendix A.2): per-modality BEV encoders, the fusion
layer, a BEV decoder and heads. The same class gives camera-only, radar-only, LiDAR-only and every
fusion of them.

Interface (docs/DESIGN.md)::

    model(camera=None, radar=None, lidar=None, *, intrinsics=None, cam_to_ego=None,
          radar_valid=None, lidar_valid=None) -> {"seg": (B,1,X,Y) logits, "center": (B,1,X,Y) logits,
                                                  "offset": (B,2,X,Y) metres, ...extra heads}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fusionlens.data.collate import collate_samples
from fusionlens.modalities import modality as get_modality
from fusionlens.models.bev import BEVDecoder, FusionLayer, Head
from fusionlens.models.camera import CameraEncoder, lift_to_bev
from fusionlens.models.config import ModelConfig
from fusionlens.models.registry import get_head, get_point_encoder
from fusionlens.spec import ModelSpec

BUILTIN_OUTPUTS: tuple[str, ...] = ("seg", "center", "offset")


class FusionModel(nn.Module):
    """A BEV segmentation network over any non-empty subset of {camera, radar, lidar}.

    Parameters live under ``encoders.<modality>`` (each modality's backbone) and ``fusion``, ``decoder``,
    ``heads``, ``extra_heads`` (the shared part) -- see :meth:`modality_groups`.
    """

    def __init__(self, config: ModelConfig, load_camera_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        grid = config.grid
        self.encoders = nn.ModuleDict()
        channels: dict[str, int] = {}
        for modality in config.modalities:
            if modality == "camera":
                weights = config.camera_weights if load_camera_weights else None
                self.encoders["camera"] = CameraEncoder(config.camera_depth, config.latent_dim, weights)
                channels["camera"] = config.latent_dim * grid.shape[2]
                continue
            name, kwargs = config.point_encoder(modality)
            if name == "raster":
                kwargs.setdefault("layers", config.point_bev_layers)
                kwargs.setdefault("channels", config.point_bev_channels)
                if modality == "radar":
                    kwargs.setdefault("use_metadata", config.use_radar_metadata)
            encoder = get_point_encoder(name)(modality, grid, **kwargs)
            if not isinstance(getattr(encoder, "out_channels", None), int):
                raise ValueError(f"point encoder {name!r} for {modality} has no integer 'out_channels'")
            self.encoders[modality] = encoder
            channels[modality] = encoder.out_channels
        self.bev_channels = channels
        self.fusion = FusionLayer(sum(channels.values()), config.fusion_dim)
        self.decoder = BEVDecoder(config.fusion_dim, config.decoder_width)
        width = self.decoder.out_channels
        self.heads = nn.ModuleDict({
            "seg": Head(width, config.head_dim, 1),
            "center": Head(width, config.head_dim, 1),
            "offset": Head(width, config.head_dim, 2),
        })
        self.extra_heads = nn.ModuleDict({name: get_head(name)(width, grid, **dict(kwargs))
                                          for name, kwargs in config.extra_heads.items()})

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    def modality_groups(self) -> dict[str, list[str]]:
        """Parameter names per modality backbone, and ``"fusion"`` for fusion layer + decoder + heads.

        Every parameter is in exactly one group; a parameter-free backbone has an empty list.
        """
        groups: dict[str, list[str]] = {m: [] for m in self.modalities}
        groups["fusion"] = []
        for name, _ in self.named_parameters():
            parts = name.split(".")
            key = parts[1] if parts[0] == "encoders" else "fusion"
            groups[key].append(name)
        return groups

    def _check_inputs(self, given: dict[str, torch.Tensor | None], kwargs: dict[str, Any]) -> int:
        extra = [m for m, t in given.items() if t is not None and m not in self.modalities]
        if extra:
            raise ValueError(f"model has modalities {list(self.modalities)} but was also given {extra}")
        missing = [m for m in self.modalities if given[m] is None]
        if missing:
            raise ValueError(f"model needs modality inputs {missing} "
                             f"(model modalities: {list(self.modalities)})")
        batch = {m: given[m].shape[0] for m in self.modalities}  # type: ignore[union-attr]
        if len(set(batch.values())) != 1:
            raise ValueError(f"modality inputs disagree on batch size: {batch}")
        b = next(iter(batch.values()))
        for modality in self.modalities:
            for key in get_modality(modality).kwargs:
                if kwargs.get(key) is None:
                    raise ValueError(f"modality {modality} needs keyword argument {key!r}")
        if "camera" in self.modalities:
            cam = given["camera"]
            if cam.dim() != 5 or cam.shape[2] != 3:  # type: ignore[union-attr]
                raise ValueError(f"camera: expected images (B, Ncam, 3, H, W), got {tuple(cam.shape)}")  # type: ignore[union-attr]
            n = cam.shape[1]  # type: ignore[union-attr]
            for key, tail in (("intrinsics", (3, 3)), ("cam_to_ego", (4, 4))):
                if tuple(kwargs[key].shape) != (b, n, *tail):
                    raise ValueError(f"{key}: expected shape {(b, n, *tail)}, got {tuple(kwargs[key].shape)}")
        return b

    def bev_features(self, camera: torch.Tensor | None = None, radar: torch.Tensor | None = None,
                     lidar: torch.Tensor | None = None, *, intrinsics: torch.Tensor | None = None,
                     cam_to_ego: torch.Tensor | None = None, radar_valid: torch.Tensor | None = None,
                     lidar_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each modality's BEV map ``(B, C_m, X, Y)`` -- the inputs of the fusion layer."""
        given = {"camera": camera, "radar": radar, "lidar": lidar}
        kwargs = {"intrinsics": intrinsics, "cam_to_ego": cam_to_ego, "radar_valid": radar_valid,
                  "lidar_valid": lidar_valid}
        self._check_inputs(given, kwargs)
        out: dict[str, torch.Tensor] = {}
        for modality in self.modalities:
            if modality == "camera":
                b, n = camera.shape[:2]  # type: ignore[union-attr]
                feats = self.encoders["camera"](camera.flatten(0, 1))  # type: ignore[union-attr]
                feats = feats.reshape(b, n, *feats.shape[1:])
                out["camera"] = lift_to_bev(feats, intrinsics, cam_to_ego,  # type: ignore[arg-type]
                                            tuple(camera.shape[-2:]), self.config.grid)  # type: ignore[union-attr]
            else:
                out[modality] = self.encoders[modality](given[modality], kwargs[f"{modality}_valid"])
        return out

    def decode(self, bev: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fusion layer, decoder and heads on the modalities' BEV maps (in the model's modality order)."""
        missing = [m for m in self.modalities if m not in bev]
        if missing:
            raise ValueError(f"decode: missing BEV features for {missing}")
        x = self.decoder(self.fusion([bev[m] for m in self.modalities]))
        out = {name: head(x) for name, head in self.heads.items()}
        for name, head in self.extra_heads.items():
            extra = head(x)
            clash = sorted(set(extra) & set(out))
            if clash:
                raise ValueError(f"extra head {name!r} returns keys {clash} that another head already uses")
            out.update(extra)
        return out

    def describe(self) -> ModelSpec:
        """This model to the analyses (:class:`fusionlens.spec.ModelSpec`): the built-in batch dicts, the seg logit,
        calibration / valid masks travelling with their modality, and the fusion layer's inputs as its fusion level."""
        return ModelSpec(
            self, inputs=lambda batch: batch_to_inputs(self, batch), output="seg",
            travels={m: get_modality(m).kwargs for m in self.modalities},
            fusion=(lambda inputs, kwargs: self.bev_features(**inputs, **kwargs), self.decode),
            collate=collate_samples, grid=self.config.grid, modalities=self.modalities)

    def forward(self, camera: torch.Tensor | None = None, radar: torch.Tensor | None = None,
                lidar: torch.Tensor | None = None, *, intrinsics: torch.Tensor | None = None,
                cam_to_ego: torch.Tensor | None = None, radar_valid: torch.Tensor | None = None,
                lidar_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        bev = self.bev_features(camera, radar, lidar, intrinsics=intrinsics, cam_to_ego=cam_to_ego,
                                radar_valid=radar_valid, lidar_valid=lidar_valid)
        return self.decode(bev)


def build_model(config: ModelConfig, load_camera_weights: bool = True) -> FusionModel:
    """A freshly initialised model for ``config`` (seed torch first for reproducible weights).

    ``config.camera_weights`` is where the camera trunk *started* from; a model about to receive a checkpoint's
    weights passes ``load_camera_weights=False`` so that the file need not exist any more.
    """
    return FusionModel(config, load_camera_weights)


def batch_to_inputs(model: FusionModel,
                    batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a collated batch dict into the model's modality inputs and its calibration / validity kwargs."""
    modalities = getattr(model, "modalities", None)
    if modalities is None:  # DDP or another wrapper
        modalities = model.module.modalities  # type: ignore[union-attr]
    inputs: dict[str, torch.Tensor] = {}
    kwargs: dict[str, Any] = {}
    for modality in modalities:
        key = get_modality(modality).batch_key
        if batch.get(key) is None:
            raise ValueError(f"batch has no {key!r} tensor but the model uses modality {modality}")
        inputs[modality] = batch[key]
        for kw in get_modality(modality).kwargs:
            if batch.get(kw) is None:
                raise ValueError(f"batch has no {kw!r} but the model uses modality {modality}")
            kwargs[kw] = batch[kw]
    return inputs, kwargs
