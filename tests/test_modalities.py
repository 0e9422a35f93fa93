"""The one table of modalities: every spelling of a combination parses to one name, bad names fail clearly, and the
table agrees with what the built-in models and samples actually use."""

from __future__ import annotations

import dataclasses

import pytest

from fusionlens.modalities import NAMES, TABLE, combination_name, modality, parse_modalities


@pytest.mark.parametrize("spelling", ["camera-radar", "camera,radar", "camera_radar", "radar,camera",
                                      " camera , radar ", ("radar", "camera")])
def test_every_spelling_of_a_pair_is_one_name(spelling):
    assert parse_modalities(spelling) == ("camera", "radar")  # table order, whatever order was given
    assert combination_name(spelling) == "camera-radar"


def test_name_round_trips():
    for n in range(1, len(NAMES) + 1):
        mods = NAMES[:n]
        assert parse_modalities(combination_name(mods)) == mods
    assert combination_name("lidar,camera,radar") == "camera-radar-lidar"


@pytest.mark.parametrize(("spec", "message"), [
    ("camera-sonar", r"unknown modality 'sonar'; choose from \['camera', 'radar', 'lidar'\]"),
    ("camera,camera", r"modalities \['camera'\] given twice"),
    ("", "no modality given"),
    (" , ", "no modality given"),
])
def test_bad_spellings_fail_naming_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_modalities(spec)


def test_entries_are_frozen_and_distinct():
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'letter'"):
        modality("camera").letter = "X"  # type: ignore[misc]
    for field in ("name", "batch_key", "letter", "colour"):
        values = [getattr(m, field) for m in TABLE]
        assert len(set(values)) == len(values), field
    with pytest.raises(ValueError, match="unknown modality 'sonar'"):
        modality("sonar")


def test_table_matches_the_built_in_models_and_samples():
    """Batch keys are Sample fields and keys of a collated batch, and so are the kwargs (validity masks are made by
    collation); names and kwargs are FusionModel's forward arguments; the travelling kwargs are what the model's own
    description says travel with each modality."""
    import inspect

    from fusionlens.data.collate import collate_samples
    from fusionlens.data.sample import Sample
    from fusionlens.models import build_model, preset_config
    from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

    fields = {f.name for f in dataclasses.fields(Sample)}
    batch = collate_samples([SyntheticDataset(2)[i] for i in range(2)])
    model = build_model(preset_config("tiny", ",".join(NAMES), grid=TEST_GRID, latent_dim=4, fusion_dim=8,
                                      decoder_width=8, head_dim=8, point_bev_channels=8))
    params = set(inspect.signature(model.forward).parameters)
    travels = model.describe().travels
    for m in TABLE:
        assert m.batch_key in fields and m.batch_key in batch and set(m.kwargs) <= set(batch), m
        assert m.name in params and set(m.kwargs) <= params, m  # forward(camera=..., intrinsics=...)
        assert tuple(travels[m.name]) == m.kwargs, m
