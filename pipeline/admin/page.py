"""The status page at ``/``: one HTML document, written here, with its style and script inline.

The document holds no data and is served without the token. Its script asks for the token once
(a password field; kept in the tab's ``sessionStorage``, never in a URL, a cookie or a form
submission) and every 5 s reads /status, /studies and /failures with it in the Authorization
header, filling the page in: the numbers of /status (each in an element whose
``data-metric`` names its path in /status, e.g. ``instances.embedded``, and whose
``data-value`` holds the value as JSON), the open associations, the workers, the recent studies
with their progress, the latest failures and a chart of images embedded per minute over the
last hour (inline SVG). A refused token clears it and asks again.

No build step and nothing from elsewhere: the Content-Security-Policy allows only this
document's own script and style (by their hashes) and requests to this origin.
"""

from __future__ import annotations

import base64
import hashlib
import html

from pipeline.admin.api import Text

#: The numbers of /status the page shows, by section: (title, path prefix, fields). Counters,
#: pushes and the tables are drawn from what /status holds.
SECTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "Instances",
        "instances",
        ("received", "spooled", "converting", "queued", "embedded", "skipped", "failed"),
    ),
    ("Embed queue", "queues.embed", ("queued", "started", "scheduled", "failed", "finished")),
    ("Push queue", "queues.push", ("queued", "started", "scheduled", "failed", "finished")),
    (
        "Endpoint",
        "endpoint",
        (
            "requests",
            "errors",
            "error_rate",
            "retries",
            "latency_seconds.mean",
            "latency_seconds.p50",
            "latency_seconds.p95",
            "in_flight",
            "in_flight_limit",
            "images_per_second",
        ),
    ),
    ("Sinks", "sinks", ("pending", "dead_lettered")),
    ("Spool", "spool", ("quarantined", "free_bytes")),
    ("Processes", "", ("workers.length", "associations.length", "uptime_seconds")),
)

#: How often the page reads the API again.
REFRESH_SECONDS = 5

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f4f5f7}
header{background:#1d2330;color:#fff;padding:.6em 1em;display:flex;gap:1em;align-items:center}
header h1{font-size:1.1em;margin:0;flex:1}
main{padding:1em;display:grid;gap:1em;grid-template-columns:repeat(auto-fill,minmax(16em,1fr))}
section{background:#fff;border-radius:6px;padding:.6em .9em;box-shadow:0 1px 2px #0002}
section.wide{grid-column:1/-1;overflow-x:auto}
h2{font-size:1em;margin:.2em 0 .5em}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.15em .4em;border-bottom:1px solid #eceef1;white-space:nowrap}
td[data-metric]{text-align:right;font-variant-numeric:tabular-nums}
#login{max-width:24em;margin:3em auto}
#login input{width:100%;box-sizing:border-box;padding:.4em;margin:.4em 0}
#error,#refused{color:#b00020}
svg{max-width:100%;height:auto}
svg rect{fill:#3b6fd8}
svg text{font-size:10px;fill:#555}
"""

SCRIPT = """
"use strict";
const KEY = "pacs-embed-admin-token";
const $ = (id) => document.getElementById(id);
let timer = null;

function token() { return sessionStorage.getItem(KEY); }

async function api(path) {
  const response = await fetch(path, {
    headers: {Authorization: "Bearer " + token()},
    cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
  });
  if (response.status === 401) throw new Error("unauthorized");
  if (!response.ok) throw new Error("HTTP " + response.status);
  return response.json();
}

function pick(doc, path) {
  let value = doc;
  for (const part of path.split(".")) {
    if (value === null || value === undefined) return null;
    value = value[part];
  }
  return value === undefined ? null : value;
}

function format(value) {
  if (value === null) return "\\u2013";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
  return String(value);
}

function cell(tag, text) {
  const el = document.createElement(tag);
  el.textContent = text;
  return el;
}

function fill(body, items, columns) {
  body.replaceChildren(...items.map((item) => {
    const tr = document.createElement("tr");
    for (const column of columns) tr.append(cell("td", format(column(item))));
    return tr;
  }));
}

function counters(doc) {
  const body = $("counters");
  body.replaceChildren(...Object.keys(doc.counters || {}).map((name) => {
    const tr = document.createElement("tr");
    const td = cell("td", "");
    td.dataset.metric = "counters." + name;
    tr.append(cell("th", name), td);
    return tr;
  }));
}

function pushes(doc) {
  const rows = [];
  for (const [sink, outcomes] of Object.entries(doc.sinks.pushes || {})) {
    for (const outcome of Object.keys(outcomes)) rows.push([sink, outcome]);
  }
  $("pushes").replaceChildren(...rows.map(([sink, outcome]) => {
    const tr = document.createElement("tr");
    const td = cell("td", "");
    td.dataset.metric = "sinks.pushes." + sink + "." + outcome;
    tr.append(cell("th", sink + " " + outcome), td);
    return tr;
  }));
}

function chart(throughput) {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  const counts = throughput.images;
  const top = Math.max(1, ...counts);
  const width = 600 / counts.length;
  const shapes = counts.map((n, i) => {
    const bar = document.createElementNS(ns, "rect");
    const h = Math.round(100 * n / top);
    bar.setAttribute("x", String(i * width));
    bar.setAttribute("y", String(105 - h));
    bar.setAttribute("width", String(Math.max(1, width - 1)));
    bar.setAttribute("height", String(h));
    bar.dataset.minute = String(i);
    bar.dataset.value = String(n);
    const title = document.createElementNS(ns, "title");
    title.textContent = n + " images, " + (counts.length - 1 - i) + " min ago";
    bar.append(title);
    return bar;
  });
  const label = (x, anchor, text) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", String(x));
    t.setAttribute("y", "118");
    t.setAttribute("text-anchor", anchor);
    t.textContent = text;
    return t;
  };
  shapes.push(label(0, "start", "60 min ago"), label(600, "end", "now"),
              label(300, "middle", "peak " + top + " images/min"));
  svg.replaceChildren(...shapes);
}

function render(doc, studies, failures) {
  counters(doc);
  pushes(doc);
  for (const el of document.querySelectorAll("[data-metric]")) {
    const value = pick(doc, el.dataset.metric);
    el.dataset.value = JSON.stringify(value);
    el.textContent = format(value);
  }
  $("version").textContent = "version " + doc.version;
  fill($("associations"), doc.associations, [
    (a) => a.calling_ae, (a) => a.address, (a) => new Date(a.since * 1000).toISOString(),
    (a) => a.instances]);
  fill($("workers"), doc.workers, [
    (w) => w.host, (w) => w.pid, (w) => w.state, (w) => w.jobs.join(", ")]);
  fill($("studies"), studies.studies, [
    (s) => s.study_instance_uid, (s) => s.state, (s) => s.version, (s) => s.received,
    (s) => s.final, (s) => s.received ? Math.round(100 * s.final / s.received) + "%" : "",
    (s) => Object.entries(s.pushed).map(([k, v]) => k + " v" + v).join(", ")]);
  fill($("failures"), failures.failures, [
    (f) => f.sop_instance_uid, (f) => f.stage, (f) => f.reason, (f) => f.at]);
  $("failures-total").textContent = String(failures.total);
  chart(doc.throughput);
  $("refreshed").textContent = "refreshed " + new Date().toLocaleTimeString();
}

function showLogin(message) {
  clearTimeout(timer);
  document.body.dataset.state = "login";
  $("data").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("refused").textContent = message;
}

async function refresh() {
  clearTimeout(timer);
  if (!token()) { showLogin(""); return; }
  $("login").hidden = true;
  $("logout").hidden = false;
  try {
    const [doc, studies, failures] = await Promise.all(
      [api("/status"), api("/studies?limit=20"), api("/failures?limit=20")]);
    render(doc, studies, failures);
    $("data").hidden = false;
    $("error").textContent = "";
    document.body.dataset.state = "ready";
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (err) {
    if (err.message === "unauthorized") {
      sessionStorage.removeItem(KEY);
      showLogin("That token was refused.");
      return;
    }
    $("error").textContent = "The admin endpoint did not answer (" + err.message + ").";
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const field = $("token");
  sessionStorage.setItem(KEY, field.value.trim());
  field.value = "";
  refresh();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  showLogin("");
});
refresh();
"""


def _metric_table(title: str, prefix: str, fields: tuple[str, ...]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(field.removesuffix('.length').replace('_', ' '))}</th>"
        f'<td data-metric="{html.escape(path)}"></td></tr>'
        for field in fields
        for path in [f"{prefix}.{field}" if prefix else field]
    )
    return f"<section><h2>{html.escape(title)}</h2><table>{rows}</table></section>"


def _table(title: str, body_id: str, columns: tuple[str, ...], extra: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return (
        f'<section class="wide"><h2>{html.escape(title)}{extra}</h2><table>'
        f'<thead><tr>{head}</tr></thead><tbody id="{body_id}"></tbody></table></section>'
    )


def _document() -> tuple[bytes, str]:
    script = SCRIPT.replace("REFRESH_MS", str(REFRESH_SECONDS * 1000))
    metrics = "".join(_metric_table(*section) for section in SECTIONS)
    tables = "".join(
        (
            _table(
                "Open associations", "associations", ("calling AE", "address", "since", "instances")
            ),
            _table("Workers", "workers", ("host", "pid", "state", "jobs running")),
            _table(
                "Recent studies",
                "studies",
                ("study", "state", "version", "received", "final", "progress", "pushed"),
            ),
            _table(
                "Latest failures",
                "failures",
                ("SOP Instance UID", "stage", "reason", "at"),
                ' (<span id="failures-total"></span> failed)',
            ),
        )
    )
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>pacs-embed status</title>
<style>{STYLE}</style></head>
<body data-state="login">
<header><h1>pacs-embed</h1><span id="version"></span><span id="refreshed"></span>
<button id="logout" type="button" hidden>Log out</button></header>
<form id="login" autocomplete="off"><h2>Admin token</h2>
<input id="token" type="password" autocomplete="off" required aria-label="admin token">
<button type="submit">Show status</button><p id="refused"></p></form>
<noscript>This page needs JavaScript; the same numbers are at /status.</noscript>
<p id="error"></p>
<div id="data" hidden><main>{metrics}
<section><h2>Counters</h2><table id="counters"></table></section>
<section><h2>Pushes</h2><table id="pushes"></table></section>
<section class="wide"><h2>Images embedded per minute, last hour</h2>
<svg id="chart" viewBox="0 0 600 120" width="600" height="120" role="img"
 aria-label="images embedded per minute over the last hour"></svg></section>
{tables}</main></div>
<script>{script}</script>
</body></html>
"""
    policy = "; ".join(
        (
            "default-src 'none'",
            f"script-src '{_hash(script)}'",
            f"style-src '{_hash(STYLE)}'",
            "connect-src 'self'",
            "img-src data:",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        )
    )
    return body.encode(), policy


def _hash(source: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()


_BODY, _POLICY = _document()

HEADERS = {
    "Content-Security-Policy": _POLICY,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def shell() -> Text:
    """The page: the same bytes for everyone, with its security headers."""
    return Text(_BODY, "text/html; charset=utf-8", HEADERS)
