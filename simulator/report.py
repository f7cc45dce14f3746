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


def _x(t, t0, t1):
    return PAD_L + (W - PAD_L - PAD_R) * (t - t0) / (t1 - t0)


def _y(v):
    return PAD_T + (H - PAD_T - PAD_B) * (1 - max(0.0, min(Y_MAX, v)) / Y_MAX)


def _points(series, t0, t1):
    return " ".join("%.1f,%.1f" % (_x(t, t0, t1), _y(v)) for t, v in series if t0 <= t <= t1)


def bin_chart(bin_id, s, t0, t1, start=None):
    """One bin's SVG: truth, published, daily forecasts, pickups, emptied events; the weeks before
    `start` (fixed rounds while the forecast learns) shaded."""
    out = ['<svg xmlns="http://www.w3.org/2000/svg" class="bin" data-bin="%s" width="%d" height="%d" viewBox="0 0 %d %d">'
           % (html.escape(bin_id), W, H, W, H)]
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
    # the forecast each morning: from the published fill then, to full at the forecast time
    last_day = None
    published = dict(s["published"])
    for t, full_at in s["forecast"]:
        if full_at is None or not t0 <= t <= t1 or t not in published or (t // DAY) == last_day or (t % DAY) < 6 * 3600:
            continue
        last_day = t // DAY
        end = min(full_at, t1)
        end_v = published[t] + (100.0 - published[t]) * (end - t) / (full_at - t) if full_at > t else 100.0
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
    charts = "\n".join("<h3>%s <small>%s</small></h3>\n%s" % (html.escape(b), html.escape(s.get("name") or ""),
                                                             bin_chart(b, s, t0, t1, fc["start"]))
                       for b, s in sorted(fc["series"].items()))
    return """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:800px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}} .key span{{display:inline-block;margin-right:1.2em}}</style></head>
<body>
<h1>{title}</h1>
<p>{bins} simulated bins over {days} days (after a week of learning), the same bins and waste under both
policies. Trucks go out Monday to Saturday at 07:00 and visit their bins over six hours.</p>
<h2>Policies</h2>
<table class="policies"><tr><th>policy</th><th>collections</th><th>per bin-month</th><th>overflow bin-hours</th></tr>
{rows}</table>
<p>Collections saved: <b>{saved} %</b>. Forecast of the full time, made 24 h ahead (bins emptied a few hours
after they report full, so every weekday is scored): mean absolute error <b>{mae} h</b> over {scored} fill cycles.</p>
{policy_chart}
<h2>Bins under the collection list</h2>
<p class="key"><span style="color:{c[truth]}">&#9644; true fill (mean level)</span><span style="color:{c[published]}">&#9644; published fill</span>
<span style="color:{c[forecast]}">- - forecast to full (each morning)</span><span style="color:{c[pickup]}">| pickup &#9650; emptied event</span></p>
{charts}
</body></html>
""".format(title=html.escape(title), bins=fc["bins"], days=fc["days"], rows=rows, saved=comparison["collections_saved_pct"],
           mae=comparison["forecast_full_at_mae_h"], scored=comparison["forecast_scored"], policy_chart=policy_chart(comparison),
           charts=charts, c=COLOURS)


def write(path, comparison):
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(comparison))
