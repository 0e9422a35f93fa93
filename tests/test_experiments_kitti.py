"""AlterMOMA's KITTI tables: the paper's numbers, the table layout (mean ± std over seeds), and a tiny run of the
harness whose cells are stored once and whose protocol is checked."""

from __future__ import annotations

import pytest

from fusionlens.experiments import kitti as exp
from fusionlens.world import WorldConfig
from fusionlens.world.kitti_export import export_kitti


def test_paper_numbers():
    assert exp.paper_row("Car", "altermoma", 0.9)[0] == 77.4  # AP-3D easy, 90 %: the quoted number
    assert exp.paper_row("Car", "prospr", 0.9)[3] == 81.2  # AP-BEV easy
    assert exp.paper_row("Car", "none", None)[0] == 82.4
    assert exp.paper_row("Cyclist", "imp", 0.8)[5] == 35.7
    assert exp.paper_row("Car", "altermoma", 0.85) is None and exp.paper_row("Van", "imp", 0.8) is None


def _cell(method, sparsity, seed, value):
    ap = {m: {"Car": {d: value for d in ("easy", "moderate", "hard")}} for m in ("3d", "bev")}
    return {"method": method, "sparsity": sparsity, "seed": seed, "ap": ap}


def test_table_layout_mean_std_and_paper_alongside():
    cells = [_cell("none", None, 0, 90.0), _cell("altermoma", 0.9, 0, 50.0), _cell("altermoma", 0.9, 1, 60.0)]
    text = exp.tables(cells, ["Car"], ["altermoma"], [0.9])
    assert "#### 90 % sparsity" in text
    row = next(line for line in text.splitlines() if "AlterMOMA" in line)
    assert row.startswith("| Car | AlterMOMA | 2 | 55.0 ± 5.0 / 77.4 |")
    assert "| Car | no pruning | 1 | 90.0 / 82.4 |" in text


def test_harness_stores_cells_and_checks_its_protocol(tmp_path, monkeypatch):
    root = tmp_path / "kitti"
    export_kitti(root, {"train": 2, "val": 1}, cfg=WorldConfig(image_size=(64, 112)), seed=7)
    protocol = exp.KittiProtocol(reference_steps=2, finetune_steps=1, scoring_batches=1, batch_size=1)
    harness = exp.KittiTables(root, tmp_path / "out", protocol)
    text = harness.run(["snip"], [0.9], [0])
    cell = harness.cell("snip", 0.9, 0)
    assert cell["sparsity"] == 0.9 and cell["achieved_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert "| Car | SNIP | 1 |" in text
    monkeypatch.setattr(exp, "train_avod", lambda *a, **k: pytest.fail("a stored cell was recomputed"))
    again = exp.KittiTables(root, tmp_path / "out", protocol)
    assert again.cell("snip", 0.9, 0) == cell
    with pytest.raises(ValueError, match="cells of another KITTI protocol: finetune_steps: 1 there vs 5 now"):
        exp.KittiTables(root, tmp_path / "out", exp.KittiProtocol(reference_steps=2, finetune_steps=5,
                                                                   scoring_batches=1, batch_size=1))
