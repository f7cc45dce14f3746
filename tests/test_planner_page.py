"""The planner's page in a real headless browser (Chromium through Playwright): it renders, shows
every bin of the site on the map and the next round's route, and updates when a bin's state
changes, without a reload."""
import json
import math
import os
import shutil
import subprocess
import time

import pytest

from binlink.gateway import planner
from tests.harness import BINLINK, wait_for

BROWSERS = ("/usr/bin/chromium-headless-shell", "/usr/lib/chromium/chrome-headless-shell", "/usr/bin/chromium")


def browser_path():
    return next((p for p in BROWSERS if os.path.exists(p)), None) or shutil.which("chromium")


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    return sync_playwright


pytestmark = pytest.mark.skipif(_playwright() is None or browser_path() is None,
                                reason="needs playwright and a Chromium (apt install chromium-headless-shell)")


def states(n, now, centre=(52.52, 13.405)):
    out = []
    for i in range(n):
        a, r = 2.4 * i, 1500.0 * math.sqrt((i + 0.5) / n)
        lat = centre[0] + r * math.sin(a) / 111320.0
        lon = centre[1] + r * math.cos(a) / (111320.0 * math.cos(math.radians(lat)))
        out.append({"bin_id": "bin-%03d" % i, "name": "Bin %d" % i, "lat": round(lat, 6), "lon": round(lon, 6),
                    "fill_pct": float(20 + (i * 37) % 80), "full_at": None, "fill_rate_pct_per_day": None,
                    "measured_at": planner.iso(now - 600)})
    return out


def publish(port, site, items):
    import paho.mqtt.publish as publish_

    publish_.multiple([{"topic": "binlink/%s/bin/%s/state" % (site, s["bin_id"]), "payload": json.dumps(s), "qos": 1, "retain": True}
                       for s in items], hostname="127.0.0.1", port=port)


def page_run(broker_port, tmp, n, site="pagecity"):
    """Publishes n bins' states as gateways do, starts `binlink planner --http`, opens its page in
    Chromium; returns (bins drawn, routes drawn, whether a state change showed without a reload)."""
    from binlink.sim.broker import free_port

    now = time.time()
    publish(broker_port, site, states(n, now))
    http = free_port()
    log = open(os.path.join(str(tmp), "planner.log"), "w")
    proc = subprocess.Popen([BINLINK, "planner", "--port", str(broker_port), "--site", site, "--interval", "0.3", "--http",
                             "127.0.0.1:%d" % http, "--trucks", "2", "--truck-capacity", "200"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "planner page" in open(log.name).read() or proc.poll() is not None, timeout=30, what="the page")
        assert proc.poll() is None, open(log.name).read()
        with _playwright()() as pw:
            browser = pw.chromium.launch(executable_path=browser_path(), headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto("http://127.0.0.1:%d/" % http)
            page.wait_for_function("n => document.querySelectorAll('circle.bin').length === n", arg=n, timeout=60000)
            page.wait_for_function("() => document.querySelectorAll('polyline.route').length > 0", timeout=60000)
            drawn = page.eval_on_selector_all("circle.bin", "cs => cs.map(c => c.getAttribute('data-bin'))")
            routes = page.eval_on_selector_all("polyline.route", "ls => ls.length")
            # a bin fills up: the open page shows it within a few seconds, no reload
            publish(broker_port, site, [dict(states(n, now)[0], fill_pct=97.0, measured_at=planner.iso(time.time()))])
            page.wait_for_selector('circle.bin[data-bin="bin-000"][data-fill="97.0"][data-reason="full"]', timeout=30000)
            if os.environ.get("BINLINK_PAGE_SCREENSHOT"):
                page.screenshot(path=os.environ["BINLINK_PAGE_SCREENSHOT"])
            browser.close()
        assert not errors, errors
        return sorted(drawn), routes, True
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_the_page_shows_every_bin_the_route_and_updates_when_a_state_changes(tmp_path, broker):
    drawn, routes, updated = page_run(broker.port, tmp_path, 12)
    assert drawn == ["bin-%03d" % i for i in range(12)] and routes >= 1 and updated


def test_the_page_is_self_contained(tmp_path):
    from binlink.gateway import planner_page

    assert "http://" not in planner_page.PAGE.replace("http://www.w3.org/2000/svg", "") and "src=" not in planner_page.PAGE
