"""A seeded fleet end to end: pty → gateway process → real Mosquitto → subscriber."""
import json
import os
import tempfile

from binlink.sim.broker import Mosquitto
from binlink.sim.fleet import Fleet
from tests.harness import GatewayProcess, Subscriber, wait_for


def run(bins, duration_s, fmt="raw", seed=1, vm=None, tmp=None, **fleet_kw):
    """Returns (fleet, decoded event messages, retained states by bin, gateway metrics)."""
    tmp = tmp or tempfile.mkdtemp(prefix="binlink-fleet-")
    broker = Mosquitto().start()
    sub = Subscriber(broker.port, topics=("binlink/+/bin/+/event", "binlink/+/bin/+/state"))
    fleet = Fleet(bins, seed=seed, fmt=fmt, links=[os.path.join(tmp, "radio0")],
                  registry_path=os.path.join(tmp, "devices.toml"), vm=vm, **fleet_kw)
    gw = GatewayProcess(tmp, broker.port, [("radio0", fleet.links[0].link, fmt)]).start()
    try:
        fleet.run(duration_s)
        assert fleet.links[0].wait_drained(60), "gateway did not read the pty"
        last = [-1]

        def settled():
            n = gw.metric("binlink_readings_accepted_total") + gw.metric("binlink_frames_rejected_total")
            done = n == last[0] and gw.metric("binlink_outbox_depth") == 0
            last[0] = n
            return done

        wait_for(settled, timeout=120, interval=0.5, what="gateway settled")
        accepted = gw.metric("binlink_readings_accepted_total")
        wait_for(lambda: len({e["message_id"] for e in _events(sub) if e["event"] == "uplink"}) >= accepted,
                 timeout=60, what="every accepted reading at the subscriber")
        heard = [-1]

        def quiet():  # the states published after the last readings have arrived too
            n, heard[0] = heard[0], len(sub.messages)
            return n == heard[0]

        wait_for(quiet, timeout=30, interval=0.5, what="the subscriber quiet")
        metrics = gw.metrics()
        events = _events(sub)
        states = {}
        for _, p in sub.on("/state"):
            s = json.loads(p)
            states[s["bin_id"]] = s
        return fleet, events, states, metrics
    finally:
        gw.kill()
        sub.close()
        broker.stop()
        fleet.close()


def _events(sub):
    return [json.loads(p) for _, p in sub.on("/event")]
