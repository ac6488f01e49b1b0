"""The status page at `/`: workers, routes and the broker connection, refreshing itself.

The page is rendered here, on the server; its script fetches `/?fragment=1` every few seconds and
swaps the live part in, so there is one renderer (this module) and the page works without
JavaScript too (it then reloads itself through a `<noscript>` meta refresh). Every value is
HTML-escaped. `status_data` is also what `/status.json` returns.
"""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING, Any

from core.operations.charts import history_charts
from core.runtime.events import recent_dead_letters, recent_events

if TYPE_CHECKING:
    from core.foundation.config import Settings
    from core.operations.history import History
    from core.operations.metrics import SystemView


DEAD_LETTERS_SHOWN = 20
EVENTS_SHOWN = 30


def status_data(view: "SystemView", readiness: dict[str, Any], settings: "Settings",
                history: "History | None" = None) -> dict[str, Any]:
    """Plain data for the page and for /status.json."""
    sample = view.sample
    processes = []
    for info, cumulative, rate in view.processes:
        stats = info.stats or {}
        processes.append({
            "id": info.id, "role": info.role, "pid": info.pid, "state": info.state, "ready": info.ready,
            "connected": info.connected, "restarts": info.restarts, "recycles": info.recycles,
            "rss_bytes": info.rss_bytes, "cpu_percent": round(info.cpu_percent, 1), "rate": round(rate, 2),
            "received": int(cumulative.get("received", 0)), "handled": int(cumulative.get("handled", 0)),
            "failed": int(cumulative.get("failed", 0)), "dead_lettered": int(cumulative.get("dead_lettered", 0)),
            "reconnects": int(cumulative.get("reconnects", 0)), "inflight": int(stats.get("inflight", 0)),
            "heartbeat_age": info.heartbeat_age, "heartbeat_late": info.heartbeat_late,
        })
    routes = [{
        "pattern": r.pattern, "rate": round(r.rate, 2), "error_rate": round(r.error_rate, 2), "received": r.received,
        "handled": r.handled, "failed": r.failed, "dead_lettered": r.dead_lettered,
        "rate_limited": sum(r.rate_limited.values()), "avg_ms": round(r.average_ms, 3),
        "retried": r.retried, "held": r.held, "holding": r.holding, "breaker": r.breaker,
    } for r in view.routes]
    connected = [p for p in processes if p["role"] != "supervisor"]
    return {
        "app": settings.app_name,
        "profile": {"name": settings.profile, "explicit": list(settings.profile_explicit)},
        "mode": sample.mode,
        "pid": sample.pid,
        "uptime": round(sample.uptime, 1),
        "ready": readiness["ready"],
        "reasons": readiness["reasons"],
        "checks": readiness["checks"],
        "fatal": sample.fatal,
        "broker": {
            "host": settings.broker_host, "port": settings.broker_port, "embedded": settings.uses_embedded_broker,
            "connected": sum(1 for p in connected if p["connected"]), "clients": len(connected),
        },
        "processes": processes,
        "routes": routes,
        "totals": {**{k: int(view.totals.get(k, 0)) for k in ("received", "handled", "failed", "dead_lettered",
                                                               "unrouted")},
                   "holding": sum(r.holding for r in view.routes)},
        "backlog": dict(view.backlog),
        "dead_letters": recent_dead_letters(DEAD_LETTERS_SHOWN),
        "events": recent_events(EVENTS_SHOWN),
        "max_inflight": settings.max_inflight,
        "history": history.data() if history is not None else None,
        "autoscale": sample.autoscale,
    }


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _uptime(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _clock(epoch: float) -> str:
    """UTC wall-clock time, the same on every viewer's screen."""
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    return f'<time datetime="{iso}" title="{iso}">{time.strftime("%H:%M:%S", time.gmtime(epoch))}</time>'


def _feeds(data: dict[str, Any]) -> list[str]:
    """The recent dead letters and the events feed (newest first)."""
    parts = ["<h2>Recent dead letters</h2>"]
    if data["dead_letters"]:
        parts.append('<table id="dead-letters"><thead><tr><th>time (UTC)</th><th>topic</th><th>route</th>'
                     "<th>error</th><th>process</th></tr></thead><tbody>")
        for d in data["dead_letters"]:
            parts.append(
                f'<tr class="dead-letter"><td>{_clock(d["time"])}</td><td class="topic"><code>{_e(d["topic"])}</code></td>'
                f'<td class="route"><code>{_e(d["route"] or "(no route)")}</code></td>'
                f'<td class="error">{_e(d["error"])}</td><td class="source">{_e(d["source"] or "main")}</td></tr>'
            )
        parts.append("</tbody></table>")
    else:
        parts.append('<p id="dead-letters" class="meta">none since start</p>')
    parts.append("<h2>Events</h2>")
    if data["events"]:
        parts.append('<ul id="events">')
        for ev in data["events"]:
            source = f' <span class="meta">{_e(ev["source"])}</span>' if ev["source"] else ""
            parts.append(f'<li class="event" data-kind="{_e(ev["kind"])}">{_clock(ev["time"])} '
                         f'<span class="tag">{_e(ev["kind"])}</span>{source} {_e(ev["text"])}</li>')
        parts.append("</ul>")
    else:
        parts.append('<p id="events" class="meta">no autoscaling, adoption, restart or recycling events yet</p>')
    return parts


def render_charts(data: dict[str, Any]) -> str:
    """`<div id="charts">`: empty without history; the page's script then keeps the charts it has."""
    history = data.get("history")
    return f'<div id="charts">{"" if history is None else history_charts(history, data["max_inflight"])}</div>'


def render_fragment(data: dict[str, Any]) -> str:
    """The live part of the page (replaced on every refresh; the charts are refreshed on their own)."""
    broker = data["broker"]
    ready = "ready" if data["ready"] else "not ready"
    reasons = "".join(f"<li>{_e(r)}</li>" for r in data["reasons"])
    parts = [
        f'<section class="summary" data-ready="{str(data["ready"]).lower()}">',
        f'<p><span class="badge {"ok" if data["ready"] else "bad"}" id="ready">{ready}</span> '
        f'{_e(data["mode"])} mode, {"supervisor " if data["mode"] == "workers" else ""}pid {_e(data["pid"])}, up {_e(_uptime(data["uptime"]))}'
        f', profile <span id="profile">{_e(data["profile"]["name"] or "none")}</span></p>',
        f'<p id="broker">Broker {_e(broker["host"])}:{_e(broker["port"])}'
        f'{" (embedded)" if broker["embedded"] else ""}: '
        f'<b>{broker["connected"]} of {broker["clients"]}</b> connection(s) up</p>',
        f'<ul class="reasons">{reasons}</ul>' if reasons else "",
        "</section>",
    ]
    t = data["totals"]
    parts.append(
        f'<p class="totals">received <b data-k="received">{t["received"]}</b> · handled <b data-k="handled">'
        f'{t["handled"]}</b> · failed <b data-k="failed">{t["failed"]}</b> · dead-lettered <b data-k="dead_lettered">'
        f'{t["dead_lettered"]}</b> · unrouted <b data-k="unrouted">{t["unrouted"]}</b> · holding '
        f'<b data-k="holding" class="{"bad" if t.get("holding") else ""}">{t.get("holding", 0)}</b></p>'
    )
    parts.append(render_charts(data))
    parts.append("<h2>Processes</h2><table id=\"processes\"><thead><tr><th>id</th><th>pid</th><th>state</th>"
                 "<th>MQTT</th><th>restarts</th><th>RSS MB</th><th>CPU %</th><th>msg/s</th><th>received</th>"
                 "<th>handled</th><th>failed</th><th>in flight</th></tr></thead><tbody>")
    for p in data["processes"]:
        mqtt = "—" if p["role"] == "supervisor" else ("up" if p["connected"] else "down")
        late = p.get("heartbeat_late")
        state = f'{p["state"]} · heartbeat late ({p["heartbeat_age"]:.0f} s)' if late else p["state"]
        parts.append(
            f'<tr data-process="{_e(p["id"])}"><td>{_e(p["id"])}</td><td class="pid">{_e(p["pid"] or "—")}</td>'
            f'<td class="state {"ok" if p["ready"] and not late else "bad"}">{_e(state)}</td><td class="mqtt">{mqtt}</td>'
            f'<td class="restarts">{p["restarts"]}</td><td class="rss">{_mb(p["rss_bytes"])}</td>'
            f'<td class="cpu">{p["cpu_percent"]:.0f}</td><td class="rate">{p["rate"]:.1f}</td>'
            f'<td class="received">{p["received"]}</td><td class="handled">{p["handled"]}</td>'
            f'<td class="failed">{p["failed"]}</td><td class="inflight">{p["inflight"]}</td></tr>'
        )
    parts.append("</tbody></table>")
    parts.append("<h2>Routes</h2><table id=\"routes\"><thead><tr><th>route</th><th>msg/s</th><th>errors/s</th>"
                 "<th>received</th><th>handled</th><th>failed</th><th>dead-lettered</th><th>rate-limited</th>"
                 "<th>retried</th><th>holding</th><th>avg ms</th></tr></thead><tbody>")
    for r in data["routes"]:
        parts.append(
            f'<tr data-route="{_e(r["pattern"])}"><td><code>{_e(r["pattern"])}</code></td>'
            f'<td class="rate">{r["rate"]:.1f}</td><td class="error_rate">{r["error_rate"]:.1f}</td>'
            f'<td class="received">{r["received"]}</td><td class="handled">{r["handled"]}</td>'
            f'<td class="failed">{r["failed"]}</td><td class="dead_lettered">{r["dead_lettered"]}</td>'
            f'<td class="rate_limited">{r["rate_limited"]}</td><td class="retried">{r["retried"]}</td>'
            f'<td class="holding {"bad" if r["breaker"] != "closed" else ""}" data-breaker="{_e(r["breaker"])}">'
            f'{r["holding"]}{"" if r["breaker"] == "closed" else " (circuit " + _e(r["breaker"].replace("_", "-")) + ")"}'
            f'</td><td class="avg_ms">{r["avg_ms"]:.2f}</td></tr>'
        )
    parts.append("</tbody></table>")
    if data["backlog"]:
        parts.append("<h2>Backlog</h2><table id=\"backlog\"><tbody>")
        for name, value in sorted(data["backlog"].items()):
            parts.append(f'<tr data-backlog="{_e(name)}"><td>{_e(name)}</td><td>{_e(value)}</td></tr>')
        parts.append("</tbody></table>")
    auto = data.get("autoscale")
    if auto:  # its decisions are in the events feed
        parts.append(
            f'<h2>Autoscaling</h2><p id="autoscale"><b>{auto["workers"]}</b> worker(s) (min {auto["min"]}, '
            f'max {auto["max"]}), utilization {auto["utilization"]:.2f}; scaled up {auto["decisions"]["up"]}, '
            f'down {auto["decisions"]["down"]} time(s)</p>'
        )
    parts.extend(_feeds(data))
    if data["checks"]:
        items = "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in sorted(data["checks"].items()))
        parts.append(f"<h2>Dependencies</h2><ul id=\"checks\">{items}</ul>")
    return "".join(parts)


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-bottom:1em}th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}.badge{padding:.1em .5em;border-radius:.3em;color:#fff}
.badge.ok{background:#2a7}.badge.bad{background:#c33}td.bad{color:#c33}td.ok{color:#2a7}
.meta{color:#888;font-size:12px}.tag{background:#eef;border-radius:.3em;padding:0 .4em;font-size:12px}
#dead-letters th,#dead-letters td{text-align:left}th{white-space:nowrap}.charts{display:flex;flex-wrap:wrap;gap:.5em 1.5em}figure.chart{margin:0}
figcaption{font-size:13px;color:#444}svg.chart{display:block;max-width:100%;height:auto}svg .grid{stroke:#e4e4e4}
svg .axis{fill:#888;font-size:10px}svg .line{fill:none;stroke-width:1.6}svg .limit{stroke:#c33;stroke-dasharray:6 3}
ul.legend{list-style:none;padding:0;margin:.2em 0 0 44px;font-size:12px;max-width:416px}
ul.legend li{display:inline-block;margin-right:1em}.swatch{display:inline-block;width:14px;height:0;margin-right:.3em;vertical-align:middle}
.swatch.limit{border-top:2px dashed #c33}h3{font-size:14px;margin:.8em 0 .3em}
#events{list-style:none;padding:0}#events li{padding:.1em 0}
"""

# The tables every `every` ms; the charts (the bulk of the bytes) only when they may have a new
# point, every `chartsEvery` ms. Relative URLs only, so the page works behind any path prefix.
_SCRIPT = """
(function () {
  var every = %d, chartsEvery = %d, count = 0, chartCount = 0, live = document.getElementById('live');
  var counter = document.getElementById('refreshes'), note = document.getElementById('live-state');
  var charts = document.getElementById('charts'), chartCounter = document.getElementById('chart-refreshes');
  function load(query) {
    return fetch(query, {cache: 'no-store'}).then(function (r) {
      if (!r.ok) { throw new Error('HTTP ' + r.status); }
      return r.text();
    });
  }
  function keepCharts() {
    var slot = document.getElementById('charts');
    if (slot && charts && slot !== charts) { slot.replaceWith(charts); }
  }
  function tick() {
    load('?fragment=1').then(function (text) {
      live.innerHTML = text; keepCharts(); count += 1; counter.textContent = count;
      note.textContent = 'live, updated ' + new Date().toLocaleTimeString();
    }).catch(function (e) {
      note.textContent = 'cannot reach the server (' + e.message + '); retrying';
    }).then(function () { setTimeout(tick, every); });
  }
  function chartTick() {
    load('?fragment=charts').then(function (text) {
      var box = document.createElement('div');
      box.innerHTML = text;
      if (box.firstElementChild) { charts = box.firstElementChild; keepCharts(); }
      chartCount += 1; chartCounter.textContent = chartCount;
    }).catch(function () { return null; }).then(function () { setTimeout(chartTick, chartsEvery); });
  }
  setTimeout(tick, every);
  setTimeout(chartTick, chartsEvery);
})();
"""


def render_page(data: dict[str, Any], refresh: float = 2.0) -> str:
    """The whole page; its script refreshes the live part every `refresh` seconds, the charts at
    most as often as the history takes a point."""
    ms = int(refresh * 1000)
    history = data.get("history")
    charts_ms = max(ms, int(1000 * history["interval"])) if history else ms
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\">"
        f"<title>{_e(data['app'])} — status</title>"
        f"<noscript><meta http-equiv=\"refresh\" content=\"{max(1, round(refresh))}\"></noscript>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>{_e(data['app'])}</h1>"
        f"<p class=\"meta\"><span id=\"live-state\">refreshing every {refresh:g} s</span> · updates: "
        "<span id=\"refreshes\">0</span> · charts: <span id=\"chart-refreshes\">0</span></p>"
        f"<div id=\"live\">{render_fragment(data)}</div>"
        f"<script>{_SCRIPT % (ms, charts_ms)}</script></body></html>"
    )
