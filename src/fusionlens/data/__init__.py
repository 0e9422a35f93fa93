"""Datasets in one schema (:class:`Sample` on a :class:`BEVGrid`): the built-in simulated world
(:class:`BuiltinWorld`, the default) and real nuScenes through nuscenes-devkit (:class:`NuScenesDataset`, optional
extra ``fusionlens[nuscenes]``; the devkit is imported only when a dataset is opened). :func:`collate_samples`
batches samples for the models, :func:`batch_loader` is a (seeded, optionally shuffled) DataLoader of such batches
over any of these datasets; :func:`boxes_to_bev` rasterises boxes into SimpleBEV's label maps."""

from fusionlens.data.builtin import BuiltinWorld
from fusionlens.data.collate import batch_loader, collate_samples
from fusionlens.data.labels import boxes_to_bev
from fusionlens.data.nuscenes import NuScenesDataset
from fusionlens.data.sample import BEVGrid, Sample

__all__ = ["BEVGrid", "BuiltinWorld", "NuScenesDataset", "Sample", "batch_loader", "boxes_to_bev", "collate_samples"]
