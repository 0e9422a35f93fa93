"""``fusionlens reproduce altermoma``: the AlterMOMA tables on the built-in world, resumably.

The reference models (:mod:`fusionlens.experiments.reference_models`): by default (``reference_recipe="pretrained"``)
each fusion model is initialised from separately pre-trained single-modality backbones -- the setting AlterMOMA
prunes; ``"scratch"`` trains it jointly from scratch. ``task`` picks what they are trained and scored for:
``"segmentation"`` (vehicle IoU, Table 3 layout), ``"detection"`` (a CenterPoint head, nuScenes
mAP / NDS, Table 1 layout) or ``"both"``; ``lidar_encoder="pillars"`` and ``camera_depth`` (ResNet-18/34/50/101)
give Table 4's "various backbones". The pruning loss is the training loss of that task (``reference_loss``).

    # Table 1 (detection: mAP / NDS), Table 3 (segmentation: IoU), Table 4 (PointPillars LiDAR backbone; add
    # --camera-depth 34/50/101 for a deeper camera ResNet)
    fusionlens reproduce altermoma --pairs camera,lidar --task detection
    fusionlens reproduce altermoma
    fusionlens reproduce altermoma --pairs camera,lidar --task detection --lidar-encoder pillars

Grids (each cell one JSON file under the variant's cell tree, :class:`~fusionlens.experiments.cells.CellStore`;
an existing cell is never recomputed, so an interrupted run resumes where it stopped and loses nothing); pairs are
spelled ``camera-lidar`` (:func:`fusionlens.modalities.combination_name`):

* ``dense/<pair>.json`` -- the reference model (camera-lidar, camera-radar), how it was made, its val metrics;
* ``unstructured/<pair>/<method>/s<rho>/seed<k>.json`` -- Table 1/3 style: every method at 80/85/90%;
* ``structured/<pair>/<method>/r<ratio>/seed<k>.json`` -- Table 5 style: channel ratio 30/50%, metrics, GFLOPs,
  CPU latency before and after;
* ``ablation/<pair>/b<beta>/s<rho>/seed<k>.json`` -- appendix F: AlterMOMA at several beta/alpha;
* ``readings/<pair>/altermoma_<options>/s<rho>/seed<k>.json`` -- AlterMOMA under another reading of the paper
  (``altermoma_options``: D as n batches, the same batches for g_B, Adam reactivation, B; docs/altermoma.md),
  main grid and beta/alpha ablation alike, beside the other methods' cells of the same tree.

The cell tree is ``out_dir/<tag>`` (e.g. ``pretrained``, ``pretrained-detection-pillars``), except for the
scratch / segmentation / raster / ResNet-18 variant, whose cells stay in ``out_dir`` itself where they were made
before the recipe existed; ``recipe.json`` in each tree makes mixing variants impossible (see
:mod:`fusionlens.experiments.reference_models`). ``results.md`` and ``ablation.png`` are written into the tree.

Every cell: score the reference model, prune, fine-tune ``finetune_steps`` Adam steps with masks fixed (or
on the physically smaller model), evaluate on the validation split: vehicle IoU always, and mAP / NDS (with
the TP errors) when the model has a detection head.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fusionlens.data.collate import batch_loader
from fusionlens.experiments.cells import CellStore
from fusionlens.experiments.reference import CALIBRATION_INPUTS, example_inputs, reference_loss
from fusionlens.experiments.reference_models import (
    MANAGED_FIELDS,
    RECIPES,
    ReferenceModels,
    cell_root,
    claim_root,
    describe,
    variant_of,
)
from fusionlens.io import atomic_write_json, claim_settings
from fusionlens.modalities import combination_name
from fusionlens.models import FusionModel, ModelConfig
from fusionlens.models.config import CAMERA_DEPTHS
from fusionlens.prune.api import METHODS, prune
from fusionlens.prune.cost import cost_report
from fusionlens.prune.params import LossFn, prunable_parameters
from fusionlens.train.loop import TASKS, move_batch


@dataclass
class ReproduceConfig:
    out_dir: str = "out/reproduce/altermoma"
    pairs: tuple[str, ...] = ("camera-lidar", "camera-radar")  # any spelling parse_modalities reads
    methods: tuple[str, ...] = METHODS
    sparsities: tuple[float, ...] = (0.8, 0.85, 0.9)
    seeds: tuple[int, ...] = (0, 1, 2)
    structured_methods: tuple[str, ...] = ("magnitude", "snip", "prospr", "altermoma")
    structured_ratios: tuple[float, ...] = (0.3, 0.5)
    ablation_betas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    ablation_pair: str | None = None  # default: the first pair; beta = 1 reuses the main grid's cells
    ablation_sparsities: tuple[float, ...] | None = None  # default: ``sparsities``
    train_size: int = 192
    val_size: int = 64
    data_seed: int = 0
    # the reference models: the tiny preset with a slimmer BEV decoder so the grid fits on a CPU
    model_overrides: dict[str, Any] = field(
        default_factory=lambda: {"fusion_dim": 32, "decoder_width": 16, "head_dim": 16, "point_bev_channels": 16}
    )
    reference_steps: int = 200
    reference_batch: int = 4
    reference_lr: float = 3e-3
    # how the reference models are made (see fusionlens.experiments.reference_models): "pretrained" | "scratch"
    reference_recipe: str = "pretrained"
    reference_freeze_steps: int = 50  # pretrained: fusion training keeps the loaded backbones frozen this long
    trunk_frames: int = 512  # pretrained: world frames and steps of the camera trunk's pre-training
    trunk_steps: int = 600
    # what they are trained and scored for, and their backbones (Tables 1 / 3 / 4)
    task: str = "segmentation"  # "segmentation" | "detection" | "both"
    lidar_encoder: str = "raster"  # a registered point encoder: "raster" (SimpleBEV) or "pillars" (PointPillars)
    camera_depth: int = 18  # the camera ResNet's depth
    batch_size: int = 2
    # the paper fine-tunes with Adam at lr 1e-4; 1e-3 degrades even an unpruned model here (benchmarks/RESULTS.md)
    finetune_steps: int = 200
    finetune_lr: float = 1e-4
    # a reading of AlterMOMA (options of fusionlens.prune.AlterMOMA, e.g. {"reference_batches": 8}): its cells are
    # filed under readings/ by these options, so one tree holds every reading next to the baselines
    altermoma_options: dict[str, Any] = field(default_factory=dict)
    # where cells and reference models compute ("cpu" or "cuda"): a speed setting, not part of the protocol
    device: str = "cpu"
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "imp": {"rounds": 2, "steps_per_round": 20, "lr": 1e-3},
            "synflow": {"iterations": 20},
            "prospr": {"inner_steps": 3, "inner_lr": 1e-2, "momentum": 0.9},
            "snip": {"n_batches": 1},
        }
    )

    def __post_init__(self) -> None:
        # one spelling of a pair in cells, paths and tables, whichever the caller used
        self.pairs = tuple(combination_name(p) for p in self.pairs)
        if self.ablation_pair is not None:
            self.ablation_pair = combination_name(self.ablation_pair)

    def validate(self) -> None:
        for rho in self.sparsities:
            if not 0 <= rho < 1:
                raise ValueError(f"sparsities must lie in [0, 1), got {rho}")
        for r in self.structured_ratios:
            if not 0 <= r < 1:
                raise ValueError(f"structured_ratios must lie in [0, 1), got {r}")
        bad = [m for m in (*self.methods, *self.structured_methods) if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {list(METHODS)}")
        if not self.seeds:
            raise ValueError("seeds is empty")
        if self.ablation_pair is not None and self.ablation_pair not in self.pairs:
            raise ValueError(f"ablation_pair {self.ablation_pair!r} is not one of pairs {list(self.pairs)}")
        if self.reference_recipe not in RECIPES:
            raise ValueError(f"reference_recipe must be one of {list(RECIPES)}, got {self.reference_recipe!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        from fusionlens.models.registry import get_point_encoder

        get_point_encoder(self.lidar_encoder)  # ValueError naming the registered encoders
        if self.camera_depth not in CAMERA_DEPTHS:
            raise ValueError(f"camera_depth must be one of {list(CAMERA_DEPTHS)}, got {self.camera_depth}")
        managed = sorted(set(self.model_overrides) & set(MANAGED_FIELDS))
        if managed:
            raise ValueError(f"model_overrides may not set {managed}: the pairs, task, lidar_encoder, camera_depth "
                             "and reference_recipe settings own them")
        for name in ("trunk_frames", "trunk_steps", "reference_steps", "reference_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.reference_freeze_steps < 0:
            raise ValueError(f"reference_freeze_steps must be >= 0, got {self.reference_freeze_steps}")
        if self.altermoma_options:
            from fusionlens.prune.altermoma import AlterMOMA
            from fusionlens.prune.api import METHOD_OPTIONS

            # the option names and values are checked here, before any reference model is trained
            unknown = sorted(set(self.altermoma_options) - set(METHOD_OPTIONS["altermoma"]))
            if unknown:
                raise ValueError(f"altermoma_options: AlterMOMA takes options {list(METHOD_OPTIONS['altermoma'])}, "
                                 f"not {unknown}")
            AlterMOMA(reference_loss(), [], **self.altermoma_options)
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            raise ValueError(f"device must be 'cpu' or 'cuda[:k]', got {self.device!r}") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device!r} but no GPU is available")


#: settings that change what a cell measures (the grid's methods, sparsities and seeds only select cells)
PROTOCOL_FIELDS: tuple[str, ...] = (
    "train_size", "val_size", "data_seed", "model_overrides", "reference_steps", "reference_batch", "reference_lr",
    "reference_freeze_steps", "trunk_frames", "trunk_steps", "batch_size", "finetune_steps", "finetune_lr",
    "method_options",
)


def _claim_protocol(root: Path, config: ReproduceConfig) -> None:
    """Record the cell protocol in ``root/protocol.json``; ``ValueError`` if the tree's cells used another one.

    Cell files are keyed by pair, method, sparsity and seed only, so a run with, say, another fine-tuning length
    would otherwise silently reuse cells measured with the old one."""
    claim_settings(root / "protocol.json", {k: getattr(config, k) for k in PROTOCOL_FIELDS},
                   what="cells measured with another protocol", remedy="pass another --out to measure this one")


class Runner:
    """Runs the grids of a :class:`ReproduceConfig`; each finished cell is a JSON file (atomic)."""

    def __init__(self, config: ReproduceConfig, progress: bool = True) -> None:
        config.validate()
        self.cfg, self.progress = config, progress
        self.variant = variant_of(config)
        self.out = cell_root(config.out_dir, self.variant)  # this variant's cell tree (module docstring)
        claim_root(self.out, self.variant)  # before any work: refuses a tree of another recipe
        _claim_protocol(self.out, config)  # ... and one whose cells were measured another way
        self._data: tuple[Dataset, Dataset] | None = None
        self.store = CellStore(self.out)
        self.models = ReferenceModels(config, self.out, self.data, progress)
        atomic_write_json(self.out / "config.json", asdict(config))

    # -- data and reference models ----------------------------------------------------------------------
    def data(self) -> tuple[Dataset, Dataset]:
        if self._data is None:
            from fusionlens.train.data import open_dataset

            self._data = (
                open_dataset(
                    "builtin", "train", size=self.cfg.train_size, seed=self.cfg.data_seed, progress=self.progress
                ),
                open_dataset("builtin", "val", size=self.cfg.val_size, seed=self.cfg.data_seed, progress=self.progress),
            )
        return self._data

    def model_config(self, pair: str) -> ModelConfig:
        return self.models.model_config(pair)

    def reference(self, pair: str) -> FusionModel:
        """The reference model of ``pair`` under this run's recipe (trained first when missing), on ``device``."""
        return self.models.load(pair).to(self.cfg.device)

    def loss(self) -> LossFn:
        """The pruning loss: the reference models' training loss for ``task`` (batches moved to ``device``)."""
        loss = reference_loss(task=self.cfg.task)
        device = torch.device(self.cfg.device)
        if device.type == "cpu":
            return loss
        return lambda model, batch: loss(model, move_batch(batch, device))

    def example(self, model: FusionModel, batch: dict[str, Any]) -> dict[str, Any]:
        """One sample's keyword inputs on ``device`` (SynFlow, Torch-Pruning, the cost report)."""
        return move_batch(example_inputs(model, batch), torch.device(self.cfg.device))

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Val metrics of a cell: ``iou`` (vehicle IoU), and ``mAP`` / ``NDS`` / ``detection`` (TP errors,
        per-class AP) when the model has a detection head."""
        from fusionlens.train.loop import evaluate

        val = self.data()[1]
        iou = evaluate(model, val, batch_size=4, device=self.cfg.device, progress=False)["all"]  # type: ignore[arg-type]
        out: dict[str, Any] = {"iou": float(iou)}
        if model.config.extra_heads.get("centerpoint") is not None:  # type: ignore[union-attr]
            from fusionlens.evaluate.detection import TP_METRIC_NAMES, evaluate_detector

            report = evaluate_detector(model, val, batch_size=4, device=self.cfg.device, progress=False).to_dict()
            keep = (*TP_METRIC_NAMES.values(), "class_aps", "num_gt", "num_pred")
            out.update(mAP=report["mAP"], NDS=report["NDS"], detection={k: report[k] for k in keep})
        return out

    # -- cells ------------------------------------------------------------------------------------------------
    def dense(self, pair: str) -> dict[str, Any]:
        pair = combination_name(pair)

        def compute() -> dict[str, Any]:
            model = self.reference(pair)
            first = batch_loader(self.data()[1], 1, shuffle=True, seed=0, drop_last=True)
            ex = self.example(model, next(iter(first)))
            return {
                "pair": pair,
                "reference": describe(self.variant),
                **self.variant,
                **self.models.provenance(pair),
                **self.evaluate(model),
                "cost": cost_report(model, ex, repeats=5),
                "n_prunable": sum(model.get_parameter(n).numel() for n in prunable_parameters(model)),
            }

        return self.store.compute(f"dense/{pair}.json", compute)

    def _options(self, method: str, seed: int, beta: float | None = None) -> dict[str, Any]:
        opts = dict(self.cfg.method_options.get(method, {}))
        if method == "random":
            opts["seed"] = seed
        if method == "synflow":
            opts["keep_inputs"] = CALIBRATION_INPUTS
        if method == "altermoma" and beta is not None:
            opts["beta"] = beta
        return opts

    def unstructured(
        self,
        pair: str,
        method: str,
        rho: float,
        seed: int,
        beta: float | None = None,
        options: dict[str, Any] | None = None,
        group: str | None = None,
    ) -> dict[str, Any]:
        """One pruned + fine-tuned + evaluated cell. ``beta`` files it under the ablation; ``options`` (extra
        method options) with ``group`` under ``<group>/<pair>/<options>/...`` (e.g. the B / lr sweep)."""
        pair = combination_name(pair)
        if options:
            tag = "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(options.items()))
            rel = f"{group or 'sweep'}/{pair}/{method}_{tag}/s{rho:g}/seed{seed}.json"
        elif beta is not None:
            rel = f"ablation/{pair}/b{beta:g}/s{rho:g}/seed{seed}.json"
        else:
            rel = f"unstructured/{pair}/{method}/s{rho:g}/seed{seed}.json"

        def compute() -> dict[str, Any]:
            torch.manual_seed(seed)
            model = self.reference(pair)
            train_set, val_set = self.data()
            batches = batch_loader(train_set, self.cfg.batch_size, shuffle=True, seed=seed, drop_last=True)
            ex_batch = next(iter(batch_loader(val_set, 1, shuffle=True, seed=0, drop_last=True)))
            result = prune(
                model,
                method,
                rho,
                loss_fn=self.loss(),
                batches=batches,
                input_factory=lambda: self.example(model, ex_batch),
                finetune_steps=self.cfg.finetune_steps,
                finetune_lr=self.cfg.finetune_lr,
                progress=self.progress,
                **{**self._options(method, seed, beta), **(options or {})},
            )
            report = {k: v for k, v in result.report.items() if k != "prunable"}
            return {
                "pair": pair,
                "method": method,
                "sparsity": rho,
                "seed": seed,
                "beta": beta,
                "extra_options": options or {},
                "task": self.cfg.task,
                **self.evaluate(result.model),
                **report,
            }

        return self.store.compute(rel, compute)

    def structured(self, pair: str, method: str, ratio: float, seed: int) -> dict[str, Any]:
        pair = combination_name(pair)

        def compute() -> dict[str, Any]:
            torch.manual_seed(seed)
            model = self.reference(pair)
            train_set, val_set = self.data()
            batches = batch_loader(train_set, self.cfg.batch_size, shuffle=True, seed=seed, drop_last=True)
            ex = self.example(model, next(iter(batch_loader(val_set, 1, shuffle=True, seed=0, drop_last=True))))
            result = prune(
                model,
                method,
                ratio,
                structured=True,
                example_inputs=ex,
                loss_fn=self.loss(),
                batches=batches,
                finetune_steps=self.cfg.finetune_steps,
                finetune_lr=self.cfg.finetune_lr,
                **self._options(method, seed),
            )
            small = result.model
            return {
                "pair": pair,
                "method": method,
                "ratio": ratio,
                "seed": seed,
                "task": self.cfg.task,
                **self.evaluate(small),
                "before": cost_report(model, ex, repeats=5),
                "after": cost_report(small, ex, repeats=5),
                **{k: v for k, v in result.report.items() if k not in ("prunable", "method", "options")},
            }

        return self.store.compute(f"structured/{pair}/{method}/r{ratio:g}/seed{seed}.json", compute)

    # -- the whole run ----------------------------------------------------------------------------------------
    def _altermoma(self, pair: str, rho: float, seed: int, beta: float | None = None) -> tuple[str, tuple]:
        """The AlterMOMA cell at ``beta`` (``None``: the main grid's alpha = beta = 1) under this run's reading."""
        reading = dict(self.cfg.altermoma_options)
        if not reading:
            return ("unstructured", (pair, "altermoma", rho, seed)) if beta is None else (
                "ablation", (pair, "altermoma", rho, seed, beta))
        if beta is not None:
            reading["beta"] = beta
        return "unstructured", (pair, "altermoma", rho, seed, None, reading, "readings")

    def jobs(self) -> Iterator[tuple[str, tuple]]:
        c = self.cfg
        for pair in c.pairs:
            yield "dense", (pair,)
        for seed in c.seeds:
            for pair in c.pairs:
                for rho in c.sparsities:
                    for method in c.methods:
                        if method == "altermoma":
                            yield self._altermoma(pair, rho, seed)
                        else:
                            yield "unstructured", (pair, method, rho, seed)
        for seed in c.seeds[:1]:
            for pair in c.pairs:
                for ratio in c.structured_ratios:
                    for method in c.structured_methods:
                        yield "structured", (pair, method, ratio, seed)
            pair = c.ablation_pair or c.pairs[0]
            for rho in c.ablation_sparsities or c.sparsities:
                for beta in c.ablation_betas:
                    # alpha = beta = 1 is the main grid's AlterMOMA cell
                    yield self._altermoma(pair, rho, seed, None if beta == 1.0 else beta)

    def run(self) -> None:
        from tqdm import tqdm

        jobs = list(self.jobs())
        for kind, args in tqdm(jobs, desc="reproduce altermoma", disable=not self.progress):
            if kind == "dense":
                self.dense(*args)
            elif kind == "structured":
                self.structured(*args)
            else:
                self.unstructured(*args)
