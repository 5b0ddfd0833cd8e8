"""``calib report`` through the CLI on real inputs made here with the built-in digits model (a trace of 3 prompts x
1 seed x 6 steps, its TeaCache fit, a schedule search with a half budget, and ``calib eval``'s own results file):
the summary's numbers are the inputs' numbers, the evaluation plots the measured error (not the replay's proxy), a
schedule file's masks are shown as the file says, and traces are optional when files are given."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from html import unescape
from html.parser import HTMLParser

import pytest

from cli_runner import run_cli
from helpers.cli_assets import FAST_FIT

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 6
PROMPTS = ("a handwritten 1", "a handwritten 4", "a handwritten 7")
# 0.5 and 0.42 of 6 steps: budgets 3 and 2.5; a half budget spends its half forward on a cond-only step (the
# built-in model batches guidance), so the file has one
SCHEDULE = ["--fractions", "0.5,0.42", "--forecast-targets", "output,residual", "--forecast-order", "1",
            "--search-evals", "3"]


def _ok(work, *argv) -> str:
    code, out, err = run_cli(list(argv), work)
    assert code == 0, (argv, out[-2000:], err[-2000:])
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """trace t.h5 -> t.json (TeaCache) and s.json (schedule) -> calib eval of t.json at its recommended threshold
    and one more -> e.json, at a larger threshold without traces -> e2.json; and e-compare.json: the same results
    with the frontier ``calib eval --compare`` adds, measured for calib's gate, the uniform peer and MagCache (the
    full set of rows takes minutes)."""
    work = tmp_path_factory.mktemp("report")
    (work / "p.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    _ok(work, "trace", "--model", "builtin:digits", "--prompts", "p.txt", "--steps", STEPS, "--seeds", "0",
        "--out", "t.h5")
    # 6 steps: no gated skip keeps calib fit's default quality bar (it would recommend no cache, a case of its own
    # below); these tests are about showing a recommended threshold, so the bar is opened
    _ok(work, "fit", "t.h5", *FAST_FIT, "--max-error", "1", "--no-plot", "--out", "t.json")
    _ok(work, "fit", "t.h5", "--method", "schedule", *SCHEDULE, "--out", "s.json")
    recommended = json.loads((work / "t.json").read_text())["thresholds"]["recommended"]
    _ok(work, "eval", "--coeffs", "t.json", "--prompts", "p.txt", "--seeds", "100", "--repeats", "1",
        "--threshold", recommended, "--threshold", recommended / 4, "--traces", "t.h5", "--out", "e.json")
    _ok(work, "eval", "--coeffs", "t.json", "--prompts", "p.txt", "--seeds", "100", "--repeats", "1",
        "--threshold", recommended * 1.5, "--out", "e2.json")  # another setting: a second measured series

    import calib.runtime as cr
    from calib.evaluate.frontier import run_frontier
    from calib.models.digits import load_pipeline
    from calib.store import read_traces

    results = json.loads((work / "e.json").read_text())
    results["frontier"] = run_frontier(load_pipeline(), cr.load(work / "t.json"), read_traces([work / "t.h5"]),
                                       ["a handwritten 7"], (100,), steps=STEPS, guidance=3.0,
                                       rows=("calib", "uniform", "magcache"), echo=lambda *a: None)
    (work / "e-compare.json").write_text(json.dumps(results), encoding="utf-8")
    return work


@pytest.fixture(scope="module")
def page(made):
    _ok(made, "report", "t.h5", "--coeffs", "t.json", "--coeffs", "s.json", "--eval", "e.json", "--out", "r.html")
    return (made / "r.html").read_text(encoding="utf-8")


class _Page(HTMLParser):
    """Section ids, images and tables (rows of cell texts) per section; the summary's paragraphs."""

    def __init__(self):
        super().__init__()
        self.section = None
        self.ids, self.images, self.tables, self.paragraphs = [], {}, {}, {}
        self._cell = self._row = self._text = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id")
            self.ids.append(self.section)
        elif tag == "img":
            self.images.setdefault(self.section, []).append(a.get("src", ""))
        elif tag == "table":
            self.tables.setdefault(self.section, []).append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "p":
            self._text = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.tables[self.section][-1].append(self._row)
        elif tag == "p" and self._text is not None:
            self.paragraphs.setdefault(self.section, []).append(self._text)
            self._text = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._text is not None:
            self._text += data


def _parse(html_text: str) -> _Page:
    parsed = _Page()
    parsed.feed(html_text)
    return parsed


def _decode(src: str):
    from PIL import Image

    assert src.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    img.load()
    return img


def _records(table: list[list[str]]) -> list[dict]:
    head, *rows = table
    return [dict(zip(head, row)) for row in rows]


def _number(text: str) -> float:
    return float(text.rstrip("x%")) / (100 if text.endswith("%") else 1)


def _close(shown: float, value: float, digits: int = 4) -> bool:
    """``shown`` is ``value`` as the page rounds it (``digits`` significant digits)."""
    return math.isclose(shown, float(f"{value:.{digits}g}"), rel_tol=1e-9, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# calib eval's own results: what the file records, what the page draws
# ---------------------------------------------------------------------------------------------------------------
def test_eval_results_record_what_the_report_sums_up(made):
    results = json.loads((made / "e.json").read_text())
    doc = json.loads((made / "t.json").read_text())
    assert results["format"] == "calib.eval" and results["version"] == 1
    assert results["method"] == doc["method"] == "teacache"
    assert results["recommended_threshold"] == doc["thresholds"]["recommended"]


def test_the_evaluation_plots_the_measured_error_and_labels_the_proxy(made, page):
    parsed = _parse(page)
    assert "frontier" in parsed.ids
    section = page[page.index("<section id='frontier'>"):]
    section = section[:section.index("</section>")]
    assert "latent rel-L1 vs uncached (measured)" in unescape(section)
    assert "No numeric speed and quality columns" not in section
    (src,) = parsed.images["frontier"]
    assert _decode(src).size[0] > 600
    results = json.loads((made / "e.json").read_text())
    rows = _records(parsed.tables["frontier"][0])
    assert len(rows) == len(results["results"])
    proxies = 0
    for row, r in zip(rows, results["results"]):
        assert _number(row["threshold"]) == pytest.approx(r["threshold"])
        assert row["computed (measured)"] == f"{r['measured']['compute_fraction']:.1%}"
        assert row["wall-clock speed-up (measured)"] == f"{r['measured']['wall_speedup']:.2f}x"
        assert _close(_number(row["latent rel-L1 vs uncached (measured)"]), r["quality"]["latent_rel_l1"]["mean"])
        assert _close(_number(row["PSNR dB"]), r["quality"]["psnr"]["mean"])
        proxy = r["predicted"]["error_proxy"]
        assert _close(_number(row["error proxy (replayed prediction, not measured)"]), proxy)
        if not math.isclose(proxy, r["quality"]["latent_rel_l1"]["mean"], rel_tol=1e-3):
            proxies += 1
    assert proxies  # the proxy and the measurement differ here: the page shows each in its own column


def test_the_measured_series_is_read_from_the_measurement_not_the_proxy(made):
    from calib.evaluate.results import read_eval_results

    data = json.loads((made / "e.json").read_text())
    results = read_eval_results(data, "e.json")
    for point, r in zip(results.points, data["results"]):
        assert point.latent_rel_l1 == r["quality"]["latent_rel_l1"]["mean"]
        assert point.compute_fraction == r["measured"]["compute_fraction"]
        assert point.wall_speedup == r["measured"]["wall_speedup"]
        assert point.error_proxy == r["predicted"]["error_proxy"]
    assert results.recommended_point().threshold == data["recommended_threshold"]


# ---------------------------------------------------------------------------------------------------------------
# the summary
# ---------------------------------------------------------------------------------------------------------------
def _summary(page_text: str) -> str:
    return " ".join(_parse(page_text).paragraphs["summary"])


def test_the_summary_states_the_inputs_numbers(made, page):
    summary = _summary(page)
    doc = json.loads((made / "t.json").read_text())
    schedule = json.loads((made / "s.json").read_text())
    results = json.loads((made / "e.json").read_text())
    # what was calibrated
    assert f"t.json calibrates {doc['model']['source']} ({doc['model']['class']}) with the teacache method for " \
           f"{STEPS} steps" in summary
    assert f"from {doc['calibration']['num_trajectories']} traced trajectories" in summary
    # the recommended setting of each file
    rec = doc["thresholds"]["recommended"]
    row = next(r for r in doc["thresholds"]["table"] if r["threshold"] == rec)
    assert f"Recommended: threshold {rec:g} (teacache); replayed on the traces it computes " \
           f"{row['compute_fraction']:.1%} of steps" in summary
    budget = schedule["recommended"]["budget"]
    entry = next(e for e in schedule["schedules"] if e["budget"] == budget)
    found = re.search(r"Recommended: budget ([\d.]+) of (\d+) steps \(([\d.]+)% of full forwards.*?latent rel-L1 "
                      r"([\d.e-]+) against the uncached output on held-out calibration prompts", summary)
    assert found, summary
    assert float(found[1]) == budget and int(found[2]) == STEPS
    assert float(found[3]) == pytest.approx(100 * budget / STEPS, abs=0.05)
    assert _close(float(found[4]), entry["error"]["holdout_latent_rel_l1"])
    # what calib eval measured at the recommended threshold
    measured = next(r for r in results["results"] if r["threshold"] == results["recommended_threshold"])
    found = re.search(r"calib eval \(e\.json\) generated (\d+) held-out prompts? x (\d+) seeds? at (\d+) steps"
                      r".*?at the recommended threshold t=([\d.]+), ([\d.]+)% of full forwards computed .*?, "
                      r"([\d.]+)x faster wall-clock, latent rel-L1 ([\d.e-]+) against the uncached output of the "
                      r"same prompt and seed \(PSNR ([\d.]+) dB", summary)
    assert found, summary
    assert (int(found[1]), int(found[2]), int(found[3])) == (len(PROMPTS), 1, STEPS)
    assert float(found[4]) == pytest.approx(results["recommended_threshold"])
    assert float(found[5]) == pytest.approx(100 * measured["measured"]["compute_fraction"], abs=0.05)
    assert float(found[6]) == pytest.approx(measured["measured"]["wall_speedup"], abs=0.005)
    assert _close(float(found[7]), measured["quality"]["latent_rel_l1"]["mean"])
    assert float(found[8]) == pytest.approx(measured["quality"]["psnr"]["mean"], abs=0.05)
    # the alternative at similar compute: the schedule's budget nearest the measured fraction, and what it measured
    fraction = measured["measured"]["compute_fraction"]
    nearest = min(schedule["schedules"], key=lambda e: abs(e["budget"] / STEPS - fraction))
    found = re.search(r"Alternative at similar compute: s\.json's budget ([\d.]+) .*?measured latent rel-L1 "
                      r"([\d.e-]+) during its search", summary)
    assert found, summary
    assert float(found[1]) == nearest["budget"]
    assert _close(float(found[2]), nearest["error"]["holdout_latent_rel_l1"])


def test_the_summary_names_the_best_peer_calib_eval_compare_measured(made):
    from calib.evaluate.frontier import LABELS

    _ok(made, "report", "--coeffs", "t.json", "--eval", "e-compare.json", "--out", "rc.html")
    page_text = (made / "rc.html").read_text(encoding="utf-8")
    summary = _summary(page_text)
    results = json.loads((made / "e-compare.json").read_text())
    fraction = next(r for r in results["results"]
                    if r["threshold"] == results["recommended_threshold"])["measured"]["compute_fraction"]
    frontier = results["frontier"]
    target = min((t for t in frontier["targets"] if frontier["comparison"]["fraction"][f"{t:.4f}"].get("peer")),
                 key=lambda t: abs(t - fraction))
    peer = frontier["comparison"]["fraction"][f"{target:.4f}"]["peer"]
    found = re.search(r"At (\d+)% of full forwards, the best peer calib eval --compare measured is (.+?): latent "
                      r"rel-L1 ([\d.e-]+)", summary)
    assert found, summary
    assert int(found[1]) == round(100 * target)
    assert found[2] == LABELS[peer["method"]]
    assert _close(float(found[3]), peer["latent_rel_l1"])
    # the frontier's own figure and table follow
    assert "calib eval --compare (e-compare.json): every method" in page_text
    assert len(_parse(page_text).images["frontier"]) == 2


def test_several_results_files_are_one_series_each_and_alternatives_to_each_other(made):
    _ok(made, "report", "--eval", "e.json", "--eval", "e2.json", "--out", "two.html")
    page_text = (made / "two.html").read_text(encoding="utf-8")
    parsed = _parse(page_text)
    assert len(parsed.images["frontier"]) == 1  # one plot, a series per file
    assert [len(_records(t)) for t in parsed.tables["frontier"]] == [2, 1]
    second = json.loads((made / "e2.json").read_text())
    assert second["results"][0]["predicted"] is None  # no --traces: no prediction, the proxy columns are empty
    assert _records(parsed.tables["frontier"][1])[0]["error proxy (replayed prediction, not measured)"] == "—"
    (other,) = second["results"]
    found = re.search(r"Alternative at similar compute: e2\.json \(teacache t\.json\) measured t=([\d.]+), "
                      r"([\d.]+)% of full forwards computed.*?latent rel-L1 ([\d.e-]+) against", _summary(page_text))
    assert found, _summary(page_text)
    assert float(found[1]) == pytest.approx(other["threshold"], rel=1e-5)
    assert float(found[2]) == pytest.approx(100 * other["measured"]["compute_fraction"], abs=0.05)
    assert _close(float(found[3]), other["quality"]["latent_rel_l1"]["mean"])


# ---------------------------------------------------------------------------------------------------------------
# schedule files
# ---------------------------------------------------------------------------------------------------------------
def test_the_schedule_masks_are_the_documents(made, page):
    from calib.report.schedules import COMPUTED, COND_ONLY, FORECAST, budget_rows, mask_states

    doc = json.loads((made / "s.json").read_text())
    parsed = _parse(page)
    assert "schedule" in parsed.ids
    (src,) = parsed.images["schedule"]
    _decode(src)
    rows = _records(parsed.tables["schedule"][0])
    entries = sorted(doc["schedules"], key=lambda e: -e["budget"])
    assert [float(r["budget"]) for r in rows] == [e["budget"] for e in entries]
    assert any(e.get("cond_only") for e in entries)  # the half budget: the cond-only column is exercised
    for row, entry in zip(rows, entries):
        assert row["computed steps"] == ", ".join(map(str, sorted(entry["components"]["transformer"])))
        cond = sorted((entry.get("cond_only") or {}).get("transformer", []))
        assert row["cond-only steps"] == (", ".join(map(str, cond)) if cond else "—")
        assert row["compute fraction"] == f"{entry['budget'] / doc['steps']:.1%}"
        assert _close(_number(row["held-out latent rel-L1 (calibration)"]), entry["error"]["holdout_latent_rel_l1"])
        forecast = entry["forecast"]
        assert row["forecast target"] == (forecast.get("target") or ("output" if forecast["kind"] == "cfg"
                                                                     else "residual"))
        assert row["forecast basis"].startswith("CFG" if forecast["kind"] == "cfg" else "Newton order")
    chosen = re.findall(r'<tr class="chosen"><td class="">([\d.]+)</td>', page[page.index("<section id='schedule'>"):])
    assert float(chosen[0]) == doc["recommended"]["budget"]
    # the grid drawn: per budget, per step, the state the document gives it
    for states, entry in zip(mask_states(budget_rows(doc)), entries):
        full = set(entry["components"]["transformer"])
        cond = set((entry.get("cond_only") or {}).get("transformer", []))
        assert states == [COMPUTED if s in full else COND_ONLY if s in cond else FORECAST for s in range(STEPS)]


def test_an_auto_file_shows_its_verdict_and_what_it_kept(made):
    _ok(made, "fit", "t.h5", "--method", "auto", "--compute-fraction", "0.5", "--fractions", "0.5",
        "--forecast-targets", "output", "--forecast-order", "1", "--search-evals", "3", "--out", "a.json")
    _ok(made, "report", "--coeffs", "a.json", "--out", "auto.html")
    page_text = (made / "auto.html").read_text(encoding="utf-8")
    verdict = json.loads((made / "a.json").read_text())["calibration"]["auto"]
    found = re.search(r"calib fit --method auto \(a\.json\) compared its two candidates at <= (\d+)% of compute .*?"
                      r"gate \+ forecast ([\d.e-]+) at ([\d.]+)%, schedule \+ forecast ([\d.e-]+) at ([\d.]+)%; it "
                      r"kept the (gate|schedule)\.", _summary(page_text))
    assert found, _summary(page_text)
    assert int(found[1]) == round(100 * verdict["target_compute_fraction"])
    assert _close(float(found[2]), verdict["gate"]["holdout_latent_rel_l1"])
    assert float(found[3]) == pytest.approx(100 * verdict["gate"]["compute_fraction"], abs=0.05)
    assert _close(float(found[4]), verdict["schedule"]["holdout_latent_rel_l1"])
    assert float(found[5]) == pytest.approx(100 * verdict["schedule"]["compute_fraction"], abs=0.05)
    assert found[6] == verdict["kept"]
    ids = _parse(page_text).ids
    assert ("schedule" in ids) == (verdict["kept"] == "schedule") and ("fit" in ids) == (verdict["kept"] == "gate")


# ---------------------------------------------------------------------------------------------------------------
# traces optional; nothing given; other formats
# ---------------------------------------------------------------------------------------------------------------
def test_files_without_traces_make_a_report(made):
    out = _ok(made, "report", "--coeffs", "s.json", "--coeffs", "t.json", "--eval", "e.json", "--out", "nt.html")
    assert "wrote nt.html" in out
    parsed = _parse((made / "nt.html").read_text(encoding="utf-8"))
    assert {"summary", "inputs", "fit", "tuning", "schedule", "frontier"} <= set(parsed.ids)
    assert "curves" not in parsed.ids  # the per-step curves need traces
    assert "No traces given" in " ".join(parsed.paragraphs["summary"])
    for section in ("fit", "schedule", "frontier"):
        for src in parsed.images[section]:
            _decode(src)
    doc = json.loads((made / "t.json").read_text())
    tuning = _records(parsed.tables["tuning"][0])
    assert any(_number(r["threshold"]) == doc["thresholds"]["recommended"] for r in tuning)


def test_nothing_to_report_is_refused_in_one_line(made):
    code, out, err = run_cli(["report", "--out", "none.html"], made)
    assert code == 2 and not (made / "none.html").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "nothing to report" in lines[0], err


def test_a_results_file_of_another_format_never_plots_the_proxy_as_quality(made):
    rows = [{"threshold": t, "speedup": s, "error_proxy": e} for t, s, e in [(0.1, 1.3, 0.01), (0.3, 1.8, 0.05)]]
    (made / "other.json").write_text(json.dumps({"results": rows}), encoding="utf-8")
    _ok(made, "report", "--eval", "other.json", "--out", "other.html")
    page_text = (made / "other.html").read_text(encoding="utf-8")
    assert "No numeric speed and quality columns found to plot" in page_text
    assert "not calib eval's own results format" in " ".join(_parse(page_text).paragraphs["summary"])


def test_a_no_cache_file_is_said_in_the_summary(made):
    """Under a bar no gated skip of these 6-step traces keeps (the cheapest is predicted 0.034) the gate file
    recommends no cache; the summary says so and why, instead of a threshold."""
    _ok(made, "fit", "t.h5", *FAST_FIT, "--max-error", "0.01", "--no-plot", "--out", "t0.json")
    doc = json.loads((made / "t0.json").read_text())
    assert doc["recommendation"]["cache"] is False
    _ok(made, "report", "--coeffs", "t0.json", "--out", "t0.html")
    summary = " ".join(_parse((made / "t0.html").read_text(encoding="utf-8")).paragraphs["summary"])
    assert "Recommended: no cache." in summary and "no cache recommended" in summary
