"""Rendering measure results: JSON (with provenance), CSV, Markdown and LaTeX tables.

One column per embedding set, one row per metric, so that several sets give the before/after
table of a paper. With bootstrap intervals, tables show ``value ± h`` where ``h`` is half the
width of the 95 % percentile interval; JSON and CSV carry the interval's ends exactly.
Pure functions returning strings; the CLI prints them (the rich terminal table lives in
``gapkit.commands.measure``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Sequence

from .metrics import MeasureResult

FORMATS = ("table", "json", "csv", "markdown", "latex")

#: how many decimals each metric gets in tables (default 4)
DECIMALS = {"angle_true_pairs": 2}


def metric_rows(results: Sequence[MeasureResult]) -> list[str]:
    """The metric names present in any of ``results``, in the order measured."""
    names: dict[str, None] = {}
    for r in results:
        names.update({k: None for k in r.values})
    return list(names)


def format_value(result: MeasureResult, metric: str) -> str:
    """``0.8213`` or ``0.8213 ± 0.0061`` (half-width of the 95 % interval); ``–`` if absent."""
    if metric not in result.values:
        return "–"
    v = result.values[metric]
    if v is None or not math.isfinite(v):
        return "n/a"
    nd = DECIMALS.get(metric, 4)
    text = f"{v:.{nd}f}"
    if metric in result.ci:
        lo, hi = result.ci[metric]
        text += f" ± {(hi - lo) / 2:.{nd}f}"
    return text


def to_json(results: Sequence[MeasureResult], provenance: dict[str, Any] | None = None) -> str:
    """JSON: ``{"gapkit_version", ..., "sets": [{name, input, counts, dims, encoders, metrics, ci95, notes}]}``.

    ``provenance`` adds top-level fields and, under ``"inputs"``, one dict per set that is merged
    into that set's entry (input path, dtype, encoders from info.json, ...).
    """
    from . import __version__

    prov = dict(provenance or {})
    inputs = prov.pop("inputs", [{} for _ in results])
    doc: dict[str, Any] = {"gapkit_version": __version__}
    doc.update(prov)
    sets = []
    for r, extra in zip(results, inputs):
        entry = r.to_dict()
        entry.update({k: v for k, v in extra.items() if k not in entry or k == "name"})
        sets.append(entry)
    doc["sets"] = sets
    return json.dumps(doc, indent=2, allow_nan=False, default=str)


def to_csv(results: Sequence[MeasureResult], names: Sequence[str]) -> str:
    """CSV, one row per metric: ``metric,<set>,<set>_ci_low,<set>_ci_high,...`` (ci columns only
    when bootstrapped). Full precision."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    with_ci = any(r.ci for r in results)
    head = ["metric"]
    for n in names:
        head += [n] + ([f"{n}_ci_low", f"{n}_ci_high"] if with_ci else [])
    w.writerow(head)
    for m in metric_rows(results):
        row: list[Any] = [m]
        for r in results:
            v = r.values.get(m)
            row.append("" if v is None or not math.isfinite(v) else repr(float(v)))
            if with_ci:
                lo, hi = r.ci.get(m, (None, None))
                row += ["" if lo is None else repr(lo), "" if hi is None else repr(hi)]
        w.writerow(row)
    return buf.getvalue()


def to_markdown(results: Sequence[MeasureResult], names: Sequence[str]) -> str:
    """A GitHub Markdown table: metric rows, one column per set."""
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for m in metric_rows(results):
        lines.append(f"| {m} | " + " | ".join(format_value(r, m) for r in results) + " |")
    notes = _notes(results, names)
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"_": r"\_", "&": r"\&", "%": r"\%", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters in ``text``."""
    return "".join(_LATEX_ESCAPES.get(c, c) for c in str(text))


def to_latex(results: Sequence[MeasureResult], names: Sequence[str]) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); ``±`` as ``$\\pm$``."""
    cols = "l" + "r" * len(names)
    lines = [
        f"\\begin{{tabular}}{{{cols}}}",
        "\\toprule",
        "metric & " + " & ".join(latex_escape(n) for n in names) + " \\\\",
        "\\midrule",
    ]
    for m in metric_rows(results):
        cells = [format_value(r, m).replace("±", "$\\pm$").replace("–", "--") for r in results]
        lines.append(f"{latex_escape(m)} & " + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    notes = _notes(results, names)
    return "\n".join(lines + [f"% {n}" for n in notes]) + "\n"


def _notes(results: Sequence[MeasureResult], names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for r, n in zip(results, names):
        out += [f"{n}: {note}" for note in r.notes]
    return out


def render(
    results: Sequence[MeasureResult], names: Sequence[str], fmt: str, provenance: dict[str, Any] | None = None
) -> str:
    """Render in ``fmt`` (json, csv, markdown, latex)."""
    if fmt == "json":
        return to_json(results, provenance)
    if fmt == "csv":
        return to_csv(results, names)
    if fmt == "markdown":
        return to_markdown(results, names)
    if fmt == "latex":
        return to_latex(results, names)
    raise ValueError(f"unknown format {fmt!r}")
