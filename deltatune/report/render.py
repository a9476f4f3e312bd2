"""The method-comparison report as files: report.md (the table, the findings and the
recommendation, with the PNG figures next to it), report.html (the same content in one
self-contained file) and report.json (the numbers, for scripts).

Why HTML with base64-embedded PNGs and no JavaScript: the report must open offline, from a
file, years later, on a machine without network access or a server — so nothing may come from
a CDN and nothing may need a script to draw. matplotlib (already a dependency, used for every
other deltatune plot) renders the figures once; the HTML embeds exactly the bytes of the PNG
files the Markdown links, so both reports show the same figures, and any browser, e-mail client
or HTML-to-PDF tool displays them. Inline SVG would work as well but grows with the number of
points and depends on the viewer's fonts; a PNG looks the same everywhere."""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from deltatune.errors import ConfigError
from deltatune.fileio import write_json, write_text
from deltatune.report.comparison import (Comparison, ReportOptions, Row, compare_runs,
                                         format_bytes, format_count, format_metric,
                                         format_seconds)
from deltatune.report.plots import Figure, write_figures
from deltatune.report.runs import RunCollection, collect_runs

MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
JSON_FILE = "report.json"


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    json: Path
    figures: list[Path]
    comparison: Comparison


def build_report(sources: Iterable[str | Path], out: str | Path,
                 options: ReportOptions | None = None) -> ReportFiles:
    """Reads the finished runs in `sources` and writes the report files into `out`."""
    out = Path(out)
    for folder in [out, *out.parents]:
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {out}: {folder} is a file, not a folder; choose another "
                              "--out")
    collection = collect_runs(list(sources))
    return write_report(collection, out, options or ReportOptions())


def write_report(collection: RunCollection, out: Path, options: ReportOptions) -> ReportFiles:
    comparison = compare_runs(collection.runs, options,
                              [str(path) for path in collection.unfinished])
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(comparison, out)
    context = _context(collection, comparison)
    write_text(out / MARKDOWN_FILE, render_markdown(comparison, figures, context))
    write_text(out / HTML_FILE, render_html(comparison, figures, context))
    write_json(out / JSON_FILE, report_data(comparison, context))
    return ReportFiles(out / MARKDOWN_FILE, out / HTML_FILE, out / JSON_FILE,
                       [f.path for f in figures], comparison)


# -- content shared by both formats ----------------------------------------------------------

HEADERS = ("variant", "method", "lr", "{metric}", "before training", "forgetting",
           "trainable params", "trainable %", "peak memory", "wall time", "tokens/s",
           "bytes on disk", "Pareto")


def table_cells(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    headers = [h.format(metric=comparison.metric) for h in HEADERS]
    if comparison.options.memory_budget_bytes is not None:
        headers.append(f"fits {format_bytes(comparison.options.memory_budget_bytes)}")
    rows = [[_cell(row, h) for h in HEADERS] + _fit_cell(row, comparison)
            for row in comparison.rows]
    return headers, rows


def _cell(row: Row, header: str) -> str:
    run = row.run
    values = {
        "variant": row.name, "method": run.method,
        "lr": format_rate(run.learning_rate),
        "{metric}": format_metric(row.metric), "before training": format_metric(row.baseline),
        "forgetting": "; ".join(row.forgetting) or "not measured",
        "trainable params": format_count(run.number("trainable_parameters")),
        "trainable %": _percent(run.number("trainable_percent")),
        "peak memory": format_bytes(run.number("peak_memory_bytes")),
        "wall time": format_seconds(run.number("train_wall_seconds")),
        "tokens/s": f"{run.number('train_tokens_per_second') or 0:,.0f}",
        "bytes on disk": format_bytes(run.number("adapter_bytes")),
        "Pareto": "yes" if row.pareto else "",
    }
    return values[header]


def format_rate(value: float | None) -> str:
    """1e-3, 5e-5, 0.01 (no zero-padded exponents)."""
    if value is None:
        return "-"
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2),
                  f"{value:g}")


def _fit_cell(row: Row, comparison: Comparison) -> list[str]:
    if comparison.options.memory_budget_bytes is None:
        return []
    return ["yes" if row.fits else "no"]


def _percent(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} %" if value < 10 else f"{value:.1f} %"


def _context(collection: RunCollection, comparison: Comparison) -> dict[str, Any]:
    """What the runs share (model, task, data, seed, loop settings) and where they ran."""
    first = comparison.rows[0].run
    data = first.summary.get("data") or {}
    train = first.config.get("train") or {}
    models = sorted({str(r.run.summary.get("model")) for r in comparison.rows})
    trained_on = sorted({str((r.run.summary.get("data") or {}).get("train_source"))
                         for r in comparison.rows})
    return {
        "models": models, "task": first.summary.get("task"), "train_sources": trained_on,
        "train_examples": data.get("train_examples"), "eval_examples": data.get("eval_examples"),
        "eval_source": data.get("eval_source"), "max_length": data.get("max_length"),
        "seed": first.config.get("seed"), "epochs": train.get("epochs"),
        "max_steps": train.get("max_steps"), "batch_size": train.get("batch_size"),
        "steps": first.summary.get("steps"), "machine": collection.machine,
        "finished_at": max(str(r.run.summary.get("finished_at")) for r in comparison.rows),
    }


def _setting_lines(context: dict[str, Any]) -> list[str]:
    lines = [f"Model: {', '.join(context['models'])}; task: {context['task']}.",
             f"Training data: {', '.join(context['train_sources'])} "
             f"({context['train_examples']} examples); evaluation: {context['eval_source']} "
             f"({context['eval_examples']} examples); max length {context['max_length']}.",
             f"Loop: seed {context['seed']}, "
             + (f"{context['max_steps']} steps" if context["max_steps"]
                else f"{context['epochs']} epoch(s)")
             + f", batch size {context['batch_size']}; runs finished by "
               f"{context['finished_at']}."]
    if len(context["models"]) > 1 or len(context["train_sources"]) > 1:
        lines.append("**Warning**: these runs did not all train the same model on the same "
                     "data; the comparison is not like for like.")
    if context["machine"]:
        lines.append(f"Measured on: {context['machine']}.")
    return lines


def _framework_lines(comparison: Comparison) -> list[str]:
    framework = comparison.framework
    if framework is None:
        return [f"Framework: {comparison.framework_note}."]
    lines = [f"Framework (`deltatune.plan.framework`, {comparison.framework_note}): "
             f"**{framework.method or 'nothing fits'}** — {framework.reason}."]
    lines.append(f"Its order for this model size: {' > '.join(framework.preference)}.")
    return lines


def _notes(comparison: Comparison) -> list[str]:
    notes = ["Peak memory is the training process's peak (resident set size on CPU, allocated "
             "CUDA memory on GPU) as summary.json records it; bytes on disk is the saved "
             "adapter folder (the whole model for full fine-tuning)."]
    if comparison.unfinished:
        notes.append(f"Not finished, left out: {', '.join(comparison.unfinished)}.")
    return notes


def report_data(comparison: Comparison, context: dict[str, Any]) -> dict[str, Any]:
    framework = comparison.framework
    return {
        "metric": comparison.metric, "higher_is_better": comparison.higher_is_better,
        "settings": context,
        "memory_budget_bytes": comparison.options.memory_budget_bytes,
        "tolerance": comparison.options.tolerance,
        "rows": [{"name": r.name, "run": str(r.run.path), "method": r.run.method,
                  "learning_rate": r.run.learning_rate, "metric": r.metric,
                  "baseline": r.baseline, "forgetting": r.forgetting, "fits": r.fits,
                  "pareto": r.pareto,
                  **{k: r.run.summary.get(k) for k in (
                      "trainable_parameters", "trainable_percent", "total_parameters",
                      "peak_memory_bytes", "train_wall_seconds", "train_tokens_per_second",
                      "adapter_bytes", "steps")}} for r in comparison.rows],
        "pareto_fronts": comparison.fronts,
        "framework": None if framework is None else {
            "method": framework.method, "reason": framework.reason,
            "preference": framework.preference, "ruled_out": framework.ruled_out},
        "framework_note": comparison.framework_note,
        "findings": comparison.findings, "recommendation": comparison.recommendation,
        "unfinished": comparison.unfinished,
    }


# -- Markdown ----------------------------------------------------------------------------------

def render_markdown(comparison: Comparison, figures: list[Figure],
                    context: dict[str, Any]) -> str:
    headers, rows = table_cells(comparison)
    lines = [f"# {comparison.options.title}", "", *_setting_lines(context), "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    lines += ["", "## Recommendation", "", comparison.recommendation, "",
              *[f"- {line}" for line in _framework_lines(comparison) + comparison.findings], "",
              "## Figures", ""]
    for figure in figures:
        lines += [f"![{figure.title}]({figure.path.name})", ""]
    lines += ["## Notes", "", *[f"- {note}" for note in _notes(comparison)], ""]
    return "\n".join(lines)


# -- HTML --------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.5rem; text-align: right; }
td { white-space: nowrap; } td:nth-child(6) { white-space: normal; }
th { background: #f2f2f2; } td:first-child, td:nth-child(2), td:nth-child(6) { text-align: left; }
tr.pareto td:first-child { font-weight: 600; }
.verdict { background: #eef6ee; border-left: 4px solid #3a8a3a; padding: 0.6rem 1rem; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; }
figure.plot { margin: 0; } figure.plot img { display: block; width: 560px; max-width: 100%; }
"""


def render_html(comparison: Comparison, figures: list[Figure], context: dict[str, Any]) -> str:
    headers, rows = table_cells(comparison)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "\n".join(
        ('<tr class="pareto">' if row.pareto else "<tr>")
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>"
        for row, cells in zip(comparison.rows, rows))
    plots = "\n".join(_figure_html(figure) for figure in figures)
    items = "".join(f"<li>{_inline(line)}</li>"
                    for line in _framework_lines(comparison) + comparison.findings)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(comparison.options.title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(comparison.options.title)}</h1>
{''.join(f'<p>{_inline(line)}</p>' for line in _setting_lines(context))}
<table id="comparison">
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
<h2>Recommendation</h2>
<p class="verdict">{_inline(comparison.recommendation)}</p>
<ul>{items}</ul>
<h2>Figures</h2>
<div class="plots">
{plots}
</div>
<h2>Notes</h2>
<ul>{''.join(f'<li>{_inline(note)}</li>' for note in _notes(comparison))}</ul>
</body>
</html>
"""


def _figure_html(figure: Figure) -> str:
    encoded = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    title = html.escape(figure.title)
    return (f'<figure class="plot" id="{figure.key}"><img alt="{title}" '
            f'src="data:image/png;base64,{encoded}"></figure>')


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` in a line, as HTML; everything else escaped."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)
