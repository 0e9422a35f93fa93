"""``fusionlens reproduce altermoma``: the AlterMOMA tables on the built-in world, resumably.

Grids (each cell one JSON file under ``out_dir``, written atomically; an existing cell is never recomputed,
so an interrupted run resumes where it stopped and loses nothing):

* ``dense/<pair>.json`` -- the trained reference model (camera-LiDAR, camera-radar) and its val IoU;
* ``unstructured/<pair>/<method>/s<rho>/seed<k>.json`` -- Table 1/3 style: every method at 80/85/90%;
* ``structured/<pair>/<method>/r<ratio>/seed<k>.json`` -- Table 5 style: channel ratio 30/50%, IoU, GFLOPs,
  CPU latency before and after;
* ``ablation/<pair>/b<beta>/s<rho>/seed<k>.json`` -- appendix F: AlterMOMA at several beta/alpha.

Every cell: score the reference model, prune, fine-tune ``finetune_steps`` Adam steps with masks fixed (or
on the physically smaller model), evaluate vehicle IoU on the validation split.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fusionlens.io import atomic_write_json
from fusionlens.models import FusionModel, ModelConfig, preset_config
from fusionlens.prune.api import METHODS, build_importance, prune
from fusionlens.prune.cost import cost_report
from fusionlens.prune.params import prunable_parameters
from fusionlens.prune.pruner import finetune
from fusionlens.prune.reference import CALIBRATION_INPUTS, example_inputs, load_reference, reference_loss
from fusionlens.prune.structured import structured_prune


@dataclass
class ReproduceConfig:
    out_dir: str = "out/reproduce/altermoma"
    pairs: tuple[str, ...] = ("camera,lidar", "camera,radar")
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
    batch_size: int = 2
    finetune_steps: int = 25
    finetune_lr: float = 1e-3
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "imp": {"rounds": 2, "steps_per_round": 20, "lr": 1e-3},
            "synflow": {"iterations": 20},
            "prospr": {"inner_steps": 3, "inner_lr": 1e-2, "momentum": 0.9},
            "snip": {"n_batches": 1},
        }
    )

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


def _slug(pair: str) -> str:
    return pair.replace(",", "_")


def _loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    from fusionlens.data.collate import collate_samples

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=collate_samples, drop_last=True
    )


class Runner:
    """Runs the grids of a :class:`ReproduceConfig`; each finished cell is a JSON file (atomic)."""

    def __init__(self, config: ReproduceConfig, progress: bool = True) -> None:
        config.validate()
        self.cfg, self.progress = config, progress
        self.out = Path(config.out_dir)
        self._data: tuple[Dataset, Dataset] | None = None
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
        grid = self.data()[0][0].grid
        return preset_config("tiny", pair, grid=grid, **self.cfg.model_overrides)

    def reference(self, pair: str) -> FusionModel:
        from fusionlens.train.loop import TrainConfig, train

        path = self.out / "checkpoints" / f"{_slug(pair)}.pt"
        if not path.is_file():
            train_set, val_set = self.data()
            tcfg = TrainConfig(
                steps=self.cfg.reference_steps,
                batch_size=self.cfg.reference_batch,
                lr=self.cfg.reference_lr,
                seed=self.cfg.data_seed,
            )
            train(self.model_config(pair), tcfg, train_set, checkpoint=path, progress=self.progress)
        model, _ = load_reference(path)
        return model

    def evaluate(self, model: torch.nn.Module) -> float:
        from fusionlens.train.loop import evaluate

        return float(evaluate(model, self.data()[1], batch_size=4, progress=False)["all"])  # type: ignore[arg-type]

    # -- cells ------------------------------------------------------------------------------------------------
    def _cell(self, rel: str, compute: Any) -> dict[str, Any]:
        path = self.out / rel
        if path.is_file():
            return json.loads(path.read_text())
        result = compute()
        atomic_write_json(path, result)
        return result

    def dense(self, pair: str) -> dict[str, Any]:
        def compute() -> dict[str, Any]:
            model = self.reference(pair)
            ex = example_inputs(model, next(iter(_loader(self.data()[1], 1, 0))))
            return {
                "pair": pair,
                "iou": self.evaluate(model),
                "cost": cost_report(model, ex, repeats=5),
                "n_prunable": sum(model.get_parameter(n).numel() for n in prunable_parameters(model)),
            }

        return self._cell(f"dense/{_slug(pair)}.json", compute)

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
        if options:
            tag = "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(options.items()))
            rel = f"{group or 'sweep'}/{_slug(pair)}/{method}_{tag}/s{rho:g}/seed{seed}.json"
        elif beta is not None:
            rel = f"ablation/{_slug(pair)}/b{beta:g}/s{rho:g}/seed{seed}.json"
        else:
            rel = f"unstructured/{_slug(pair)}/{method}/s{rho:g}/seed{seed}.json"

        def compute() -> dict[str, Any]:
            torch.manual_seed(seed)
            model = self.reference(pair)
            train_set, val_set = self.data()
            batches = _loader(train_set, self.cfg.batch_size, seed)
            ex_batch = next(iter(_loader(val_set, 1, 0)))
            result = prune(
                model,
                method,
                rho,
                loss_fn=reference_loss(),
                batches=batches,
                input_factory=lambda: example_inputs(model, ex_batch),
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
                "iou": self.evaluate(result.model),
                **report,
            }

        return self._cell(rel, compute)

    def structured(self, pair: str, method: str, ratio: float, seed: int) -> dict[str, Any]:
        def compute() -> dict[str, Any]:
            torch.manual_seed(seed)
            model = self.reference(pair)
            train_set, val_set = self.data()
            batches = _loader(train_set, self.cfg.batch_size, seed)
            ex = example_inputs(model, next(iter(_loader(val_set, 1, 0))))
            importance = build_importance(
                method,
                loss_fn=reference_loss(),
                batches=batches,
                input_factory=lambda: ex,
                **self._options(method, seed),
            )
            scores = importance(model, prunable_parameters(model), ratio)
            info: dict[str, Any] = {}
            small = structured_prune(model, scores, ratio, ex, report=info)
            finetune(small, reference_loss(), batches, self.cfg.finetune_steps, lr=self.cfg.finetune_lr)
            return {
                "pair": pair,
                "method": method,
                "ratio": ratio,
                "seed": seed,
                "iou": self.evaluate(small),
                "before": cost_report(model, ex, repeats=5),
                "after": cost_report(small, ex, repeats=5),
                "scoring_backward_passes": importance.backward_passes,
                **info,
            }

        return self._cell(f"structured/{_slug(pair)}/{method}/r{ratio:g}/seed{seed}.json", compute)

    # -- the whole run ----------------------------------------------------------------------------------------
    def jobs(self) -> Iterator[tuple[str, tuple]]:
        c = self.cfg
        for pair in c.pairs:
            yield "dense", (pair,)
        for seed in c.seeds:
            for pair in c.pairs:
                for rho in c.sparsities:
                    for method in c.methods:
                        yield "unstructured", (pair, method, rho, seed)
        for seed in c.seeds[:1]:
            for pair in c.pairs:
                for ratio in c.structured_ratios:
                    for method in c.structured_methods:
                        yield "structured", (pair, method, ratio, seed)
            pair = c.ablation_pair or c.pairs[0]
            for rho in c.ablation_sparsities or c.sparsities:
                for beta in c.ablation_betas:
                    if beta == 1.0:  # alpha = beta = 1 is the main grid's AlterMOMA cell
                        yield "unstructured", (pair, "altermoma", rho, seed)
                    else:
                        yield "ablation", (pair, "altermoma", rho, seed, beta)

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
