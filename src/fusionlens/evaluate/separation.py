"""Perturbation metrics of modality separation (LMD appendix D.2, eqs. 14-15).

For every modality ``m`` and every perturbed modality ``p``: the Pearson correlation (PCC, eq. 14) and mean squared
error (MSE, eq. 15) between modality ``m``'s prediction map with clean inputs and with modality ``p``'s input
replaced by that of the sample at offset ``(k + s*j) mod N``, ``j = 1..count``. ``p == m`` should change the map
(low PCC: "Rp/R"), ``p != m`` should leave it alone (PCC 1: "Rp/C"). Values are averaged over ``j`` per anchor sample,
then reported as mean ± std over the anchor samples.

Two modes for LMD-type methods (see :mod:`fusionlens.evaluate.baselines`):

* **frozen** -- the perturbed input goes through the network *linearized at the clean input* (coefficients
  recorded on the clean pass, ``decompose(..., coefficients=...)``). This is what the paper's code measures; the
  unperturbed modality's component cannot change, so ``Rp/C = Cp/R = 1`` by construction.
* **recomputed** -- a full decomposition of the perturbed input: what a user actually gets.

The model is described by a :class:`~fusionlens.spec.ModelSpec` and seen at a *level*: ``"fusion"`` (default where
the spec names one) feeds each modality's features where the modalities meet -- exactly the decomposition of the
full model with ``bias="local"`` (every constant in a single-modality branch belongs to that modality), at a fraction
of the cost, and the level where the zero/mean baselines of Shapley and the naive split are meaningful; ``"input"``
feeds the raw sensor tensors. Replacing a modality replaces the forward kwargs that travel with it (``travels``:
calibration, valid masks).

Cost: anchors are visited in runs k, k+s, k+2s, ... so that consecutive anchors share all partners but one (about
one sample prepared per anchor), and a method may compute the ``count x M`` perturbed maps of an anchor together
(``perturbed_many``): :class:`~.baselines.LMD` replays frozen coefficients once per partner for all perturbed
modalities, batched and without the model's output. ``benchmarks/lmd_eval_speed.py`` times it against the loop of
one decomposition per perturbed input.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fusionlens.modalities import modality as modality_entry
from fusionlens.spec import ModelSpec, Prepared, Subject, as_spec
from fusionlens.train.distributed import DistInfo, all_gather_objects

DEFAULT_COUNT = 12  # appendix D.2: m = 1..12


class Method(Protocol):
    """An attribution method: per-modality maps (plus ``"bias"`` where it has one) of one output, for a clean
    input (returning a state, e.g. frozen coefficients) and for perturbed inputs given that state.

    A method may also define ``perturbed_many(subject, clean_x, partners, perturbed, state, clean_maps)``, returning
    for every perturbed modality ``p`` the maps of ``subject.swap(clean_x, partner, p)`` for each partner, in order
    -- the same maps as :meth:`perturbed` (the modalities' at least), computed together (:class:`~.baselines.LMD`
    batches them); :func:`perturbation_metrics` then uses it."""

    name: str

    def clean(self, subject: Subject, x: Prepared) -> tuple[dict[str, torch.Tensor], Any]: ...

    def perturbed(self, subject: Subject, x: Prepared, state: Any) -> dict[str, torch.Tensor]: ...


def pairing_offsets(n: int, count: int = DEFAULT_COUNT, stride: int | None = None) -> list[int]:
    """Offsets ``s*j mod n`` for ``j = 1..count`` (stride ``s`` defaults to ``n // 13``); all must be distinct and
    non-zero, so that every anchor is compared with ``count`` different other samples."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    s = n // (DEFAULT_COUNT + 1) if stride is None else stride
    if s < 1:
        raise ValueError(f"stride must be >= 1; with the default stride N // 13 the dataset needs at least 13 "
                         f"samples, got N = {n} (pass a stride)")
    offsets = [(s * j) % n for j in range(1, count + 1)]
    if 0 in offsets or len(set(offsets)) != count:
        raise ValueError(f"too few samples for the offsets: N = {n}, stride = {s}, count = {count} give repeated or "
                         f"zero offsets {offsets}; use more samples, a smaller count or another stride")
    return offsets


def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps flattened (eq. 14); NaN when either is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else math.nan


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared difference over the map's pixels (eq. 15)."""
    return float((a.double() - b.double()).pow(2).mean())


def _nan_stats(values: Sequence[float]) -> tuple[float, float, int]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)), len(vals)


@dataclass
class SeparationResult:
    """Per-anchor PCC/MSE (averaged over the ``count`` partners) for every (perturbed p, modality m) pair."""

    method: str
    modalities: tuple[str, ...]
    perturbed: tuple[str, ...]
    count: int
    stride: int
    n: int
    anchors: list[int]
    pcc: list[dict[str, float]]  # one dict per anchor: "Rp/C" -> value
    mse: list[dict[str, float]]

    @property
    def keys(self) -> list[str]:
        return [metric_key(p, m) for p in self.perturbed for m in self.modalities]

    def summary(self) -> dict[str, dict[str, tuple[float, float, int]]]:
        """metric ("pcc" / "mse") -> key -> (mean, std, number of defined anchors)."""
        return {name: {k: _nan_stats([row[k] for row in rows]) for k in self.keys}
                for name, rows in (("pcc", self.pcc), ("mse", self.mse))}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "modalities": list(self.modalities), "perturbed": list(self.perturbed),
                "count": self.count,
                "stride": self.stride, "n": self.n, "anchors": self.anchors, "pcc": self.pcc, "mse": self.mse,
                "summary": {k: {kk: list(v) for kk, v in d.items()} for k, d in self.summary().items()}}

    def to_markdown(self) -> str:
        s = self.summary()
        head = "| metric | " + " | ".join(self.keys) + " |\n|---|" + "---|" * len(self.keys)
        rows = [f"| {name.upper()} | " + " | ".join(f"{s[name][k][0]:.3f} ± {s[name][k][1]:.3f}" for k in self.keys)
                + " |" for name in ("pcc", "mse")]
        return "\n".join([head, *rows])


def metric_key(perturbed: str, modality: str) -> str:
    """``"Rp/C"``: camera's map when radar is perturbed (the table's letters; a user's own modality by its name)."""
    return f"{_letter(perturbed)}p/{_letter(modality)}"


def _letter(name: str) -> str:
    try:
        return modality_entry(name).letter
    except ValueError:
        return name


class SampleCache:
    """Prepared samples by index, keeping the most recent ``capacity`` (partners of nearby anchors overlap; pass
    one cache to several :func:`perturbation_metrics` calls on the same model and data to prepare each sample once)."""

    def __init__(self, subject: Subject, dataset: Dataset, capacity: int) -> None:
        self.subject, self.dataset, self.capacity = subject, dataset, capacity
        self.spec = subject.spec
        self.items: OrderedDict[int, Prepared] = OrderedDict()

    def __getitem__(self, index: int) -> Prepared:
        if index in self.items:
            self.items.move_to_end(index)
            return self.items[index]
        x = self.subject.prepare(self.spec.batch(self.dataset, [index]))
        self.items[index] = x
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return x


def _perturbed_maps(subject: Subject, method: Method, clean_x: Prepared, clean: dict[str, torch.Tensor], state: Any,
                    partners: list[Prepared], perturbed: Sequence[str]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """For every perturbed modality, the method's maps of the clean input with that modality taken from each partner
    (``perturbed_many`` where the method has it, else one :meth:`Method.perturbed` call per input)."""
    many = getattr(method, "perturbed_many", None)
    if many is not None:
        return many(subject, clean_x, partners, perturbed, state, clean)
    out: dict[str, list[dict[str, torch.Tensor]]] = {p: [] for p in perturbed}
    for partner in partners:
        for p in perturbed:
            out[p].append(method.perturbed(subject, subject.swap(clean_x, partner, p), state))
    return out


def _anchor_metrics(subject: Subject, method: Method, cache: SampleCache, k: int, offsets: list[int], n: int,
                    perturbed: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    clean_x = cache[k]
    clean, state = method.clean(subject, clean_x)
    partners = [cache[(k + off) % n] for off in offsets]
    swapped = _perturbed_maps(subject, method, clean_x, clean, state, partners, perturbed)
    pccs: dict[str, list[float]] = {}
    mses: dict[str, list[float]] = {}
    for j in range(len(offsets)):
        for p in perturbed:
            maps = swapped[p][j]
            for m in subject.modalities:
                key = metric_key(p, m)
                pccs.setdefault(key, []).append(pcc(clean[m], maps[m]))
                mses.setdefault(key, []).append(mse(clean[m], maps[m]))
    return ({key: _nan_stats(v)[0] for key, v in pccs.items()}, {key: _nan_stats(v)[0] for key, v in mses.items()})


def visiting_order(anchors: Sequence[int], n: int, step: int) -> list[int]:
    """``anchors`` rearranged into runs ``k, k+step, k+2*step, ...`` (mod ``n``): each run starts at an anchor whose
    predecessor ``k - step`` is not (or no longer) pending, and the runs come in the order of their first anchor."""
    pending = Counter(anchors)
    out: list[int] = []
    for a in anchors:
        if not pending[a]:
            continue
        start, walked = a, 0
        while pending[(start - step) % n] and walked < n:  # back to the start of a's run (bounded on a cycle)
            start, walked = (start - step) % n, walked + 1
        k = start
        while pending[k]:
            out.append(k)
            pending[k] -= 1
            k = (k + step) % n
    return out


def perturbation_metrics(
    model: ModelSpec | nn.Module,
    dataset: Dataset,
    method: Method,
    *,
    count: int = DEFAULT_COUNT,
    stride: int | None = None,
    anchors: Sequence[int] | None = None,
    perturbed: Sequence[str] | None = None,
    level: str | None = None,
    info: DistInfo | None = None,
    progress: bool = True,
    cache: SampleCache | None = None,
) -> SeparationResult:
    """PCC/MSE of appendix D.2 for ``method`` over ``dataset`` (module docstring).

    Args:
        model: a :class:`~fusionlens.spec.ModelSpec` (or a model that describes itself).
        level: ``"fusion"`` or ``"input"``; default: the fusion level where the spec has one.
        anchors: the samples ``k`` to evaluate (default all); partners are drawn from the whole dataset.
        perturbed: modalities to perturb (default all of the model's).
        info: under torchrun, each rank evaluates a share of the anchors and the per-anchor numbers are gathered,
            so every rank returns exactly the single-process result.
    """
    n = len(dataset)  # type: ignore[arg-type]
    offsets = pairing_offsets(n, count, stride)
    spec = as_spec(model)
    spec.ensure_checked(spec.batch(dataset, [0]))  # a bad description fails here, before any work
    subject = spec.subject(level)
    perturbed = list(subject.modalities if perturbed is None else perturbed)
    for p in perturbed:
        subject.check_modality(p, "perturbed modality")
    anchors = list(range(n)) if anchors is None else [int(a) for a in anchors]
    bad = [a for a in anchors if not 0 <= a < n]
    if bad or not anchors:
        raise ValueError(f"anchors must be non-empty indices in [0, {n}), got {bad or anchors}")
    info = info or DistInfo()
    s = n // (DEFAULT_COUNT + 1) if stride is None else stride
    # Visit anchors k, k+s, k+2s, ...: consecutive anchors then share all partners but one, so a cache of count + 2
    # samples prepares about one sample per anchor instead of count + 1. Each rank takes a contiguous share of that
    # order; the rows are put back in the order of ``anchors`` below, so the result does not depend on either.
    order = visiting_order(anchors, n, s)
    share = -(-len(order) // info.world_size) if order else 0
    mine = order[info.rank * share:(info.rank + 1) * share]
    if cache is None:
        cache = SampleCache(subject, dataset, capacity=len(offsets) + 2)
    elif cache.dataset is not dataset or cache.subject.model is not spec.model or cache.subject.level != subject.level:
        raise ValueError("cache was made for another model, dataset or level")
    rows: list[tuple[int, dict[str, float], dict[str, float]]] = []
    bar = tqdm(mine, desc=f"separation {method.name}", disable=not progress or not info.is_main, leave=False)
    for k in bar:
        rows.append((k, *_anchor_metrics(subject, method, cache, k, offsets, n, perturbed)))
    gathered = [row for part in all_gather_objects(info, rows) for row in part]
    position = {a: i for i, a in enumerate(anchors)}
    gathered.sort(key=lambda r: position[r[0]])
    return SeparationResult(method.name, subject.modalities, tuple(perturbed), count, s, n,
                            [r[0] for r in gathered], [r[1] for r in gathered], [r[2] for r in gathered])
