"""``claim_settings``: the record-or-refuse settings file behind a cell tree's ``recipe.json`` and ``protocol.json``."""

from __future__ import annotations

import json
import os

import pytest

from fusionlens.io import claim_settings

SETTINGS = {"steps": 200, "lr": 1e-4, "sizes": (192, 64)}
CLAIM = dict(what="cells measured with another protocol", remedy="pass another --out")


def test_first_use_writes_same_settings_pass_others_are_refused(tmp_path):
    path = tmp_path / "tree" / "protocol.json"
    claim_settings(path, SETTINGS, **CLAIM)
    assert json.loads(path.read_text()) == {"steps": 200, "lr": 1e-4, "sizes": [192, 64]}  # as JSON: tuples -> lists
    written = path.read_bytes()
    claim_settings(path, dict(SETTINGS), **CLAIM)  # same settings: fine, and the file is left as it was
    claim_settings(path, {"lr": 1e-4, "sizes": [192, 64], "steps": 200}, **CLAIM)  # key order and lists vs tuples
    assert path.read_bytes() == written
    with pytest.raises(ValueError, match=r"tree holds cells measured with another protocol steps: 200 there vs 25 now"
                                         r" \(protocol.json\) -- pass another --out$"):
        claim_settings(path, dict(SETTINGS, steps=25), **CLAIM)
    with pytest.raises(ValueError, match="tree holds cells measured with another protocol") as err:
        # every differing key is named, a missing or an extra one too
        claim_settings(path, {"steps": 25, "lr": 1e-4, "batch": 2}, **CLAIM)
    message = str(err.value)
    assert "steps: 200 there vs 25 now" in message and "batch: (absent) there vs 2 now" in message
    assert "sizes: [192, 64] there vs (absent) now" in message and "lr" not in message
    assert path.read_bytes() == written  # a refusal changes nothing


def test_settings_under_a_key_beside_extra_fields_and_assumed_settings(tmp_path):
    path = tmp_path / "recipe.json"
    legacy = {"recipe": "scratch", "depth": 18}
    with pytest.raises(ValueError, match=r"recipe: 'scratch' there vs 'pretrained' now \(no recipe.json yet: assum"):
        claim_settings(path, {"recipe": "pretrained", "depth": 18}, under="variant", assumed=legacy,
                       what="cells of another variant", remedy="use another --out")
    assert not path.exists()
    claim_settings(path, legacy, under="variant", extra={"text": "scratch, r18"}, assumed=legacy,
                   what="cells of another variant", remedy="use another --out")
    assert json.loads(path.read_text()) == {"variant": legacy, "text": "scratch, r18"}
    claim_settings(path, legacy, under="variant", extra={"text": "not compared"}, what="x", remedy="y")
    with pytest.raises(ValueError, match="depth: 18 there vs 34 now"):
        claim_settings(path, dict(legacy, depth=34), under="variant", what="cells of another variant", remedy="y")


def test_the_file_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "protocol.json"
    real_replace, renames = os.replace, []

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        claim_settings(path, SETTINGS, **CLAIM)
    assert list(tmp_path.iterdir()) == []  # neither a half-written file nor a temporary left behind

    def rename(src, dst):
        assert not os.path.exists(dst) and json.loads(open(src).read())["steps"] == 200  # complete before the rename
        renames.append((os.path.dirname(src), os.path.basename(src), dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", rename)
    claim_settings(path, SETTINGS, **CLAIM)
    [(folder, tmp_name, dst)] = renames
    assert folder == str(tmp_path) and tmp_name != path.name and str(dst) == str(path)
    assert json.loads(path.read_text())["steps"] == 200
