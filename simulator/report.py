"""A self-contained HTML report of a policy comparison (simulator/policy.py): inline SVG, no
scripts, no external assets, so it opens from a mail attachment or a file share.

Per bin: true fill (the mean level), the fill the gateway published, the forecast (each morning,
a dashed line from the published fill to 100 % at the forecast full time), pickups (green lines)
and `emptied` events (triangles). Then both policies side by side."""
import html
from datetime import datetime, timezone

DAY = 86400.0
W, H = 760, 220  # chart size
PAD_L, PAD_R, PAD_T, PAD_B = 44, 12, 14, 28
Y_MAX = 120.0
COLOURS = {"truth": "#8a8a8a", "published": "#1f6fd1", "forecast": "#e07b00", "pickup": "#1a9e4b", "full": "#c62828"}


# the head both reports share (a str.format template: braces of the style sheet doubled)
_PAGE_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:800px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}} .key span{{display:inline-block;margin-right:1.2em}}</style></head>
<body>
<h1>{title}</h1>
"""


def _x(t, t0, t1):
    return PAD_L + (W - PAD_L - PAD_R) * (t - t0) / (t1 - t0)


def _y(v):
    return PAD_T + (H - PAD_T - PAD_B) * (1 - max(0.0, min(Y_MAX, v)) / Y_MAX)


def _points(series, t0, t1):
    return " ".join("%.1f,%.1f" % (_x(t, t0, t1), _y(v)) for t, v in series if t0 <= t <= t1)


def bin_chart(bin_id, s, t0, t1, start=None, full_pct=100.0, css="bin"):
    """One bin's SVG: truth, published, daily forecasts (a line to full_pct at the forecast time),
    pickups, emptied events; the weeks before `start` (fixed rounds while the forecast learns) shaded."""
    out = ['<svg xmlns="http://www.w3.org/2000/svg" class="%s" data-bin="%s" width="%d" height="%d" viewBox="0 0 %d %d">'
           % (css, html.escape(bin_id), W, H, W, H)]
    out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="#fff" stroke="#ccc"/>' % (PAD_L, PAD_T, W - PAD_L - PAD_R, H - PAD_T - PAD_B))
    if start is not None and t0 < start < t1:
        out.append('<rect class="learning" x="%d" y="%d" width="%.1f" height="%d" fill="#f3f3f3"/>' % (
            PAD_L, PAD_T, _x(start, t0, t1) - PAD_L, H - PAD_T - PAD_B))
        out.append('<text x="%d" y="%d" font-size="10" fill="#777">learning, fixed rounds</text>' % (PAD_L + 4, PAD_T + 11))
    for pct in (0, 50, 100):
        y = _y(pct)
        out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s" stroke-dasharray="%s"/>' % (
            PAD_L, y, W - PAD_R, y, COLOURS["full"] if pct == 100 else "#e4e4e4", "4 3" if pct == 100 else "none"))
        out.append('<text x="%d" y="%.1f" font-size="10" text-anchor="end">%d %%</text>' % (PAD_L - 4, y + 3, pct))
    day = (t0 // DAY + 1) * DAY
    while day < t1:
        x = _x(day, t0, t1)
        if int(day // DAY + 3) % 7 == 0:  # Mondays
            out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#eee"/>' % (x, PAD_T, x, H - PAD_B))
            out.append('<text x="%.1f" y="%d" font-size="10" text-anchor="middle">%s</text>' % (
                x, H - PAD_B + 14, datetime.fromtimestamp(day, timezone.utc).strftime("Mon %d %b")))
        day += DAY
    for t in s["pickups"]:
        if t0 <= t <= t1:
            x = _x(t, t0, t1)
            out.append('<line class="pickup" x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="1.5"/>' % (
                x, PAD_T, x, H - PAD_B, COLOURS["pickup"]))
    # the forecast each morning: from the published fill then, to full (full_pct) at the forecast time
    last_day = None
    published = dict(s["published"])
    for t, full_at in s["forecast"]:
        if full_at is None or not t0 <= t <= t1 or t not in published or (t // DAY) == last_day or (t % DAY) < 6 * 3600:
            continue
        last_day = t // DAY
        end = min(full_at, t1)
        end_v = published[t] + (full_pct - published[t]) * (end - t) / (full_at - t) if full_at > t else full_pct
        out.append('<line class="forecast" x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-dasharray="5 3"/>' % (
            _x(t, t0, t1), _y(published[t]), _x(end, t0, t1), _y(end_v), COLOURS["forecast"]))
    for name in ("truth", "published"):
        out.append('<polyline class="%s" fill="none" stroke="%s" stroke-width="%s" points="%s"/>' % (
            name, COLOURS[name], "2" if name == "truth" else "1.2", _points(s[name], t0, t1)))
    for t in s["emptied"]:
        if t0 <= t <= t1:
            x = _x(t, t0, t1)
            out.append('<path class="emptied" d="M%.1f %d l-4 -7 h8 z" fill="%s"/>' % (x, H - PAD_B - 1, COLOURS["pickup"]))
    out.append('</svg>')
    return "\n".join(out)


def policy_chart(comparison):
    """Bars: collections per bin-month and overflow bin-hours, fixed rounds against the list."""
    rows = [("collections per bin-month", "collections_per_bin_month"), ("overflow bin-hours", "overflow_bin_hours")]
    out = ['<svg xmlns="http://www.w3.org/2000/svg" class="policies" width="%d" height="%d" viewBox="0 0 %d %d">' % (W, 150, W, 150)]
    for i, (label, key) in enumerate(rows):
        values = [comparison[p][key] for p in ("fixed", "forecast")]
        top = max(values) or 1.0
        y0 = 20 + i * 65
        out.append('<text x="0" y="%d" font-size="12">%s</text>' % (y0, html.escape(label)))
        for j, (policy, v) in enumerate(zip(("fixed", "forecast"), values)):
            width = 480 * v / top
            y = y0 + 6 + j * 24
            out.append('<rect class="bar %s" x="150" y="%d" width="%.1f" height="18" fill="%s"/>' % (
                policy, y, width, "#9e9e9e" if policy == "fixed" else COLOURS["published"]))
            out.append('<text x="146" y="%d" font-size="11" text-anchor="end">%s</text>' % (y + 13, policy))
            out.append('<text x="%.1f" y="%d" font-size="11">%s</text>' % (154 + width, y + 13, v))
    out.append('</svg>')
    return "\n".join(out)


def render(comparison, title="binlink: collections driven by the forecast"):
    fixed, fc = comparison["fixed"], comparison["forecast"]
    t0, t1 = fc["t0"], fc["end"]
    rows = "".join(
        "<tr><td>%s</td><td>%d</td><td>%.2f</td><td>%.1f</td></tr>" % (
            name, r["collections"], r["collections_per_bin_month"], r["overflow_bin_hours"])
        for name, r in (("fixed weekly rounds", fixed), ("collection list (forecast)", fc)))
    full_pct = comparison.get("full_pct", 100.0)
    charts = "\n".join("<h3>%s <small>%s</small></h3>\n<h4>fixed weekly rounds</h4>\n%s\n<h4>collection list</h4>\n%s" % (
        html.escape(b), html.escape(s.get("name") or ""),
        bin_chart(b, fixed["series"][b], t0, t1, fc["start"], full_pct, "bin-fixed") if b in fixed.get("series", {}) else "",
        bin_chart(b, s, t0, t1, fc["start"], full_pct)) for b, s in sorted(fc["series"].items()))
    site = fc.get("site") or {"hot_spots": [], "quiet": []}
    hot = _table(site["hot_spots"], (("bin", "bin_id"), ("name", "name"), ("overflows", "overflows"), ("hours over", "overflow_h")))
    quiet = _table(site["quiet"], (("bin", "bin_id"), ("name", "name"), ("last fill %", "last_fill_pct"), ("silent h", "silent_h")))
    routes = ("<p>Routes: the listed bins of each round in the solver's order, %s km in all, against %s km visiting them in "
              "list order: <b>%s %%</b> shorter.</p>" % (fc["route_km"], fc["route_km_list_order"], comparison["route_km_saved_pct"])
              if comparison.get("route_km_saved_pct") is not None else "")
    return (_PAGE_HEAD + """<p>{bins} simulated bins over {days} days (after a week of learning), the same bins and waste under both
policies. Trucks go out Monday to Saturday at 07:00 and visit their bins over six hours.</p>
<h2>Policies</h2>
<table class="policies"><tr><th>policy</th><th>collections</th><th>per bin-month</th><th>overflow bin-hours</th></tr>
{rows}</table>
<p>Collections saved: <b>{saved} %</b>{bound}.{every} Forecast of the full time, made 24 h ahead (bins emptied a few hours
after they report full, so every weekday is scored): mean absolute error <b>{mae} h</b> over {scored} fill cycles.</p>
{policy_chart}
{routes}
<h2>Overflow hot spots (collection list)</h2>
<p>Bins that overflowed twice or more, from the published readings as a real site's planner keeps them.</p>
{hot}
<h2>Quiet sensors</h2>
{quiet}
<h2>Bins under both policies</h2>
<p class="key"><span style="color:{c[truth]}">&#9644; true fill (mean level)</span><span style="color:{c[published]}">&#9644; published fill</span>
<span style="color:{c[forecast]}">- - forecast to full (each morning)</span><span style="color:{c[pickup]}">| pickup &#9650; emptied event</span></p>
{charts}
</body></html>
""").format(title=html.escape(title), bins=fc["bins"], days=fc["days"], rows=rows, saved=comparison["collections_saved_pct"],
           mae=comparison["forecast_full_at_mae_h"], scored=comparison["forecast_scored"], policy_chart=policy_chart(comparison),
           charts=charts, c=COLOURS, routes=routes, hot=hot, quiet=quiet,
           bound="" if comparison.get("collections_saved_bound_pct") is None else
           " (at most %s %% on these rounds and this margin, had the list known each bin's true filling speed)"
           % comparison["collections_saved_bound_pct"],
           every="" if comparison.get("overflow_bin_hours_fixed_every_round") is None else
           " Fixed rounds visiting every bin on every round would take %s collections per bin-month and still overflow for %s"
           " bin-hours." % (comparison["collections_per_bin_month_fixed_every_round"], comparison["overflow_bin_hours_fixed_every_round"]))


def write(path, comparison):
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(comparison))


# a real site, from the planner's history (gateway/history.py) ------------------------------------
def site_figures(history, days=30.0, full_pct=90.0, stale_s=12 * 3600.0, chart_bins=12, emptied_drop_pct=15.0):
    """The figures a planner acts on, from what the broker published: collections (the gateway's
    `emptied`: a fall of emptied_drop_pct), overflow (published at or above 100 %) bin-hours and
    episodes, the bins that overflow again and again, the sensors gone quiet. None without data."""
    from binlink.gateway.history import episodes

    everything, info = history.series()
    if not everything:
        return None
    end = max(points[-1][0] for points in everything.values())
    t0 = end - days * DAY
    bins, quiet, hot, collections, overflow_s = {}, [], [], 0, 0.0
    for b, points in everything.items():
        last = points[-1]
        name, lat, lon = info[b]
        if end - last[0] > stale_s:
            quiet.append({"bin_id": b, "name": name, "last_fill_pct": last[1], "silent_h": round((end - last[0]) / 3600.0, 1)})
        window = [p for p in points if p[0] >= t0]
        pickups, over = episodes(window, emptied_drop_pct)
        collections += len(pickups)
        overflow_s += sum(e - s_ for s_, e in over)
        bins[b] = (len(over), window, pickups)
        if len(over) >= 2:
            hot.append({"bin_id": b, "name": name, "overflows": len(over), "overflow_h": round(sum(e - s_ for s_, e in over) / 3600.0, 1)})
    hot.sort(key=lambda h: (-h["overflows"], -h["overflow_h"], h["bin_id"]))
    quiet.sort(key=lambda q: -q["silent_h"])
    span = min(days, (end - min(p[0][0] for p in everything.values())) / DAY) or 1.0
    charted = sorted(bins, key=lambda b: (-bins[b][0], b))[:chart_bins]
    series = {b: {"truth": [], "published": [(t, f) for t, f, *_ in bins[b][1] if f is not None],
                  "forecast": [(t, fa) for t, f, fa, _ in bins[b][1] if f is not None], "pickups": [], "emptied": bins[b][2],
                  "name": info[b][0]} for b in charted}
    return {"bins": len(everything), "days": round(span, 1), "t0": max(t0, end - span * DAY), "end": end, "full_pct": full_pct,
            "collections": collections, "collections_per_bin_month": round(collections / len(everything) * 30.0 / span, 2),
            "overflow_bin_hours": round(overflow_s / 3600.0, 1), "hot_spots": hot, "quiet": quiet, "series": series}


def _table(rows, cols):
    head = "".join("<th>%s</th>" % html.escape(c) for c, _ in cols)
    body = "".join("<tr>%s</tr>" % "".join("<td>%s</td>" % html.escape("-" if r.get(k) is None else str(r.get(k))) for _, k in cols)
                   for r in rows)
    return "<table><tr>%s</tr>%s</table>" % (head, body)


def render_site(site, title="binlink: site report"):
    """The report of a real site: the same figures and charts as a simulated one, from its history."""
    t0, t1 = site["t0"], site["end"]
    charts = "\n".join("<h3>%s <small>%s</small></h3>\n%s" % (html.escape(b), html.escape(s.get("name") or ""),
                                                             bin_chart(b, s, t0, t1, None, site["full_pct"]))
                       for b, s in sorted(site["series"].items()))
    hot = _table(site["hot_spots"], (("bin", "bin_id"), ("name", "name"), ("overflows", "overflows"), ("hours over", "overflow_h")))
    quiet = _table(site["quiet"], (("bin", "bin_id"), ("name", "name"), ("last fill %", "last_fill_pct"), ("silent h", "silent_h")))
    return (_PAGE_HEAD + """<p>{bins} bins over {days} days, from what the site's gateways published (the planner's history).
Full is {full} %; an overflow is a reading at or above 100 % until the bin is emptied.</p>
<table class="site"><tr><th>collections</th><th>per bin-month</th><th>overflow bin-hours</th></tr>
<tr><td>{collections}</td><td>{per_month}</td><td>{overflow}</td></tr></table>
<h2>Overflow hot spots</h2>
<p>Bins that overflowed twice or more: the round comes too rarely for them, or they need a bigger bin.</p>
{hot}
<h2>Quiet sensors</h2>
<p>Silent for longer than the planner trusts: not on the collection list until they report again.</p>
{quiet}
<h2>Bins</h2>
<p class="key"><span style="color:{c[published]}">&#9644; published fill</span>
<span style="color:{c[forecast]}">- - forecast to full (each morning)</span><span style="color:{c[pickup]}">&#9650; emptied</span></p>
{charts}
</body></html>
""").format(title=html.escape(title), bins=site["bins"], days=site["days"], full=site["full_pct"], collections=site["collections"],
           per_month=site["collections_per_bin_month"], overflow=site["overflow_bin_hours"], hot=hot, quiet=quiet, charts=charts,
           c=COLOURS)


def write_site(path, site):
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_site(site))
