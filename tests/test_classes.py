import numpy as np
import pytest
from conftest import PROJECT

from nearfix_lib.core.classes import CARDIAC, ClassTable, load_table


def test_cardiac_table_matches_mission():
    assert CARDIAC.indices == list(range(1, 11))
    assert [c.key for c in CARDIAC.by_priority()] == [
        "Cor", "LAA", "PV", "LA", "LV", "Myo", "Ao", "RA", "RV", "PA"]
    assert {k: CARDIAC[k].expected_components for k in ("Ao", "Cor", "PV", "LA", "PA")} == {
        "Ao": 2, "Cor": 2, "PV": 2, "LA": 1, "PA": 1}
    assert CARDIAC["LAA"].attachment.targets == ("LA",)
    assert CARDIAC["PV"].attachment.targets == ("LA",)
    assert set(CARDIAC["Cor"].attachment.targets) == {"Myo", "Ao"}
    assert CARDIAC["Cor"].attachment.max_mm > 0


def test_resolve_accepts_index_digit_string_and_key():
    assert CARDIAC.resolve(9).key == "Cor"
    assert CARDIAC.resolve("9").key == "Cor"  # papermill -p cls 9 may arrive as a string
    assert CARDIAC.resolve("Cor").index == 9
    with pytest.raises(KeyError, match="unknown class index 11"):
        CARDIAC.resolve(11)
    with pytest.raises(KeyError, match="unknown class key"):
        CARDIAC["Coronary"]


def test_invalid_tables_are_refused():
    recs = CARDIAC.to_records()
    dup = [dict(r) for r in recs]
    dup[1]["index"] = 1
    with pytest.raises(ValueError, match="duplicate index"):
        ClassTable.from_records(dup)
    bad_target = [dict(r) for r in recs]
    bad_target[7]["attach_to"] = ["Nope"]
    with pytest.raises(ValueError, match="unknown classes"):
        ClassTable.from_records(bad_target)
    zero = [dict(r) for r in recs]
    zero[0]["index"] = 0
    with pytest.raises(ValueError, match="background"):
        ClassTable.from_records(zero)


def test_subset_drops_rules_to_missing_classes():
    sub = CARDIAC.subset(["LAA", "Cor", "Ao"])
    assert sub.keys == ["LAA", "Cor", "Ao"]
    assert sub["LAA"].attachment is None  # LA is not in the subset
    assert sub["Cor"].attachment.targets == ("Ao",)
    assert sub.indices == [8, 9, 6]  # indices keep their meaning


def test_yaml_round_trip_and_custom_table(tmp_path):
    path = tmp_path / "t.yaml"
    CARDIAC.to_yaml(path)
    assert ClassTable.from_yaml(path) == CARDIAC
    ts = load_table("params/classes_ts_chest.yaml", root=PROJECT)
    assert ts.keys == ["Heart", "Ao", "PA"] and ts.indices == [1, 2, 3]
    (tmp_path / "bad.yaml").write_text("classes:\n  - {index: 1, key: A, name: A, colour: [1, 2], priority: 1}\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        ClassTable.from_yaml(tmp_path / "bad.yaml")


def test_colour_lut_and_valid_values():
    lut = CARDIAC.colour_lut()
    assert lut.shape == (11, 4)
    assert lut[0, 3] == 0 and np.all(lut[1:, 3] == 1)
    assert np.allclose(lut[9, :3] * 255, CARDIAC["Cor"].colour)
    assert list(CARDIAC.valid_values()) == list(range(11))
