"""Report -> one self-contained HTML file (CSS inline, plots embedded as base64 PNG)."""
from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path

from ..finding import Finding, Report, Status

COLORS = {"pass": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e", "skip": "#6e7781", "error": "#8250df"}
CSS = """
body{font:15px/1.5 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;margin:0} .sub{color:#59636e;margin-bottom:16px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600;font-size:12px;text-transform:uppercase;min-width:38px;text-align:center}
.counts span{margin-right:10px} table{border-collapse:collapse;width:100%;background:#fff}
td,th{border-bottom:1px solid #d1d9e0;padding:6px 10px;text-align:left;vertical-align:top} th{background:#f0f3f6}
section{background:#fff;border:1px solid #d1d9e0;border-radius:8px;padding:16px 20px;margin:18px 0}
section header{display:flex;gap:12px;align-items:center;margin-bottom:8px}
.where{background:#ffebe9;border-left:4px solid #cf222e;padding:8px 12px;margin:10px 0}
.where code{font-size:13px}
.hint{background:#fff8c5;border-left:4px solid #d4a72c;padding:8px 12px;margin:10px 0}
.metrics{font:13px/1.4 ui-monospace,Menlo,monospace;width:auto} .metrics td{padding:2px 12px 2px 0;border:none}
img{max-width:100%;border:1px solid #d1d9e0;border-radius:4px;margin:8px 0;display:block}
.assume{color:#59636e;font-size:13px} a{color:#0969da;text-decoration:none}
"""


def _badge(status: Status) -> str:
    return f'<span class="badge" style="background:{COLORS[status.value]}">{status.value}</span>'


def _img(path) -> str:
    p = Path(path)
    if not p.is_file():
        return ""
    data = base64.b64encode(p.read_bytes()).decode()
    return f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">'


def _metrics(f: Finding) -> str:
    rows = []
    for k, v in f.metrics.items():
        val = f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))
        rows.append(f"<tr><td>{html.escape(k)}</td><td>{val}</td></tr>")
    return f'<table class="metrics">{"".join(rows)}</table>' if rows else ""


def _extras(f: Finding) -> str:
    out = []
    if f.artifacts.get("examples"):
        rows = "".join(f"<tr><td>{html.escape(r)}</td><td>{html.escape(h)}</td></tr>" for r, h in f.artifacts["examples"])
        out.append(f"<table><tr><th>reference</th><th>greedy decoding after overfit</th></tr>{rows}</table>")
    if f.artifacts.get("image_share_per_word"):
        rows = "".join(f"<tr><td>{html.escape(w)}</td><td>{s:.0%}</td></tr>" for w, s in f.artifacts["image_share_per_word"])
        out.append(f"<table><tr><th>generated word</th><th>image share of attribution</th></tr>{rows}</table>")
    if f.artifacts.get("captions"):  # caption_collapse: what the trained model says about the user's images
        rows = "".join(f"<tr><td>{html.escape(g)}</td><td>{html.escape(r)}</td></tr>" for g, r in f.artifacts["captions"])
        out.append(f"<table><tr><th>generated caption</th><th>references (first two)</th></tr>{rows}</table>")
    if f.artifacts.get("word_rise"):  # word_grounding: the most and the least image-dependent words
        ranked = f.artifacts["word_rise"]
        shown = ranked if len(ranked) <= 12 else ranked[:8] + ranked[-4:]
        rows = "".join(f"<tr><td>{html.escape(str(w))}</td><td>{round(r, 2) + 0.0:+.2f}</td><td>{c}</td></tr>" for w, r, c in shown)
        out.append(f"<table><tr><th>word</th><th>loss rise with another image (nats)</th><th>occurrences</th></tr>"
                   f"{rows}</table>")
    for k, v in f.artifacts.items():
        if k.endswith("_png"):
            out.append(_img(v))
    return "".join(out)


def render_html(report: Report, title: str = "capdiag report") -> str:
    counts = report.counts()
    count_html = "".join(f'<span>{_badge(Status(s))} {n}</span>' for s, n in counts.items() if n)
    summary_rows = "".join(
        f'<tr><td><a href="#{f.check}">{f.check}</a></td><td>{_badge(f.status)}</td>'
        f"<td>{html.escape(f.summary)}</td><td>{f.metrics.get('seconds', 0):.1f}s</td></tr>"
        for f in report.findings
    )
    sections = []
    for f in report.findings:
        hint = f'<div class="hint"><b>Likely cause and fix.</b> {html.escape(f.hint)}</div>' if f.hint and f.status is not Status.PASS else ""
        if f.location is not None:
            hint = (f'<div class="where"><b>Where it starts.</b> <code>{html.escape(f.location.where())}</code>'
                    f"<br>{html.escape(f.location.said())}</div>") + hint
        sections.append(
            f'<section id="{f.check}"><header>{_badge(f.status)}<h2>{f.check}</h2></header>'
            f"<p>{html.escape(f.summary)}</p>{hint}{_metrics(f)}{_extras(f)}</section>"
        )
    assumptions = "".join(f"<li>{html.escape(a)}</li>" for a in report.assumptions)
    assume_html = f'<div class="assume">Assumed ({html.escape(report.how_to_change)} to change):<ul>{assumptions}</ul></div>' if assumptions else ""
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    # What was judged: the device and precision, the checkpoint loaded, the data the batches came from.
    facts = [f"on {report.device}" if report.device else "", report.precision,
             f"weights {report.weights}" if report.weights else "", f"data: {report.data}" if report.data else ""]
    when = " &middot; ".join([when] + [html.escape(x) for x in facts if x])
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head>"
        f"<body><main><h1>capdiag: {html.escape(report.model_name)}</h1>"
        f'<div class="sub">{when} &middot; {len(report.findings)} checks</div><div class="counts">{count_html}</div>'
        f"{assume_html}<h2 style='margin-top:18px'>Summary</h2><table><tr><th>check</th><th>status</th><th>finding</th>"
        f"<th>time</th></tr>{summary_rows}</table>{''.join(sections)}</main></body></html>"
    )


def write_html(report: Report, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(render_html(report), encoding="utf-8")
    return path
