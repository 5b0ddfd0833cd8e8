"""``calib demo``'s comparison picture says which row is which and where the cached output differs."""

from __future__ import annotations

import numpy as np

from calib.jobs.demo import DIFFERENCE_GAIN, comparison_picture


def test_the_picture_labels_three_rows_and_maps_the_difference():
    base = np.zeros((80, 800), np.uint8)
    cached = base.copy()
    cached[10:20, 30:40] = 20
    picture = np.asarray(comparison_picture(base, cached, "cached: budget 15 of 30 steps"))
    strip = (picture.shape[0] - 3 * 80) // 3
    assert picture.shape == (3 * (80 + strip), 800) and strip > 0
    labels = [picture[i * (80 + strip):i * (80 + strip) + strip] for i in range(3)]
    assert all((label < 128).any() for label in labels)  # each row has its label written above it
    rows = [picture[i * (80 + strip) + strip:(i + 1) * (80 + strip)] for i in range(3)]
    assert np.array_equal(rows[0], base) and np.array_equal(rows[1], cached)
    assert rows[2][15, 35] == 20 * DIFFERENCE_GAIN and rows[2][50, 500] == 0  # bright where they differ only


def test_the_demo_schedule_search_shows_its_progress(monkeypatch, tmp_path):
    """The demo's longest stage (the schedule search: 23 silent minutes under load once) runs with its progress
    bar: the search is called without ``progress=False``."""
    import calib.jobs.demo as demo

    seen = {}

    class Stop(Exception):
        pass

    def fit_schedule(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(demo, "fit_schedule", fit_schedule)
    monkeypatch.setattr(demo, "read_traces", lambda paths: type("T", (), {"trajectories": []})())
    try:
        demo._choose(None, tmp_path / "t.h5", tmp_path / "c.json", tmp_path, print)
    except Stop:
        pass
    assert seen and seen.get("progress", True) is True
