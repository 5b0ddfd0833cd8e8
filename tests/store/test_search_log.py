"""The schedule search's measurement files (calib.store.search_log): what is read is bounded and checked, every
problem one line that says what to do, and a write is atomic."""

from __future__ import annotations

import json
import os

import pytest

from calib.errors import CalibError
from calib.store.search_log import FORMAT, MAX_ENTRIES, MAX_NAME, VERSION, SearchLog, search_log_path

KEY = {"source": "builtin:digits", "steps": 6, "budgets": [3]}


def _write(path, entries, key=KEY, **extra):
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "key": key, "entries": entries, **extra}))


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_written_log_reads_back_and_resumes(tmp_path):
    log = SearchLog(tmp_path / "s.json")
    assert log.path == search_log_path(tmp_path / "s.json") == tmp_path / "s.search.json"
    assert log.read(KEY) == {}
    log.write(KEY, {"measure:output-newton1:0,3": 0.25, "holdout:output-newton1:0,3": 0.5})
    assert log.read(KEY) == {"measure:output-newton1:0,3": 0.25, "holdout:output-newton1:0,3": 0.5}
    assert not list(tmp_path.glob("*.tmp*"))  # atomic: no temporary left behind


@pytest.mark.parametrize("entries, case", [
    ({"a": "0.5"}, "a string"),
    ({"a": -0.1}, "a negative error"),
    ({"a": True}, "a boolean"),
    ({"a": [0.5]}, "a list"),
    ({"x" * (MAX_NAME + 1): 0.5}, "an over-long name"),
    ([0.5], "a list of entries"),
])
def test_damaged_entries_are_refused_in_one_line(tmp_path, entries, case):
    _write(tmp_path / "s.search.json", entries)
    with pytest.raises(CalibError) as info:
        SearchLog(tmp_path / "s.json").read(KEY)
    assert "damaged" in _one_line(info) and "delete the file" in str(info.value), case


def test_too_many_entries_are_refused(tmp_path):
    _write(tmp_path / "s.search.json", {f"e{i}": 0.1 for i in range(MAX_ENTRIES + 1)})
    with pytest.raises(CalibError, match="damaged"):
        SearchLog(tmp_path / "s.json").read(KEY)


def test_non_finite_literals_deep_nesting_and_bytes_are_refused(tmp_path):
    path = tmp_path / "s.search.json"
    nan = json.dumps({"format": FORMAT, "version": VERSION, "key": KEY, "entries": {"a": 0.5}}).replace("0.5", "NaN")
    for raw in (nan.encode(), b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe not utf-8"):
        path.write_bytes(raw)
        with pytest.raises(CalibError) as info:
            SearchLog(tmp_path / "s.json").read(KEY)
        assert "delete" in _one_line(info) and "measure them again" in str(info.value), raw[:40]


def test_another_settings_key_is_refused_naming_what_differs(tmp_path):
    _write(tmp_path / "s.search.json", {"a": 0.1}, key={**KEY, "steps": 8})
    with pytest.raises(CalibError) as info:
        SearchLog(tmp_path / "s.json").read(KEY)
    message = _one_line(info)
    assert "steps differ" in message and "--overwrite" in message


def test_not_a_search_file_is_refused(tmp_path):
    (tmp_path / "s.search.json").write_text(json.dumps({"format": "calib.coefficients"}))
    with pytest.raises(CalibError, match="not a calib schedule search file"):
        SearchLog(tmp_path / "s.json").read(KEY)


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    os.mkfifo(tmp_path / "s.search.json")  # opening it for reading would block forever
    with pytest.raises(CalibError) as info:
        SearchLog(tmp_path / "s.json").read(KEY)
    assert "FIFO" in _one_line(info)
