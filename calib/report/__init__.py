"""Reports: the HTML report of a trace and its coefficient files (:mod:`.html`), the fit plot (:mod:`.plots`) and
the comparison of two coefficient files (:mod:`.compare`)."""

from .html import build_html, eval_rows, run_report  # noqa: F401
