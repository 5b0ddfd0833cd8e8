"""``calib export --format poly1d | json``: calib's own listings. poly1d is the coefficient list and threshold for
TeaCache-style scripts (``np.poly1d(coefficients)``); json is a validated copy of the document."""

from __future__ import annotations

import json

from ..errors import CalibError
from .base import Rendered
from .engines import refit_command


def poly1d_lines(doc: dict, threshold: float | None = None, source="the file") -> list[str]:
    if doc["method"] != "teacache":
        raise CalibError(f"{source}: --format poly1d exports TeaCache coefficients; this file is {doc['method']} "
                         "(use --format json, or diffusers-fastercache for a fastercache-cfg file)")
    normalization = (doc.get("indicator") or {}).get("normalization")
    if normalization not in (None, "none"):
        raise CalibError(
            f"{source}: these coefficients map changes normalized by {normalization!r}; a TeaCache-style script "
            f"applies the polynomial to the plain rel-L1 change — fit for it with: {refit_command(doc, 'poly1d')}"
        )
    lines = []
    for name, comp in doc["components"].items():
        chosen = threshold if threshold is not None else (doc.get("thresholds") or {}).get("recommended")
        label = "" if len(doc["components"]) == 1 else f"  # {name!r}"
        lines.append(f"coefficients = {[float(c) for c in comp['coefficients']]!r}{label}")
        lines.append("rescale_func = np.poly1d(coefficients)")
        if comp.get("domain"):
            lo, hi = comp["domain"]
            lines.append(f"# fitted on inputs in [{lo:.6g}, {hi:.6g}]; clamp to it: rescale_func(np.clip(x, {lo:.6g}, {hi:.6g}))")
        indicator = doc.get("indicator") or {}
        if indicator.get("name") in ("block_input", "temb"):
            lines.append(f"# x is the rel-L1 change of the first block's {indicator['name']} argument, not its modulated input")
        if chosen is not None:
            lines.append(f"rel_l1_thresh = {chosen!r}")
    return lines


def poly1d(doc, options) -> Rendered:
    return Rendered("\n".join(poly1d_lines(doc, options.threshold, options.source)) + "\n")


def document_copy(doc, options) -> Rendered:
    return Rendered(json.dumps(doc, indent=2) + "\n", document=doc)
