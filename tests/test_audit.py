"""The sensor-reliance audit (``fusionlens.audit``) on a model written the way other people write one: a LiDAR +
radar BEV net with its own names, a tuple output, a plain Dataset of dicts and labels given by a ``labels=`` function.

Oracles: shares, object scores, partners' detections, fault outputs and IoUs recomputed by hand from the
decomposition / the model's forward; the monitor against the Mahalanobis formula in numpy and AUROC by counting
pairs; resume without recomputation; bad input refused before work; the model handed back unchanged."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

import fusionlens.audit.api as audit_api
from fusionlens.audit import SampleLabels, ShareMonitor, audit, auroc, blackout_spec
from fusionlens.spec import ModelSpec

torch.set_num_threads(1)
H = W = 12


class Merge(nn.Module):
    """Concatenate the two sensors' BEV features, 3x3 conv, BatchNorm, ReLU."""

    def __init__(self, a: int, b: int, out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(a + b, out, 3, padding=1)
        self.bn = nn.BatchNorm2d(out)

    def forward(self, pc_feat: torch.Tensor, radar_feat: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(torch.cat([pc_feat, radar_feat], 1))))


class PcRadarNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pc_enc = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU())
        self.rd_enc = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.merge = Merge(6, 6, 8)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1))

    def forward(self, pc_bev: torch.Tensor, rad_bev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.merge(self.pc_enc(pc_bev), self.rd_enc(rad_bev))
        return self.head(f), f.mean()


class PcOnlyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))

    def forward(self, pc_bev: torch.Tensor) -> torch.Tensor:
        return self.body(pc_bev)


class Scenes(Dataset):
    """Dicts of BEV rasters with rectangular objects; each object seen by LiDAR, radar or both; tags per scene."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for k in range(n):
            pc, rad, seg = 0.1 * torch.rand(2, H, W, generator=g), 0.1 * torch.rand(3, H, W, generator=g), torch.zeros(
                H, W)
            masks, seen = [], []
            for j in range(2 + k % 2):
                x, y = int(torch.randint(0, H - 3, (1,), generator=g)), int(torch.randint(0, W - 3, (1,), generator=g))
                m = torch.zeros(H, W, dtype=torch.bool)
                m[x:x + 3, y:y + 2] = True
                who = ("lidar", "radar", "lidar+radar")[(k + j) % 3]
                if "lidar" in who:
                    pc[:, m] += 1.0
                if "radar" in who:
                    rad[:, m] += 1.0
                seg[m] = 1.0
                masks.append(m)
                seen.append(who.split("+"))
            self.items.append({"pc": pc, "rad": rad, "seg": seg, "masks": torch.stack(masks), "seen": seen,
                               "weather": ["rain"] if k % 3 == 0 else ["clear"]})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(items: list[dict]) -> dict:
    return default_collate([{"pc": it["pc"], "rad": it["rad"]} for it in items])


def labels_of(item: dict) -> dict:
    return {"boxes": item["masks"], "classes": ["car"] * len(item["masks"]), "tags": item["weather"],
            "seen_by": item["seen"], "target": item["seg"]}


def make_spec(model: nn.Module) -> ModelSpec:
    return ModelSpec(model, inputs=lambda b: ({"lidar": b["pc"], "radar": b["rad"]}, {}),
                     arguments={"lidar": "pc_bev", "radar": "rad_bev"}, output=0, fusion="merge", collate=collate)


def partner_spec(model: nn.Module) -> ModelSpec:
    return ModelSpec(model, inputs=lambda b: ({"lidar": b["pc"]}, {}), arguments={"lidar": "pc_bev"},
                     collate=collate)


def trained_models() -> tuple[PcRadarNet, PcOnlyNet]:
    torch.manual_seed(0)
    net, solo = PcRadarNet(), PcOnlyNet()
    data = Scenes(8, seed=5)
    opt = torch.optim.Adam([*net.parameters(), *solo.parameters()], lr=0.02)
    batch = default_collate([{"pc": it["pc"], "rad": it["rad"], "seg": it["seg"]} for it in data.items])
    for _ in range(40):  # enough for both to find most objects
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(net(batch["pc"], batch["rad"])[0][:, 0], batch["seg"])
        loss = loss + nn.functional.binary_cross_entropy_with_logits(solo(batch["pc"])[:, 0], batch["seg"])
        loss.backward()
        opt.step()
    return net.eval(), solo.eval()


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    net, solo = trained_models()
    data, ref = Scenes(6, seed=1), Scenes(8, seed=2)
    out = tmp_path_factory.mktemp("audit") / "report"
    result = audit(make_spec(net), data, out=out, labels=labels_of, partners={"lidar-only": partner_spec(solo)},
                   reference=ref, select=[2], error_iou=0.9, progress=False)
    return net, solo, data, ref, result


def hand_sample(net: PcRadarNet, item: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    d = make_spec(net).decompose(collate([item]))
    return d.output[0, 0], {m: d.components[m][0, 0].double() for m in ("lidar", "radar")}


def signed(sums: dict[str, float]) -> dict[str, float]:
    den = sum(abs(v) for v in sums.values())
    return {m: v / den for m, v in sums.items()}


def test_sample_shares_objects_and_partners_equal_hand_sums(audited):
    net, solo, data, _, result = audited
    for rec in result.records:
        item = data[rec["index"]]
        out, comps = hand_sample(net, item)
        pos = out > 0
        want = signed({m: float(c[pos].sum()) for m, c in comps.items()}) if pos.any() else None
        got = rec["shares"]["positive"]
        assert (got is None) == (want is None)
        if want:
            assert got == pytest.approx(want, abs=1e-6)
        assert rec["shares"]["map"] == pytest.approx(signed({m: float(c.sum()) for m, c in comps.items()}), abs=1e-6)
        assert rec["positive_cells"] == int(pos.sum())
        solo_out = solo(item["pc"][None])[0, 0].detach()
        assert len(rec["objects"]) == len(item["masks"])
        for obj, mask, seen in zip(rec["objects"], item["masks"], item["seen"]):
            cells = [(i, j) for i in range(H) for j in range(W) if mask[i, j]]  # explicit loop over the cells
            scores = {m: sum(float(c[i, j]) for i, j in cells) for m, c in comps.items()}
            assert obj["scores"] == pytest.approx(scores, abs=1e-5)
            assert obj["detected"] == (sum(float(out[i, j]) for i, j in cells) / len(cells) > 0)
            assert obj["partners"]["lidar-only"] == (sum(float(solo_out[i, j]) for i, j in cells) / len(cells) > 0)
            if len(seen) == 1:
                assert obj["right_sensor"] == (max(scores, key=scores.get) == seen[0])
            else:
                assert obj["single_sensor"] is None and obj["right_sensor"] is None
        inter = int(((out > 0) & (item["seg"] > 0.5)).sum())
        union = int(((out > 0) | (item["seg"] > 0.5)).sum())
        assert rec["iou"] == {"inter": inter, "union": union}


def test_reliance_rows_are_means_and_spreads_over_the_group(audited):
    _, _, _, _, result = audited
    rows = {(r["group"], r["value"], r["where"]): r for r in result.tables["reliance"]}
    for tag in ("all", "rain", "clear"):
        part = [r for r in result.records if tag == "all" or tag in r["tags"]]
        shares = [r["shares"]["map"] for r in part]
        row = rows[("all" if tag == "all" else "condition", tag, "map")]
        assert row["n"] == len(part)
        for m in ("lidar", "radar"):
            assert row[m] == pytest.approx(statistics.fmean(s[m] for s in shares))
            assert row[f"{m} sd"] == pytest.approx(statistics.pstdev(s[m] for s in shares))
        inter = sum(r["iou"]["inter"] for r in part)
        assert row["iou"] == pytest.approx(inter / sum(r["iou"]["union"] for r in part))
    objs = [o for r in result.records for o in r["objects"]]
    assert rows[("class", "car", "objects")]["n"] == len(objs)
    assert not any(r["group"] == "distance" for r in result.tables["reliance"])  # no grid: no distance bands
    right = {r["value"]: r for r in result.tables["right_sensor"]}
    singles = [o for o in objs if o["single_sensor"]]
    assert right["all"]["objects"] == len(singles)
    assert right["all"]["right sensor"] == pytest.approx(sum(o["right_sensor"] for o in singles) / len(singles))
    summary = {r["partner"]: r for r in result.tables["partners"]}["lidar-only"]
    assert summary["lost by fusion"] == sum(o["partners"]["lidar-only"] and not o["detected"] for o in objs)
    assert summary["found only by fusion"] == sum(o["detected"] and not o["partners"]["lidar-only"] for o in objs)
    assert len(result.tables["lost_found"]) == summary["lost by fusion"] + summary["found only by fusion"]


def test_faults_black_out_one_sensor(audited):
    net, _, data, _, result = audited
    item = data[0]
    rec = result.records[0]
    for sensor, zeroed in (("radar", "rad"), ("lidar", "pc")):
        inputs = {"pc": item["pc"][None], "rad": item["rad"][None]}
        inputs[zeroed] = torch.zeros_like(inputs[zeroed])
        out = net(inputs["pc"], inputs["rad"])[0][0, 0].detach()
        fault = rec["faults"][f"no {sensor}"]
        assert fault["positive_cells"] == int((out > 0).sum())
        assert fault["iou"]["inter"] == int(((out > 0) & (item["seg"] > 0.5)).sum())
    row = {r["fault"]: r for r in result.tables["faults"]}["no radar"]
    faulted = [r["faults"]["no radar"]["iou"] for r in result.records]
    assert row["iou faulted"] == pytest.approx(sum(f["inter"] for f in faulted) / sum(f["union"] for f in faulted))
    # a travelling boolean mask is cleared with its modality (a dropped sensor), calibration kept
    spec = ModelSpec(PcOnlyNet(), inputs=lambda b: ({"lidar": b["pc"]}, {"valid": b["valid"], "calib": b["calib"]}),
                     travels={"lidar": ("valid", "calib")})
    tensors, kwargs = blackout_spec(spec, "lidar").inputs({"pc": torch.ones(2), "valid": torch.ones(2, dtype=bool),
                                                            "calib": torch.ones(3)})
    assert not tensors["lidar"].any() and not kwargs["valid"].any() and kwargs["calib"].eq(1).all()


def test_monitor_is_the_mahalanobis_formula_and_auroc_counts_pairs():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(30, 4))
    ref[:, 3] = ref[:, 2]  # collinear columns: the ridge keeps the inverse defined
    mon = ShareMonitor.fit(torch.tensor(ref), quantile=0.9, ridge=0.05)
    cov = np.cov(ref.T)
    prec = np.linalg.inv(cov + (0.05 * np.trace(cov) / 4 + 1e-9) * np.eye(4))
    x = rng.normal(size=(5, 4))
    d = x - ref.mean(0)
    assert mon.score(torch.tensor(x)).numpy() == pytest.approx(np.sqrt(np.einsum("ni,ij,nj->n", d, prec, d)))
    dr = ref - ref.mean(0)
    assert mon.threshold == pytest.approx(np.quantile(np.sqrt(np.einsum("ni,ij,nj->n", dr, prec, dr)), 0.9))
    scores, errors = [0.1, 0.4, 0.35, 0.8, 0.4], [False, True, False, True, False]
    pairs = [(p, n) for p, e in zip(scores, errors) if e for n, f in zip(scores, errors) if not f]
    by_hand = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auroc(scores, errors) == pytest.approx(by_hand)
    assert auroc([1.0, 2.0], [True, True]) is None
    with pytest.raises(ValueError, match="at least 2 reference"):
        ShareMonitor.fit(torch.zeros(1, 3))


def test_monitor_flags_against_the_reference_split(audited):
    _, _, _, ref, result = audited
    mon = result.monitor["samples"]
    assert mon["reference_count"] == len(ref) and "separate reference" in result.monitor["reference"]
    flagged = [r["index"] for r in result.records if r["monitor"] > mon["threshold"]]
    assert mon["flagged_samples"] == flagged
    assert all((r["page"] is not None) == (r["index"] in [2, *flagged]) for r in result.records)
    errors = [r["iou"]["inter"] / r["iou"]["union"] < 0.9 for r in result.records]
    assert any(errors) and not all(errors)
    assert mon["auroc"] == pytest.approx(auroc([r["monitor"] for r in result.records], errors))


def test_report_files_hold_every_table(audited):
    _, _, _, _, result = audited
    saved = json.loads((result.out / "audit.json").read_text())
    assert saved["tables"]["reliance"][0]["n"] == result.tables["reliance"][0]["n"]
    for name, rows in result.tables.items():
        if rows:
            lines = (result.out / f"{name}.csv").read_text().strip().splitlines()
            assert len(lines) == len(rows) + 1, name
    for page in result.pages.values():
        assert page.is_file() and page.with_suffix(".png").stat().st_size > 10_000
    assert 'src="overview.png"' in result.index.read_text()


def test_resume_reuses_cached_samples_and_refuses_other_settings(audited, tmp_path, monkeypatch):
    net, solo, data, ref, result = audited
    calls = []
    real = audit_api.audit_sample
    monkeypatch.setattr(audit_api, "audit_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = audit(make_spec(net), data, out=result.out, labels=labels_of, partners={"lidar-only": partner_spec(solo)},
                  reference=ref, error_iou=0.9, max_pages=0, progress=False)
    assert calls == [] and again.tables["reliance"] == result.tables["reliance"]
    garbled = result.out / "cache" / "samples" / "000001.json"
    garbled.write_text("{not json")
    audit(make_spec(net), data, out=result.out, labels=labels_of, partners={"lidar-only": partner_spec(solo)},
          reference=ref, max_pages=0, progress=False)
    assert len(calls) == 1 and json.loads(garbled.read_text())["index"] == 1
    with pytest.raises(ValueError, match="threshold"):
        audit(make_spec(net), data, out=result.out, labels=labels_of, threshold=0.5, progress=False)


def test_bad_input_is_refused_before_work_and_the_model_comes_back_unchanged(tmp_path):
    net = PcRadarNet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = Scenes(3)
    spec = make_spec(net)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out .* is a file"):
        audit(spec, data, out=tmp_path / "file")
    with pytest.raises(ValueError, match="select"):
        audit(spec, data, out=tmp_path / "a", select=[7])
    with pytest.raises(ValueError, match="labels.classes has 1 entries"):
        audit(spec, data, out=tmp_path / "b", labels=lambda it: {"boxes": it["masks"], "classes": ["car"]})
    with pytest.raises(ValueError, match="unknown keys"):
        audit(spec, data, out=tmp_path / "b", labels=lambda it: {"box": it["masks"]})
    with pytest.raises(ValueError, match="need the output's grid"):
        audit(spec, data, out=tmp_path / "c", labels=lambda it: SampleLabels(boxes=torch.zeros(1, 5)),
              progress=False)
    wide = ModelSpec(nn.Conv2d(2, 1, 1, stride=2), inputs=lambda b: ({"lidar": b["pc"]}, {}), collate=collate)
    with pytest.raises(ValueError, match="partner 'coarse'"):
        audit(spec, data, out=tmp_path / "d", partners={"coarse": wide})
    with pytest.raises(ValueError, match="distance_bands"):
        audit(spec, data, out=tmp_path / "e", distance_bands=[10, 5])
    with pytest.raises(ValueError, match="faults names"):
        audit(spec, data, out=tmp_path / "f", faults=["sonar"])
    assert not any((tmp_path / n).exists() for n in "abdef")  # refused before anything was written
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    result = audit(spec, data, out=tmp_path / "ok", labels=labels_of, progress=False, max_pages=0)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert "the audited samples themselves" in result.monitor["reference"] and not result.pages


def test_without_labels_the_audit_keeps_what_it_can(tmp_path):
    net, _ = trained_models()
    result = audit(make_spec(net), Scenes(4), out=tmp_path / "plain", faults=False, progress=False, max_pages=1)
    wheres = {r["where"] for r in result.tables["reliance"]}
    assert wheres == {"positive", "map"}  # no objects, no conditions, no IoU
    assert all(r["iou"] is None for r in result.tables["reliance"])
    assert not result.tables["objects"] and not result.tables["right_sensor"] and not result.tables["faults"]
    assert result.monitor["samples"]["auroc"] is None and result.monitor["samples"]["items"] == 0
    assert len(result.pages) <= 1 and result.index.is_file()
    assert math.isfinite(result.records[0]["conservation_error"])
