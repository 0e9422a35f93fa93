"""Training and evaluation of the reference models: AdamW + one-cycle schedule, gradient clipping, SimpleBEV's
losses, mixed precision on GPU, DistributedDataParallel under torchrun, atomic checkpoints, exact resume.

Data order is a pure function of ``(seed, step)``: global sample position ``p`` of epoch ``p // N`` is
``randperm(N, seed + epoch)[p % N]``, and rank ``r`` of ``W`` takes positions ``r*B .. r*B+B-1`` of each
step's global batch of ``W*B``. Resuming at step ``s`` therefore sees exactly the batches an uninterrupted run
would, and together with the restored RNG, optimizer and scheduler state reproduces its loss curve.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from fusionlens.data.collate import collate_samples
from fusionlens.io import atomic_write_json
from fusionlens.modalities import modality
from fusionlens.models import FusionModel, ModelConfig, batch_to_inputs, build_model
from fusionlens.train.checkpoint import (
    config_differences,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    set_rng_state,
)
from fusionlens.train.distributed import DistInfo, all_gather_objects, all_true, init_distributed, mean_over_ranks
from fusionlens.train.losses import LossConfig, simplebev_loss
from fusionlens.train.metrics import IoUAccumulator


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped without overwriting the last good checkpoint."""


TASKS = ("segmentation", "detection", "both")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 4  # per process
    lr: float = 3e-3
    weight_decay: float = 1e-4
    pct_start: float = 0.1  # fraction of the one-cycle schedule spent warming up
    grad_clip: float = 5.0
    seed: int = 0
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    eval_every: int = 0  # steps between validation passes (0: only at the end)
    amp: bool = True  # mixed precision; only ever used on CUDA
    num_workers: int = 0
    device: str = "cpu"
    loss: LossConfig = field(default_factory=LossConfig)
    # which losses train the model: the SimpleBEV segmentation terms, the extra heads' (detection), or both
    task: str = "segmentation"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "pct_start", "grad_clip"):  # NaN compares False with everything
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if not 0 < self.pct_start < 1:
            raise ValueError(f"TrainConfig.pct_start must be in (0, 1), got {self.pct_start}")
        if self.task not in TASKS:
            raise ValueError(f"TrainConfig.task must be one of {TASKS}, got {self.task!r}")
        for name in ("save_every", "eval_every", "num_workers", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["loss"] = LossConfig(**data.get("loss", {}))
        return cls(**data)


# fields that must agree between a checkpoint and the run resuming it (others, e.g. save_every, may change)
_RESUME_FIXED = ("steps", "batch_size", "lr", "weight_decay", "pct_start", "grad_clip", "seed", "loss", "task")


@dataclass
class TrainResult:
    checkpoint: Path | None
    losses: list[float]  # total loss of every step from 0 (including those before a resume)
    metrics: dict[str, float]  # validation IoUs at the end (empty without a validation set)
    seconds: float
    steps: int


class StepSampler(Sampler[list[int]]):
    """Yields this rank's index list for each step in ``[start, stop)`` (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, info: DistInfo) -> None:
        self.n, self.batch_size, self.seed, self.start, self.stop, self.info = (
            n,
            batch_size,
            seed,
            start,
            stop,
            info,
        )
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        first = (step * self.info.world_size + self.info.rank) * self.batch_size
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def extra_head_loss(model: FusionModel, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
    """Sum of the extra heads' own losses (``head.loss(outputs, batch)``; its ``total``/``*_total`` term when
    there is one, else the sum of its terms) -- see :mod:`fusionlens.models.registry`."""
    total = torch.zeros((), device=outputs["seg"].device)
    for head in model.extra_heads.values():
        if not hasattr(head, "loss"):
            continue
        terms = head.loss(outputs, batch)
        named = [v for k, v in terms.items() if k == "total" or k.endswith("_total")]
        total = total + (sum(named) if named else sum(terms.values()))
    return total


def check_dataset(dataset: Dataset, config: ModelConfig, name: str) -> None:
    """Fail before training if the dataset's grid or modalities cannot feed the model."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{name} dataset is empty")
    sample = dataset[0]
    if sample.grid != config.grid:
        raise ValueError(f"{name} dataset grid {sample.grid} differs from the model config grid {config.grid}")
    missing = [m for m in config.modalities if getattr(sample, modality(m).batch_key) is None]
    if missing:
        raise ValueError(f"{name} dataset has no {missing} data but the model uses {list(config.modalities)}")


def _autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast("cuda", dtype=torch.float16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def evaluate(
    model: FusionModel,
    dataset: Dataset,
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    info: DistInfo | None = None,
    progress: bool = True,
    amp: bool = False,
) -> dict[str, float]:
    """Vehicle IoU over the whole ``dataset`` (and per condition / distance band) in eval mode.

    Under torchrun each rank evaluates samples ``rank::world_size`` and the intersections and unions are
    summed, so the result equals a single-process evaluation.
    """
    info = info or DistInfo()
    device = torch.device(device)
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    acc = IoUAccumulator(module.config.grid)
    shard = list(range(info.rank, len(dataset), info.world_size))  # type: ignore[arg-type]
    loader = DataLoader(
        torch.utils.data.Subset(dataset, shard),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_samples,
    )
    for batch in tqdm(loader, desc="evaluate", disable=not (progress and info.is_main), leave=False):
        batch = move_batch(batch, device)
        inputs, kwargs = batch_to_inputs(module, batch)
        with _autocast(device, amp):
            out = module(**inputs, **kwargs)
        acc.update(out["seg"].float(), batch["bev_seg"], batch["bev_valid"], batch["meta"])
    merged = IoUAccumulator(module.config.grid)
    for totals in all_gather_objects(info, acc.totals):
        merged.merge(totals)
    module.train(was_training)
    return merged.compute()


def read_resumable(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` if a run can resume from it: a fusionlens training checkpoint with its optimizer,
    scheduler, training config and RNG state (a pruned or exported one has none); ``ValueError`` naming the file
    otherwise, ``FileNotFoundError`` when there is none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    payload = load_checkpoint(path)
    lacking = [k for k in ("optimizer", "scheduler", "train_config", "rng") if not payload.get(k)]
    if lacking:
        pruned = "pruning" in (payload.get("extra") or {})
        kind = "a pruned checkpoint (written by fusionlens prune)" if pruned else "a checkpoint"
        raise ValueError(
            f"--resume: {path} is {kind} without the training state a resume needs ({', '.join(lacking)}); "
            "resume only a checkpoint written by fusionlens train, or start a new run with another --out"
        )
    return payload


def _check_resume(
    payload: dict[str, Any], model_config: ModelConfig, train_config: TrainConfig, info: DistInfo, path: Path
) -> None:
    saved = ModelConfig.from_dict(payload["model_config"])
    diff = config_differences(model_config, saved)
    if diff:
        raise ValueError(
            f"--resume: checkpoint {path} has a different model config: "
            + "; ".join(f"{k}: now {a!r} vs saved {b!r}" for k, (a, b) in diff.items())
        )
    now, old = train_config.to_dict(), dict(payload.get("train_config") or {})
    bad = {k: (now[k], old.get(k)) for k in _RESUME_FIXED if now[k] != old.get(k)}
    if old.get("world_size", 1) != info.world_size:
        bad["world_size"] = (info.world_size, old.get("world_size", 1))
    if bad:
        raise ValueError(
            f"--resume: checkpoint {path} was trained with different settings: "
            + "; ".join(f"{k}: now {a!r} vs saved {b!r}" for k, (a, b) in bad.items())
        )


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    train_set: Dataset,
    *,
    val_set: Dataset | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    prepare_model: Callable[[FusionModel], None] | None = None,
    step_hook: Callable[[FusionModel, int], None] | None = None,
    after_backward: Callable[[FusionModel, int], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a model on ``train_set`` (Samples); save to ``checkpoint``; return losses and validation IoUs.

    ``prepare_model`` runs once on the fresh model before training (e.g. to load pre-trained backbones);
    ``step_hook(model, step)`` runs before every step and ``after_backward(model, step)`` between backward and
    the optimizer step (together they freeze a backbone for the first N steps, see ``train.pretrained``).
    """
    if train_config.task != "segmentation" and not model_config.extra_heads:
        raise ValueError(f"task {train_config.task!r} needs a detection head: add extra_heads={{'centerpoint': {{}}}} "
                         "to the model config (fusionlens train --task adds it)")
    device = torch.device(train_config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device is cuda but no GPU is available")
    info = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt_path is None:
        raise ValueError("resume=True needs the checkpoint to resume from")
    payload = read_resumable(ckpt_path) if resume else None  # type: ignore[arg-type]
    check_dataset(train_set, model_config, "training")
    if val_set is not None:
        check_dataset(val_set, model_config, "validation")

    torch.manual_seed(train_config.seed)
    model = build_model(model_config, load_camera_weights=not resume)
    if prepare_model is not None and not resume:
        prepare_model(model)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=train_config.lr, total_steps=train_config.steps, pct_start=train_config.pct_start
    )
    use_amp = train_config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start, losses = 0, []
    if payload is not None:
        _check_resume(payload, model_config, train_config, info, ckpt_path)  # type: ignore[arg-type]
        load_model_state(model, payload, source=str(ckpt_path))
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        start, losses = int(payload["step"]), list(payload["extra"].get("losses", []))[: int(payload["step"])]
        set_rng_state(payload["rng"])
    net: torch.nn.Module = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    saved_config = dict(train_config.to_dict(), world_size=info.world_size)
    last_good: Path | None = ckpt_path if resume else None

    def save(step: int, metrics: dict[str, float] | None = None) -> None:
        nonlocal last_good
        if ckpt_path is not None and info.is_main:
            save_checkpoint(
                ckpt_path,
                model=model,
                model_config=model_config,
                train_config=saved_config,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler if use_amp else None,
                step=step,
                metrics=metrics,
                extra={"losses": losses},
            )
            last_good = ckpt_path

    sampler = StepSampler(
        len(train_set),
        train_config.batch_size,
        train_config.seed,
        start,  # type: ignore[arg-type]
        train_config.steps,
        info,
    )
    loader = DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate_samples, num_workers=train_config.num_workers
    )
    window = IoUAccumulator(model_config.grid)
    metrics: dict[str, float] = {}
    def validate(progress: bool) -> dict[str, float]:
        return evaluate(model, val_set, batch_size=train_config.batch_size, device=device, info=info,
                        progress=progress, amp=use_amp)

    # the masked means of the loss divide by the global batch's counts, so that DDP's averaged gradient is the
    # single process's on the global batch (see simplebev_loss)
    reduce_count = functools.partial(mean_over_ranks, info) if info.enabled else None
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=train_config.steps, initial=start, desc="train", disable=not (progress and info.is_main))
    for step, batch in enumerate(loader, start=start):
        if step_hook is not None:
            step_hook(model, step)
        batch = move_batch(batch, device)
        inputs, kwargs = batch_to_inputs(model, batch)
        with _autocast(device, use_amp):
            out = net(**inputs, **kwargs)
        loss = extra_head_loss(model, out, batch)
        if train_config.task != "detection":
            loss = loss + simplebev_loss(out, batch, train_config.loss, reduce_count)["total"]
        if not all_true(info, bool(torch.isfinite(loss.detach()))):
            bar.close()
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was saved yet"
            raise NonFiniteLossError(
                f"loss became non-finite ({float(loss.detach()):.4g}) at step {step}; training stopped, {where}"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if after_backward is not None:
            after_backward(model, step)
        if train_config.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(float(loss.detach()))
        window.update(out["seg"].float(), batch["bev_seg"], batch["bev_valid"])
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", iou=f"{window.compute()['all']:.3f}")
        done = step + 1
        if done % 50 == 0:
            window = IoUAccumulator(model_config.grid)
        if (
            val_set is not None
            and train_config.eval_every
            and done % train_config.eval_every == 0
            and done < train_config.steps
        ):
            metrics = validate(progress=False)
            bar.write(f"step {done}: val IoU {metrics['all']:.4f}")
        if train_config.save_every and done % train_config.save_every == 0 and done < train_config.steps:
            save(done, metrics)
    bar.close()
    if val_set is not None:
        metrics = validate(progress=progress)
    seconds = time.perf_counter() - t0
    save(train_config.steps, metrics)
    if ckpt_path is not None and info.is_main and metrics:
        atomic_write_json(
            ckpt_path.with_suffix(".metrics.json"),
            {
                "metrics": metrics,
                "seconds": seconds,
                "steps": train_config.steps,
                "model_config": model_config.to_dict(),
                "train_config": saved_config,
            },
        )
    return TrainResult(ckpt_path, losses, metrics, seconds, train_config.steps)
