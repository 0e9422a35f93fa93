"""``fusionlens.audit.audit``: which sensor a fusion model relies on, where, and when it fails -- over a dataset,
on any model described by a :class:`~fusionlens.spec.ModelSpec`, written as a static HTML report.

Steps: every audited sample is decomposed with LMD (:mod:`~fusionlens.audit.sample`: shares on the predicted
positives, the ground-truth objects and the map; per object; under injected faults; single-modality partners'
detections), each result cached as JSON so an interrupted run resumes; a reference split (default: the audited
samples themselves) fits the share monitor (:mod:`~fusionlens.audit.monitor`); the tables are aggregated
(:mod:`~fusionlens.audit.tables`); the flagged and selected samples get a page with their LMD panels
(:mod:`~fusionlens.audit.report`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fusionlens.audit import tables
from fusionlens.audit.labels import DEFAULT_VISIBILITY, LabelsFn, SampleLabels, resolve_labels
from fusionlens.audit.monitor import ShareMonitor, flag_quality, object_vector, sample_vector
from fusionlens.audit.sample import audit_sample, blackout_spec, flat_map
from fusionlens.evaluate.attribution import Visibility
from fusionlens.io import atomic_write_json, check_output_dir, claim_settings
from fusionlens.spec import ModelSpec, as_spec
from fusionlens.train.metrics import DEFAULT_DISTANCE_BANDS

CACHE_VERSION = 1


@dataclass
class AuditResult:
    """What :func:`audit` computed and where it wrote it (``index`` is the report's entry page)."""

    out: Path
    index: Path
    modalities: tuple[str, ...]
    records: list[dict[str, Any]]
    tables: dict[str, list[dict[str, Any]]]
    monitor: dict[str, Any]
    pages: dict[int, Path] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state (names, shapes, bytes): a cache made with other weights is refused."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _indices(dataset: Any, indices: Sequence[int] | None, option: str) -> list[int]:
    n = len(dataset)
    out = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"{option} {bad[:5]} outside the dataset of {n} samples")
    if not out:
        raise ValueError(f"{option}: nothing to audit (no samples)")
    return out


def _check_options(threshold: float, bands: Sequence[float], quantile: float, error_iou: float | None,
                   max_pages: int) -> list[float]:
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    edges = [float(b) for b in bands]
    if len(edges) < 2 or any(b1 <= b0 for b0, b1 in zip(edges, edges[1:])) or edges[0] < 0:
        raise ValueError(f"distance_bands must be >= 2 increasing non-negative edges, got {list(bands)}")
    if not 0 < quantile < 1:
        raise ValueError(f"monitor_quantile must be in (0, 1), got {quantile}")
    if error_iou is not None and not 0 <= error_iou <= 1:
        raise ValueError(f"error_iou must be in [0, 1], got {error_iou}")
    if max_pages < 0:
        raise ValueError(f"max_pages must be >= 0, got {max_pages}")
    return edges


def _faults(spec: ModelSpec, faults: bool | Sequence[str] | Mapping[str, ModelSpec]) -> dict[str, ModelSpec]:
    if faults is False:
        return {}
    if isinstance(faults, Mapping):
        bad = [k for k, v in faults.items() if not isinstance(v, ModelSpec)]
        if bad:
            raise ValueError(f"faults {bad}: a custom fault is a ModelSpec whose inputs() applies it")
        return dict(faults)
    chosen = spec.modalities if faults is True else tuple(faults)
    unknown = [m for m in chosen if m not in spec.modalities]
    if unknown:
        raise ValueError(f"faults names {unknown}, which are not modalities of the model ({list(spec.modalities)})")
    return {f"no {m}": blackout_spec(spec, m) for m in chosen}


def _run(spec: ModelSpec, dataset: Any, indices: list[int], cache: Path, desc: str, progress: bool,
         compute: Callable[[Any, SampleLabels], dict[str, Any]], labels: LabelsFn | None,
         visibility: Visibility) -> list[dict[str, Any]]:
    import json

    records = []
    cache.mkdir(parents=True, exist_ok=True)
    for i in tqdm(indices, desc=desc, disable=not progress, leave=False):
        path = cache / f"{i:06d}.json"
        record = None
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError:  # written atomically, so only a foreign edit garbles it: recompute
                record = None
        if record is None:
            item = dataset[i]
            lab = resolve_labels(item, labels, spec.modalities, visibility, f"sample {i}")
            record = compute(item, lab)
            record.update(index=i, name=f"sample-{i:05d}")
            atomic_write_json(path, record)
        records.append(record)
    return records


def audit(
    model: ModelSpec | Any,
    dataset: Any,
    *,
    out: str | Path,
    labels: LabelsFn | None = None,
    partners: Mapping[str, ModelSpec | Any] | None = None,
    reference: Any = None,
    indices: Sequence[int] | None = None,
    reference_indices: Sequence[int] | None = None,
    level: str | None = None,
    rules: str = "paper",
    threshold: float = 0.0,
    distance_bands: Sequence[float] = DEFAULT_DISTANCE_BANDS,
    faults: bool | Sequence[str] | Mapping[str, ModelSpec] = True,
    monitor_quantile: float = 0.95,
    error_iou: float | None = None,
    select: Sequence[int] = (),
    max_pages: int = 12,
    visibility: Visibility = DEFAULT_VISIBILITY,
    title: str = "",
    notes: Sequence[str] = (),
    progress: bool = True,
) -> AuditResult:
    """Audit ``model`` on ``dataset`` and write the report into ``out`` (module docstring).

    Args:
        model: a :class:`~fusionlens.spec.ModelSpec` (or a model with ``describe()``).
        dataset: any indexable dataset whose items ``model.collate`` batches.
        out: the report folder (``index.html``, ``audit.json``, ``*.csv``, ``samples/``, ``cache/``). A folder
            audited before with other settings or weights is refused (delete its ``cache/`` to start over).
        labels: ``item -> SampleLabels | dict | None`` (:mod:`~fusionlens.audit.labels`); default: a
            :class:`~fusionlens.data.sample.Sample`'s own, nothing for other items.
        partners: name -> single-modality (or any other) model on the same data, for lost-by-fusion /
            found-only-by-fusion; its studied output must cover the same cells.
        reference: the dataset the monitor's threshold is chosen on (e.g. the training split); default: the
            audited samples.
        indices / reference_indices: which samples (default: all).
        level / rules: the decomposition's level (:meth:`~fusionlens.spec.ModelSpec.subject`) and LMD rules.
        threshold: a cell is a predicted positive where the studied output exceeds it (0 for logits); an object is
            detected where the output's mean over its cells does.
        distance_bands: band edges in metres around the ego (needs ``spec.grid``).
        faults: ``True`` = every modality blacked out in turn, a list of modalities, ``False``, or name ->
            a ModelSpec of the faulted model (custom faults).
        monitor_quantile: the monitor's threshold as a quantile of the reference scores.
        error_iou: a sample whose IoU is below it counts as an error of the model (monitor quality); default: the
            lower quartile of the reference samples' IoUs (an error is a sample among the model's worst quarter by
            its own standard, whatever its overall quality).
        select: sample indices that get a page whatever the monitor says; flagged samples fill up to ``max_pages``.
        visibility: when a built-in sensor counts as having seen an object (right-sensor table).
        title / notes: the report's title and paragraphs of plain text shown under it (e.g. how the model was made).
    """
    from fusionlens.audit.report import write_report

    spec = as_spec(model)
    folder = check_output_dir("out", out)
    edges = _check_options(threshold, distance_bands, monitor_quantile, error_iou, max_pages)
    idx = _indices(dataset, indices, "indices")
    bad_select = [i for i in select if i not in idx]
    if bad_select:
        raise ValueError(f"select {bad_select} are not among the audited samples")
    ref_data = dataset if reference is None else reference
    ref_idx = idx if reference is None and reference_indices is None else _indices(ref_data, reference_indices,
                                                                                    "reference_indices")
    first = dataset[idx[0]]
    spec.check(spec.collate([first]))
    own_output = spec.forward(spec.collate([first]), level="input")
    partner_specs = {str(k): as_spec(v) for k, v in (partners or {}).items()}
    for name, p in partner_specs.items():
        try:
            p.check(p.collate([first]))
        except Exception as exc:
            raise ValueError(f"partner {name!r} cannot run on the audited data: {exc}") from exc
        shapes = (tuple(p.forward(p.collate([first]), level="input").shape[-2:]), tuple(own_output.shape[-2:]))
        if shapes[0] != shapes[1]:
            raise ValueError(f"partner {name!r}'s output covers {shapes[0]} cells, the audited model's {shapes[1]}")
    fault_specs = _faults(spec, faults)
    lab = resolve_labels(first, labels, spec.modalities, visibility, f"sample {idx[0]}")
    out_shape = tuple(flat_map(own_output[0]).shape)
    lab.check(out_shape, f"sample {idx[0]}")  # type: ignore[arg-type]

    settings = {"version": CACHE_VERSION, "model": fingerprint(spec.model), "modalities": list(spec.modalities),
                "partners": {k: fingerprint(p.model) for k, p in partner_specs.items()}, "level": level,
                "rules": rules, "threshold": threshold, "distance_bands": [str(e) for e in edges],
                "faults": sorted(fault_specs), "dataset_size": len(dataset),
                "reference_size": None if reference is None else len(reference),
                "visibility": [visibility.min_camera_pixels, visibility.min_points],
                "labels": getattr(labels, "__qualname__", None) if labels is not None else None}
    cache = folder / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    claim_settings(cache / "settings.json", settings, what="audit results of other settings or weights",
                   remedy=f"audit into another folder, or delete {cache} to start over")

    def compute(item: Any, lab: SampleLabels) -> dict[str, Any]:
        return audit_sample(spec, item, lab, level=level, rules=rules, threshold=threshold, bands=edges,
                            partners=partner_specs, faults=fault_specs)

    def compute_ref(item: Any, lab: SampleLabels) -> dict[str, Any]:
        return audit_sample(spec, item, lab, level=level, rules=rules, threshold=threshold, bands=edges,
                            partners={}, faults={})

    records = _run(spec, dataset, idx, cache / "samples", "audit", progress, compute, labels, visibility)
    ref_records = (records if reference is None and reference_indices is None else
                   _run(spec, ref_data, ref_idx, cache / "reference", "audit reference", progress, compute_ref,
                        labels, visibility))
    mods = spec.modalities
    monitor = _monitor(records, ref_records, mods, monitor_quantile, error_iou, reference is not None)
    flagged = sorted((r for r in records if r["flagged"]), key=lambda r: -r["monitor"])
    page_for = list(dict.fromkeys([*select, *(r["index"] for r in flagged)]))[:max(max_pages, len(select))]
    for r in records:
        r["page"] = f"samples/{r['name']}.html" if r["index"] in page_for else None
    fusion_summary, fusion_objects = tables.fusion_vs_partners(records, mods)
    result_tables = {
        "reliance": tables.reliance_table(records, mods),
        "samples": tables.sample_rows(records, mods),
        "objects": tables.object_rows(records, mods),
        "partners": fusion_summary, "lost_found": fusion_objects,
        "right_sensor": tables.right_sensor_table(records, mods),
        "faults": tables.fault_table(records, mods),
    }
    result = AuditResult(folder, folder / "index.html", mods, records, result_tables, monitor,
                         settings={**settings, "error_iou": error_iou, "monitor_quantile": monitor_quantile,
                                   "title": title, "notes": [str(n) for n in notes], "indices": len(idx),
                                   "reference_samples": len(ref_idx)})
    result.pages = write_report(result, spec, dataset, page_for, labels=labels, visibility=visibility, level=level,
                                rules=rules, progress=progress)
    return result


def _iou(record: dict[str, Any]) -> float | None:
    iou = record["iou"]
    return iou["inter"] / iou["union"] if iou and iou["union"] > 0 else None


def _monitor(records: list[dict[str, Any]], ref_records: list[dict[str, Any]], mods: Sequence[str],
             quantile: float, error_iou: float | None, separate_reference: bool) -> dict[str, Any]:
    """Fit the sample and object monitors on the reference records; score and flag the audited ones in place."""
    out: dict[str, Any] = {"reference": "a separate reference split" if separate_reference else
                           "the audited samples themselves (no reference split given)"}
    ref = torch.tensor([sample_vector(r, mods) for r in ref_records], dtype=torch.float64)
    if ref.shape[0] < 2:
        for r in records:
            r["monitor"], r["flagged"] = None, False
        out["samples"] = None
        return out
    mon = ShareMonitor.fit(ref, quantile=quantile)
    scores = mon.score(torch.tensor([sample_vector(r, mods) for r in records], dtype=torch.float64)).tolist()
    if error_iou is None:
        ref_ious = [_iou(r) for r in ref_records if _iou(r) is not None]
        error_iou = float(torch.quantile(torch.tensor(ref_ious, dtype=torch.float64), 0.25)) if ref_ious else None
        how = "the lower quartile of the reference samples' IoUs"
    else:
        how = "given"
    errors = []
    for r, s in zip(records, scores):
        r["monitor"], r["flagged"] = s, s > mon.threshold
        iou = _iou(r)
        errors.append(None if iou is None or error_iou is None else iou < error_iou)
    out["samples"] = {**mon.to_dict(), **flag_quality(scores, [r["flagged"] for r in records], errors),
                      "error": "no ground truth" if error_iou is None else f"sample IoU < {error_iou:.3f} ({how})",
                      "error_iou": error_iou, "flagged_samples": [r["index"] for r in records
                                                                                  if r["flagged"]]}
    ref_objects = [object_vector(o, mods) for r in ref_records for o in r["objects"]]
    objects = [o for r in records for o in r["objects"]]
    if len(ref_objects) >= 2 and objects:
        omon = ShareMonitor.fit(torch.tensor(ref_objects, dtype=torch.float64), quantile=quantile)
        oscores = omon.score(torch.tensor([object_vector(o, mods) for o in objects], dtype=torch.float64)).tolist()
        for o, s in zip(objects, oscores):
            o["monitor"], o["flagged"] = s, s > omon.threshold
        out["objects"] = {**omon.to_dict(), **flag_quality(oscores, [o["flagged"] for o in objects],
                                                           [not o["detected"] for o in objects]),
                          "error": "object missed by the model"}
    else:
        out["objects"] = None
    return out
