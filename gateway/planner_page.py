"""The planner's page: `binlink planner --http HOST:PORT` serves one self-contained page (no
scripts or tiles from elsewhere: it works offline) with every bin on a map, coloured by fill and
forecast, the next round's routes, the overflow hot spots and the quiet sensors. The page asks
`/plan.json` every few seconds and redraws, so a state the broker delivers shows without a reload.

The map is an SVG in an equirectangular projection fitted to the bins (a city is small enough
for straight lines and no tiles; a tile layer could be added behind it where the site has one)."""
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("binlink.planner")


def snapshot(planner):
    """What the page draws: every bin (its state, whether listed or quiet) and the latest list."""
    body = planner.last_body or {}
    listed = {b["bin_id"]: b for b in body.get("bins", [])}
    quiet = {b["bin_id"] for b in body.get("quiet", [])}
    bins = []
    for bin_id, s in sorted(dict(planner.states).items()):
        bins.append({"bin_id": bin_id, "name": s.get("name"), "lat": s.get("lat"), "lon": s.get("lon"), "fill_pct": s.get("fill_pct"),
                     "full_at": s.get("full_at"), "measured_at": s.get("measured_at"),
                     "reason": listed[bin_id]["reason"] if bin_id in listed else "quiet" if bin_id in quiet else None,
                     "why": listed[bin_id].get("why") if bin_id in listed else None})
    return {"bins": bins, "plan": body, "full_pct": planner.settings.get("full_pct", 90.0)}


class PageServer:
    def __init__(self, planner, host, port):
        page = PAGE.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/" or self.path.startswith("/?"):
                    self._send(200, "text/html; charset=utf-8", page)
                elif self.path == "/plan.json":
                    self._send(200, "application/json", json.dumps(snapshot(planner), sort_keys=True).encode())
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, code, ctype, data):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="planner-page", daemon=True)

    def start(self):
        self.thread.start()
        log.info("planner page on http://%s:%d/", *self.httpd.server_address[:2])
        return self

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>binlink planner</title>
<style>body{font-family:system-ui,sans-serif;margin:0;display:flex;color:#222}
#map{flex:1;height:100vh;background:#f6f6f2}#side{width:420px;height:100vh;overflow:auto;padding:0 12px;border-left:1px solid #ccc}
table{border-collapse:collapse;font-size:12px}td,th{border-bottom:1px solid #eee;padding:2px 6px;text-align:left}
.key span{display:inline-block;margin-right:10px;font-size:12px}</style></head>
<body><svg id="map" xmlns="http://www.w3.org/2000/svg"></svg>
<div id="side"><h2>binlink planner</h2><p id="round">waiting for the bins' states...</p>
<p class="key"><span style="color:#2e7d32">&#9679; under half</span><span style="color:#f9a825">&#9679; filling</span>
<span style="color:#c62828">&#9679; full</span><span>&#9711; listed</span><span style="color:#9e9e9e">&#9679; quiet</span></p>
<h3>Next round</h3><div id="trucks"></div><table id="list"></table>
<h3>Overflow hot spots</h3><table id="hot"></table><h3>Quiet sensors</h3><table id="quiet"></table></div>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg", ROUTE = ["#1f6fd1", "#8e24aa", "#00897b", "#6d4c41", "#3949ab", "#d81b60"];
function el(tag, attrs, parent) { const e = document.createElementNS(NS, tag); for (const k in attrs) e.setAttribute(k, attrs[k]); parent.appendChild(e); return e; }
function colour(b, full) {
  if (b.reason === "quiet") return "#9e9e9e";
  if (b.fill_pct === null) return "#bdbdbd";
  return b.fill_pct >= full ? "#c62828" : b.fill_pct >= 50 ? "#f9a825" : "#2e7d32";
}
function rows(table, head, items) {
  table.textContent = "";
  const h = table.insertRow(); head.forEach(t => { const c = document.createElement("th"); c.textContent = t; h.appendChild(c); });
  items.forEach(r => { const tr = table.insertRow(); r.forEach(v => { tr.insertCell().textContent = v === null || v === undefined ? "-" : v; }); });
}
function draw(data) {
  const map = document.getElementById("map"), plan = data.plan || {}, routes = plan.routes || {trucks: []};
  const placed = data.bins.filter(b => b.lat !== null && b.lon !== null);
  map.textContent = "";
  const pts = placed.map(b => [b.lat, b.lon]).concat(routes.depot ? [routes.depot] : []);
  if (pts.length) {
    const W = map.clientWidth || 800, H = map.clientHeight || 600, pad = 30;
    const lats = pts.map(p => p[0]), lons = pts.map(p => p[1]);
    const lat0 = Math.min(...lats), lat1 = Math.max(...lats), lon0 = Math.min(...lons), lon1 = Math.max(...lons);
    const k = Math.cos((lat0 + lat1) / 2 * Math.PI / 180);
    const s = Math.min((W - 2 * pad) / Math.max((lon1 - lon0) * k, 1e-6), (H - 2 * pad) / Math.max(lat1 - lat0, 1e-6));
    const xy = p => [pad + (p[1] - lon0) * k * s, H - pad - (p[0] - lat0) * s];
    routes.trucks.forEach((t, i) => {
      const line = [routes.depot].concat(t.stops.filter(x => x.lat !== null).map(x => [x.lat, x.lon])).concat([routes.depot]);
      el("polyline", {"class": "route", "data-truck": t.truck, points: line.map(p => xy(p).join(",")).join(" "), fill: "none",
                      stroke: ROUTE[i % ROUTE.length], "stroke-width": 2, "stroke-opacity": 0.8}, map);
    });
    if (routes.depot) { const d = xy(routes.depot); el("rect", {"class": "depot", x: d[0] - 6, y: d[1] - 6, width: 12, height: 12, fill: "#222"}, map); }
    placed.forEach(b => {
      const p = xy([b.lat, b.lon]);
      const c = el("circle", {"class": "bin", "data-bin": b.bin_id, "data-fill": b.fill_pct === null ? "" : b.fill_pct.toFixed(1),
                              "data-reason": b.reason || "", cx: p[0], cy: p[1], r: b.reason && b.reason !== "quiet" ? 8 : 6,
                              fill: colour(b, data.full_pct), stroke: b.reason && b.reason !== "quiet" ? "#000" : "#fff", "stroke-width": 2}, map);
      el("title", {}, c).textContent = b.bin_id + " " + (b.name || "") + ": " + (b.fill_pct === null ? "-" : b.fill_pct.toFixed(1) + " %") +
        (b.full_at ? ", full " + b.full_at : "") + (b.why ? " (" + b.why + ")" : "");
    });
  }
  document.getElementById("round").textContent = plan.next_round ? "next round " + (plan.next_round_local || plan.next_round) + ": " +
    (plan.bins || []).length + " of " + data.bins.length + " bins listed, full = " + data.full_pct + " %" : data.bins.length + " bins, no list yet";
  document.getElementById("trucks").textContent = routes.trucks.map(t => "truck " + t.truck + ": " + t.stops.length + " bins, " + t.km +
    " km, " + t.load_pct + " % full").join("; ");
  rows(document.getElementById("list"), ["bin", "name", "fill %", "age h", "why"],
       (plan.bins || []).map(b => [b.bin_id, b.name, b.fill_pct === null ? null : b.fill_pct.toFixed(1), b.age_h, b.why]));
  rows(document.getElementById("hot"), ["bin", "name", "overflows", "hours"], (plan.hot_spots || []).map(h => [h.bin_id, h.name, h.overflows, h.overflow_h]));
  rows(document.getElementById("quiet"), ["bin", "name", "last fill %", "why"], (plan.quiet || []).map(b => [b.bin_id, b.name, b.fill_pct, b.why]));
}
async function refresh() {
  try { const r = await fetch("/plan.json", {cache: "no-store"}); if (r.ok) draw(await r.json()); } catch (e) { /* planner restarting: next time */ }
  setTimeout(refresh, 2000);
}
refresh();
</script></body></html>
"""
