"""The reference models the reproductions prune and explain: one cache of trained checkpoints, and the cell trees
of ``fusionlens reproduce altermoma``.

The cache (:func:`train_cached`, :func:`checkpoint_name`) serves ``benchmarks/train_reference.py`` (the models of
``fusionlens reproduce lmd``) and the AlterMOMA runner alike: a checkpoint ``tiny_<modalities>[_pre][_seed<s>].pt``
(``tiny_camera-radar_pre.pt``; the modalities spelled by :func:`fusionlens.modalities.combination_name`) is reused
when it holds the expected architecture and schedule, continued when a run was cut off (the train loop saves
atomically every 50 steps), and refused, with the differences listed, when it was made with other settings -- a
cached model is never silently reused for another one, nor overwritten unless asked (``force``).

Two recipes (``ReproduceConfig.reference_recipe``):

* ``pretrained`` (the default; AlterMOMA sections 1 and 3.2): real camera-LiDAR fusion models load backbones that
  were pre-trained *separately* on each modality, so each learned to extract everything on its own and the fused
  model carries redundant features across modalities -- what alternative modality masking finds and prunes. Here:
  a world-pretrained camera trunk ``camera_trunk.pt`` (:func:`~fusionlens.train.camera_pretrain.pretrain_camera`,
  the stand-in for ImageNet) initialises every camera model; single-modality models ``tiny_<modality>.pt`` are
  trained alone with the fusion model's architecture settings, schedule and task; the fusion model
  ``tiny_<pair>_pre.pt`` loads their backbones (:func:`~fusionlens.train.pretrained.backbone_initialiser`) and
  trains with them frozen for ``reference_freeze_steps`` steps (:func:`~fusionlens.train.pretrained.freeze_hooks`),
  as ``benchmarks/train_reference.py --pretrained`` does.
* ``scratch``: the fusion model ``tiny_<pair>.pt`` trained jointly from random initialisation, camera trunk
  included.

Cell trees: the *variant* -- recipe, task, LiDAR encoder, camera ResNet depth -- decides where cells live.
``out_dir`` itself holds the scratch / segmentation / raster / ResNet-18 variant (the first layout, so the cells
made then are found again); every other variant lives in ``out_dir/<tag>``, e.g. ``pretrained``,
``pretrained-detection``, ``pretrained-detection-pillars``, ``pretrained-both-pillars-r34``. Each tree's
``recipe.json`` names its variant and a run of another variant is refused there, so cells of different recipes
can never mix; a tree holding cells but no ``recipe.json`` predates the file and is taken to be scratch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from fusionlens.experiments.reference import load_reference
from fusionlens.io import claim_settings
from fusionlens.modalities import combination_name, parse_modalities
from fusionlens.models import FusionModel, ModelConfig, preset_config

RECIPES: tuple[str, ...] = ("pretrained", "scratch")
RECIPE_TEXT: dict[str, str] = {
    "pretrained": "fusion model initialised from separately pre-trained single-modality backbones",
    "scratch": "fusion model trained jointly from scratch (no pre-trained backbone, no camera trunk)",
}
#: the variant of every cell made before the recipe existed; its cells stay at the top of ``out_dir``
LEGACY_VARIANT: dict[str, Any] = {"recipe": "scratch", "task": "segmentation", "lidar_encoder": "raster",
                                  "camera_depth": 18}
#: architecture fields the dedicated ReproduceConfig fields own (so the variant names every model difference)
MANAGED_FIELDS: tuple[str, ...] = ("modalities", "preset", "grid", "camera_depth", "camera_weights",
                                   "point_encoders", "extra_heads")
_CELL_DIRS = ("checkpoints", "dense", "unstructured", "structured", "ablation", "sweep", "variant")
_SCHEDULE = ("steps", "batch_size", "lr", "seed", "task")  # what a cached model must have been trained with
SAVE_EVERY = 50
CAMERA_TRUNK = "camera_trunk.pt"


# -- the cache of trained reference models ------------------------------------------------------------------------
def checkpoint_name(modalities: str | Iterable[str], pretrained: bool = False, seed: int | None = None) -> str:
    """File name of a cached reference model: ``tiny_camera-radar.pt``, ``tiny_camera-radar_pre.pt`` (from
    pre-trained backbones), ``tiny_radar_seed1.pt`` (another training seed)."""
    return (f"tiny_{combination_name(modalities)}{'_pre' if pretrained else ''}"
            f"{'' if seed is None else f'_seed{seed}'}.pt")


def camera_trunk(path: str | Path, depth: int, frames: int, steps: int, world_seed: int,
                 progress: bool = True) -> dict[str, Any]:
    """The world-pretrained camera trunk every camera model of the cache starts from (made once, continued when cut
    off, refused when made with other settings); its report."""
    from fusionlens.train.camera_pretrain import CameraPretrainConfig, pretrain_camera

    config = CameraPretrainConfig(depth=depth, world_seed=world_seed, frames=frames, steps=steps,
                                  batch_size=min(4, frames), val_frames=min(32, frames))
    return pretrain_camera(config, path, progress=progress)


def train_cached(path: str | Path, config: ModelConfig, schedule: Any, train_set: Dataset,
                 val_set: Dataset | None = None, init_from: dict[str, str] | None = None, freeze_steps: int = 0,
                 before: Callable[[], Any] | None = None, force: bool = False, progress: bool = True) -> Path:
    """``path`` holding ``config`` trained with ``schedule`` (a :class:`~fusionlens.train.loop.TrainConfig`): reused,
    continued, or trained. ``init_from``: modality -> checkpoint whose backbone starts the model, frozen for
    ``freeze_steps``; ``val_set``: scored at the end (the checkpoint's ``metrics``); ``before``: runs first when the
    model is trained from the start (it makes the camera trunk the config names). A checkpoint made with other
    settings raises ``ValueError`` listing them, unless ``force`` retrains it."""
    from fusionlens.train.checkpoint import load_checkpoint
    from fusionlens.train.loop import train
    from fusionlens.train.pretrained import backbone_initialiser, freeze_hooks

    path = Path(path)
    resume = False
    if path.is_file() and not force:
        payload = load_checkpoint(path)
        diff = _differences(payload, config, schedule.to_dict())
        if diff:
            raise ValueError(
                f"{path} was made with other settings -- "
                + "; ".join(f"{k}: wanted {a!r} vs saved {b!r}" for k, (a, b) in diff.items())
                + " -- delete it or use another --out"
            )
        if int(payload["step"]) >= schedule.steps:
            return path
        resume = True  # cut off mid-schedule: continue exactly where the last save left it
    if before is not None and not resume:
        before()
    prepare, hooks = None, (None, None)
    if init_from:
        prepare = backbone_initialiser(init_from)
        hooks = freeze_hooks(list(init_from), freeze_steps)
    train(config, schedule, train_set, val_set=val_set, checkpoint=path, resume=resume,
          prepare_model=prepare, step_hook=hooks[0], after_backward=hooks[1], progress=progress)
    return path


def _differences(payload: dict[str, Any], config: ModelConfig, schedule: dict[str, Any]) -> dict[str, tuple]:
    """Architecture and schedule settings a cached checkpoint differs in (name -> (wanted, saved)).

    The camera trunk's path is compared only as present / absent (the trunk file is checked on its own), and a
    checkpoint from before ``TrainConfig.task`` existed was trained for segmentation.
    """
    saved = ModelConfig.from_dict(payload["model_config"]).to_dict()
    wanted = config.to_dict()
    for d in (saved, wanted):
        d["camera_weights"] = d["camera_weights"] is not None
    diff = {k: (wanted[k], saved.get(k)) for k in wanted if wanted[k] != saved.get(k)}
    old = dict(payload.get("train_config") or {})
    old.setdefault("task", "segmentation")
    diff.update({k: (schedule[k], old.get(k)) for k in _SCHEDULE if schedule[k] != old.get(k)})
    return diff


# -- the AlterMOMA reproduction's variants and their cell trees ------------------------------------------------
def variant_of(cfg: Any) -> dict[str, Any]:
    """The settings of a ReproduceConfig that make different reference models (and so different cells)."""
    return {"recipe": cfg.reference_recipe, "task": cfg.task, "lidar_encoder": cfg.lidar_encoder,
            "camera_depth": int(cfg.camera_depth)}


def variant_tag(variant: dict[str, Any]) -> str:
    """Directory name of a variant: the recipe, then whatever differs from the defaults."""
    parts = [variant["recipe"]]
    if variant["task"] != "segmentation":
        parts.append(variant["task"])
    if variant["lidar_encoder"] != "raster":
        parts.append(variant["lidar_encoder"])
    if variant["camera_depth"] != 18:
        parts.append(f"r{variant['camera_depth']}")
    return "-".join(parts)


def cell_root(out_dir: str | Path, variant: dict[str, Any]) -> Path:
    """Where a variant's cells live: ``out_dir`` for the legacy variant, ``out_dir/<tag>`` for every other."""
    return Path(out_dir) if variant == LEGACY_VARIANT else Path(out_dir) / variant_tag(variant)


def describe(variant: dict[str, Any]) -> str:
    """One line for the dense cells and the head of results.md."""
    return (f"{RECIPE_TEXT[variant['recipe']]}; recipe `{variant['recipe']}`, task {variant['task']}, "
            f"LiDAR encoder {variant['lidar_encoder']}, camera ResNet-{variant['camera_depth']}")


def claim_root(root: Path, variant: dict[str, Any]) -> None:
    """Record ``variant`` in ``root/recipe.json``; ``ValueError`` when the tree holds another variant's cells."""
    legacy = any((root / d).exists() for d in _CELL_DIRS)  # cells from before recipe.json: the scratch recipe
    claim_settings(root / "recipe.json", variant, under="variant", extra={"reference": describe(variant)},
                   assumed=LEGACY_VARIANT if legacy else None, what="cells of another reference variant",
                   remedy=f"cells of different recipes must not mix: pass the parent folder as --out (each variant "
                          f"gets its own sub-tree; this one {variant_tag(variant)}) or another --out")


class ReferenceModels:
    """The reference models of one variant, cached in ``<root>/checkpoints`` (see the module doc)."""

    def __init__(self, cfg: Any, root: Path, data: Callable[[], tuple[Dataset, Dataset]], progress: bool) -> None:
        self.cfg, self.dir, self.data, self.progress = cfg, Path(root) / "checkpoints", data, progress

    @property
    def pretrained(self) -> bool:
        return self.cfg.reference_recipe == "pretrained"

    def model_config(self, modalities: str) -> ModelConfig:
        """The architecture of the model over ``modalities`` (``"camera-lidar"`` or one modality)."""
        c = self.cfg
        config = preset_config("tiny", parse_modalities(modalities), grid=self.data()[0][0].grid,
                               camera_depth=c.camera_depth, **c.model_overrides)
        changes: dict[str, Any] = {}
        if c.lidar_encoder != "raster" and "lidar" in config.modalities:
            changes["point_encoders"] = {"lidar": c.lidar_encoder}
        if c.task != "segmentation":
            changes["extra_heads"] = {"centerpoint": {}}
        if self.pretrained and "camera" in config.modalities:
            changes["camera_weights"] = str(self.dir / CAMERA_TRUNK)
        return config.with_(**changes) if changes else config

    def single(self, modality: str) -> Path:
        """The single-modality model whose backbone the pretrained fusion models start from."""
        return self._trained(self.dir / checkpoint_name([modality]), self.model_config(modality), validate=True)

    def fusion(self, pair: str) -> Path:
        """The checkpoint of the reference fusion model over ``pair`` (trained first when missing)."""
        config = self.model_config(pair)
        if not self.pretrained:
            return self._trained(self.dir / checkpoint_name(config.modalities), config)
        init = {m: str(self.single(m)) for m in config.modalities}
        return self._trained(self.dir / checkpoint_name(config.modalities, pretrained=True), config, init_from=init)

    def load(self, pair: str) -> FusionModel:
        model, _ = load_reference(self.fusion(pair))
        return model

    def provenance(self, pair: str) -> dict[str, Any]:
        """How the reference model of ``pair`` was made, for its dense cell."""
        from fusionlens.train.checkpoint import load_checkpoint

        out: dict[str, Any] = {"checkpoint": str(self.fusion(pair))}
        if self.pretrained:
            mods = self.model_config(pair).modalities
            out["freeze_steps"] = self.cfg.reference_freeze_steps
            out["camera_trunk"] = str(self.dir / CAMERA_TRUNK) if "camera" in mods else None
            out["initialised_from"] = {
                m: {"checkpoint": str(p), "val_iou": load_checkpoint(p)["metrics"].get("all")}
                for m, p in ((m, self.single(m)) for m in mods)
            }
        return out

    def _trained(self, path: Path, config: ModelConfig, init_from: dict[str, str] | None = None,
                 validate: bool = False) -> Path:
        from fusionlens.train.loop import TrainConfig

        c = self.cfg
        # device: where to train (a speed setting; fp32 there too, so a GPU-made model is the same recipe)
        schedule = TrainConfig(steps=c.reference_steps, batch_size=c.reference_batch, lr=c.reference_lr,
                               seed=c.data_seed, save_every=SAVE_EVERY, task=c.task,
                               device=getattr(c, "device", "cpu"), amp=False)
        train_set, val_set = self.data()
        return train_cached(path, config, schedule, train_set, val_set if validate else None, init_from=init_from,
                            freeze_steps=c.reference_freeze_steps, progress=self.progress,
                            before=self._camera_trunk if config.camera_weights is not None else None)

    def _camera_trunk(self) -> None:
        c = self.cfg
        camera_trunk(self.dir / CAMERA_TRUNK, c.camera_depth, c.trunk_frames, c.trunk_steps, c.data_seed,
                     progress=self.progress)
