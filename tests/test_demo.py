"""`make demo` end to end at toy sizes: every step runs and the report links the figures it made."""

from __future__ import annotations

import json
import re

from fusionlens.demo import main


def test_demo_runs_every_step_and_writes_a_report(tmp_path):
    out = tmp_path / "demo"
    code = main(["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--samples", "3", "--figures", "1",
                 "--steps", "1", "--train-size", "4", "--finetune-steps", "1", "--trunk-steps", "2",
                 "--trunk-frames", "2"])
    assert code == 0
    report = (out / "audit" / "index.html").read_text()  # the demo ends with the sensor-reliance audit
    linked = re.findall(r'src="([^"]+\.png)"', report)
    assert "overview.png" in linked and all((out / "audit" / p).is_file() for p in linked)
    assert any((out / "explain").glob("*.png")) and any((out / "world").glob("*.png"))
    saved = json.loads((out / "audit" / "audit.json").read_text())
    assert set(saved["settings"]["partners"]) == {"radar-only"} and len(saved["samples"]) == 3
    assert all(f"{m} 0." in report or f"{m} nan" in report for m in ("altermoma", "magnitude", "snip"))
    assert (out / "checkpoints" / "camera_radar.pt").is_file()
    assert (out / "checkpoints" / "camera_trunk.pt").is_file()
    # a second run reuses the finished checkpoint instead of failing on it
    assert main(["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--samples", "3", "--figures", "1",
                 "--steps", "1", "--train-size", "4", "--finetune-steps", "1", "--trunk-steps", "2",
                 "--trunk-frames", "2"]) == 0


def test_demo_checkpoint_from_before_the_camera_trunk_is_retrained_not_resumed(tmp_path):
    from fusionlens.demo_pipeline import _same_camera_start
    from fusionlens.models import build_model, preset_config
    from fusionlens.train.checkpoint import save_checkpoint

    trunk = tmp_path / "camera_trunk.pt"
    for weights, expected in ((None, False), (str(trunk), True)):
        config = preset_config("tiny", "camera,radar", camera_weights=weights)
        path = save_checkpoint(tmp_path / "cr.pt", model=build_model(config, load_camera_weights=False),
                               model_config=config)
        assert _same_camera_start(path, trunk) is expected
