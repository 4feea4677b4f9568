"""The report as one self-contained HTML page (no network: styles, script and pictures are inline).

First screen: the headline answers per job group. Then the paper's tables in the paper's shape, the explorable
leaderboard (sort by clicking a column header; filter and group with the controls above it: plain inline
JavaScript), localization, intensity, mitigation, per-job pictures and the job list.
"""
from __future__ import annotations

import json
from html import escape

import pandas as pd

from reports.headline import Group
from reports.tables import METRICS, fmt, fmt_ci

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;padding:1.2em 2em;
  max-width:1350px;color:#222;line-height:1.4}
h1{margin:.2em 0 .1em}h2{margin-top:1.8em;border-bottom:2px solid #ddd;padding-bottom:.2em}
.lede{color:#555;margin:.2em 0 1em}
.groups{display:flex;flex-wrap:wrap;gap:1em}
.group{flex:1 1 560px;border:1px solid #ccd;border-radius:8px;padding:.6em 1em;background:#f8f9fc}
.group h3{margin:.2em 0}.group .job{font-size:.85em;color:#555}
.group ul{padding-left:1.2em;margin:.4em 0}.group li{margin:.35em 0}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 7px;vertical-align:top}th{background:#eef;text-align:left}
tr.failed td,tr.unfinished td{color:#a40000}tr.superseded td{color:#777}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.paper{color:#666;font-size:11px;display:block}.pos{color:#17692c}.neg{color:#a3261b}
.controls{display:flex;flex-wrap:wrap;gap:.6em;align-items:center;margin:.4em 0;font-size:13px}
#lb-table th{cursor:pointer;position:sticky;top:0}#lb-table th.sorted-asc:after{content:" \\25B2"}
#lb-table th.sorted-desc:after{content:" \\25BC"}
#lb-table tr.group td{background:#dde3f3;font-weight:600}
.scroll{max-height:600px;overflow:auto;border:1px solid #ddd}
img{max-width:100%;margin:6px 0}figure{margin:.5em 0}figcaption{font-size:13px;color:#444}
.pics{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
nav a{margin-right:1em}details{margin:.5em 0}
"""

# The leaderboard's controls: filters (one select per column in FILTERS), group-by, sort by header click.
SCRIPT = """
(function(){
  const data = JSON.parse(document.getElementById('lb-data').textContent);
  const cols = data.columns, rows = data.rows, filters = data.filters;
  const table = document.getElementById('lb-table'), count = document.getElementById('lb-count');
  const groupBy = document.getElementById('lb-group');
  let sortCol = null, sortDir = 1;
  const idx = Object.fromEntries(cols.map((c, i) => [c, i]));
  function cell(v, c){
    if (v === null) return '';
    if (typeof v === 'number' && !Number.isInteger(v)) return v.toFixed(3);
    return String(v);
  }
  function render(){
    const active = filters.map(f => [f, document.getElementById('lb-filter-' + f).value]).filter(x => x[1] !== '');
    let shown = rows.filter(r => active.every(([f, v]) => String(r[idx[f]]) === v));
    const g = groupBy.value;
    shown = shown.map((r, i) => [r, i]);
    shown.sort((a, b) => {
      if (g) { const ga = String(a[0][idx[g]]), gb = String(b[0][idx[g]]);
               if (ga !== gb) return data.order[g].indexOf(ga) - data.order[g].indexOf(gb); }
      if (sortCol !== null) { const x = a[0][idx[sortCol]], y = b[0][idx[sortCol]];
        if (x !== y) { if (x === null) return 1; if (y === null) return -1; return (x < y ? -1 : 1) * sortDir; } }
      return a[1] - b[1];
    });
    const head = '<thead><tr>' + cols.map(c => '<th data-col="' + c + '"' + (c === sortCol ? ' class="sorted-' +
      (sortDir > 0 ? 'asc' : 'desc') + '"' : '') + '>' + c + '</th>').join('') + '</tr></thead>';
    let body = '', last = null;
    for (const [r] of shown) {
      if (g && String(r[idx[g]]) !== last) { last = String(r[idx[g]]);
        body += '<tr class="group"><td colspan="' + cols.length + '">' + g + ': ' + last + '</td></tr>'; }
      body += '<tr class="row">' + cols.map(c => '<td' + (typeof r[idx[c]] === 'number' ? ' class="num"' : '') +
        '>' + cell(r[idx[c]], c) + '</td>').join('') + '</tr>';
    }
    table.innerHTML = head + '<tbody>' + body + '</tbody>';
    count.textContent = shown.length + ' of ' + rows.length + ' rows';
    table.querySelectorAll('th').forEach(th => th.addEventListener('click', () => {
      const c = th.dataset.col; sortDir = (c === sortCol) ? -sortDir : (typeof rows[0][idx[c]] === 'number' ? -1 : 1);
      sortCol = c; render(); }));
  }
  filters.forEach(f => document.getElementById('lb-filter-' + f).addEventListener('change', render));
  groupBy.addEventListener('change', render);
  render();
})();
"""

FILTERS = ["job", "level", "subset", "method", "layers", "T"]


def _table(frame: pd.DataFrame, numeric_digits: int = 3) -> str:
    """A plain table; floats right-aligned with fixed decimals, text escaped."""
    head = "".join(f"<th>{escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)):
                cells.append("<td></td>")
            elif isinstance(v, float):
                cells.append(f"<td class='num'>{fmt(v, numeric_digits)}</td>")
            else:
                cells.append(f"<td>{escape('' if v is None else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def jobs_html(job_list: pd.DataFrame) -> str:
    """The job list, each folder a link (relative to the page); a row not reported (failed, unfinished, superseded:
    its ``status``) has that status as its class."""
    rows = "".join(
        f"<tr class='{escape(str(row.get('status', '')))}'>"
        + "".join(f"<td><a href='{escape(str(v))}'>{escape(str(v))}</a></td>" if c == "folder"
                  else f"<td>{escape(str(v))}</td>" for c, v in row.items()) + "</tr>"
        for _, row in job_list.iterrows())
    head = "".join(f"<th>{escape(c)}</th>" for c in job_list.columns)
    return (f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            "<p>Folders are relative to this page.</p>")


def _img(data: str | None, alt: str, caption: str = "") -> str:
    if data is None:
        return ""
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f"<figure><img alt='{escape(alt)}' src='data:image/png;base64,{data}'>{cap}</figure>"


def headline_section(groups: list[Group], links: dict[str, str]) -> str:
    parts = ["<section id='answer'><div class='groups'>"]
    for group in groups:
        parts.append(f"<div class='group'><h3>{escape(group.name)}</h3>")
        for job in dict.fromkeys([f.job for f in group.findings] or [group.job.label]):
            parts.append(f"<div class='job'>from job <a href='{escape(links.get(job, ''))}'>{escape(job)}</a></div>")
        parts.append("<ul>" + "".join(f"<li>{escape(f.sentence)}</li>" for f in group.findings) + "</ul>")
        figures = [r for f in group.findings for r in f.rows]
        if figures:
            parts.append(_table(pd.DataFrame(figures)))
        if not group.findings:
            parts.append("<p>No headline figure: the job lacks the D / LD rows, localization or intensity.</p>")
        if group.others:
            parts.append(f"<div class='job'>{len(group.others)} more job(s) of this group are in the tables below."
                         "</div>")
        parts.append("</div>")
    parts.append("</div></section>")
    return "".join(parts)


def table1_html(long: pd.DataFrame, job: str) -> str:
    """One job's Table 1 in the paper's shape; each cell: ours [95% CI], then the paper's value and ours - paper."""
    part = long[long.job == job]
    kinds = [k for k in ("local", "global") if k in set(part.memorization_type)]
    head1 = "<tr><th rowspan='2'>method</th><th rowspan='2'>T</th>" + "".join(
        f"<th colspan='{len(METRICS)}'>{k}</th>" for k in kinds) + "</tr>"
    head2 = "<tr>" + "".join(f"<th>{escape(name)}</th>" for _ in kinds for name in METRICS.values()) + "</tr>"
    body = []
    for (method, layers, T), rows in part.groupby(["method", "layers", "T"], sort=False):
        cells = rows.set_index(["memorization_type", "metric"])
        tds = []
        for k in kinds:
            for m in METRICS:
                if (k, m) not in cells.index:
                    tds.append("<td></td>")
                    continue
                r = cells.loc[(k, m)]
                text = escape(fmt_ci(r.ours, r.ours_lo, r.ours_hi)) or "&ndash;"
                if pd.notna(r.published):
                    sign = "" if pd.isna(r.difference) else (
                        f" (<span class='{'pos' if r.difference >= 0 else 'neg'}'>{r.difference:+.3f}</span>)")
                    text += f"<span class='paper'>paper {r.published:.3f}{sign}</span>"
                tds.append(f"<td class='num'>{text}</td>")
        label = escape(method + (f" [{layers}]" if layers else ""))
        body.append(f"<tr><td>{label}</td><td class='num'>{T}</td>{''.join(tds)}</tr>")
    return f"<table><thead>{head1}{head2}</thead><tbody>{''.join(body)}</tbody></table>"


def leaderboard_html(board: pd.DataFrame) -> str:
    columns = ["job", "level", "subset", "method", "layers", "T"] + [
        c for m in METRICS for c in (m, f"{m}_lo", f"{m}_hi") if c in board] + [
        c for c in ("n_pos", "n_neg") if c in board]
    frame = board[columns]
    rows = [[None if pd.isna(v) else (v.item() if hasattr(v, "item") else v) for v in row]
            for row in frame.itertuples(index=False)]
    order = {c: list(dict.fromkeys(str(v) for v in frame[c])) for c in FILTERS}
    payload = json.dumps({"columns": columns, "rows": rows, "filters": FILTERS, "order": order})
    payload = payload.replace("</", "<\\/")
    selects = []
    for f in FILTERS:
        options = "".join(f"<option value='{escape(v)}'{' selected' if (f, v) == ('level', 'prompt') else ''}>"
                          f"{escape(v)}</option>" for v in order[f])
        selects.append(f"<label>{f} <select id='lb-filter-{f}'><option value=''>(any)</option>{options}</select>"
                       "</label>")
    group = ("<label>group by <select id='lb-group'>" + "".join(
        f"<option value='{c}'{' selected' if c == 'job' else ''}>{c}</option>" for c in ["job", "method", "subset"])
             + "<option value=''>(none)</option></select></label>")
    return (f"<div class='controls'>{''.join(selects)}{group}<span id='lb-count'></span></div>"
            f"<div class='scroll'><table id='lb-table'></table></div>"
            f"<script type='application/json' id='lb-data'>{payload}</script><script>{SCRIPT}</script>")


def page(sections: list[tuple[str, str, str]], lede: str) -> str:
    """``sections``: (anchor, title, inner HTML); the first is the answer, shown without a heading rule."""
    nav = "".join(f"<a href='#{a}'>{escape(t)}</a>" for a, t, _ in sections[1:])
    body = [f"<h1>be-bench report</h1><p class='lede'>{lede}</p>", sections[0][2], f"<nav>{nav}</nav>"]
    body += [f"<section id='{a}'><h2>{escape(t)}</h2>{html}</section>" for a, t, html in sections[1:]]
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>be-bench report</title>"
            "<link rel='icon' href='data:,'>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
