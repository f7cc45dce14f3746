"""`binlink watch BIN`: the technician's on-site check after `make flash`.

Subscribes to the broker the gateways publish to and shows the bin's hello and first reading as
the gateways saw them (RSSI, fill, flags), or says plainly why nothing arrives: a gateway refused
its frames (and why, from `.../gateway/<id>/rejected`), no gateway is online, or nothing was heard.
Exit status: 0 a reading arrived, 1 nothing heard, 3 frames heard but refused, 2 usage/connection."""
import json
import os
import queue
import time

HINTS = {
    "unknown_device": "the gateway does not know this bin yet: `sudo binlink registry import` this registry there "
                      "and `systemctl reload binlink-gateway` (or wait for the shared registry to sync)",
    "bad_tag": "the frame's key does not match the gateway's registry: the gateway has an older key for this "
               "bin; `sudo binlink registry import --update` the registry written by this flash there and reload it",
    "replay": "the counter is behind what the gateway accepted before: an old frame, or the board's state was "
              "restored from an old backup",
    "fcnt_gap": "the counter jumped far ahead of what the gateway last accepted; the bin resynchronises with its "
                "next hello",
    "version": "the bin speaks a newer protocol than this gateway: upgrade the gateway",
}


def add_parser(sub):
    w = sub.add_parser("watch", help="after flashing: a bin's hello and first reading as the gateways see them")
    w.add_argument("bin", help="bin id, as given to make flash BIN=...")
    w.add_argument("--registry", default=os.environ.get("REGISTRY") or None,
                   help="registry that names the bin's device id (default: $REGISTRY, else the one make flash and "
                        "binlink registry use: /etc/binlink/devices.toml on a gateway, ~/.local/share/binlink/devices.toml "
                        "on a workstation)")
    w.add_argument("--broker", default="127.0.0.1:1883", help="host[:port] the gateways publish to")
    w.add_argument("--site", help="the gateways' site; topics binlink/<site>/... (or give --base-topic)")
    w.add_argument("--base-topic", help="the gateways' base topic, if not binlink/<site>")
    w.add_argument("--username")
    w.add_argument("--password-file")
    w.add_argument("--ca-file", help="CA certificate: connect with TLS")
    w.add_argument("--timeout", type=float, default=120, help="seconds to wait (default %(default)s)")
    w.set_defaults(func=run)


def _say(text):
    print(text, flush=True)


def _device_of(args):
    from binlink.gateway import config, registry

    args.registry = args.registry or registry.default_path()
    try:
        devices = registry.load(args.registry, check_permissions=False, strict=False)
    except config.ConfigError as e:
        raise SystemExit("error: %s" % e.problems[0])
    for dev in devices.values():
        if dev.bin_id == args.bin:
            return dev
    raise SystemExit("error: bin %s is not in %s (was it flashed with this REGISTRY?)" % (args.bin, args.registry))


def _connect(args, topics, inbox):
    import paho.mqtt.client as mqtt

    host, _, port = args.broker.partition(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="binlink-watch-%d" % os.getpid())
    if args.ca_file:
        client.tls_set(ca_certs=args.ca_file)
    if args.username:
        password = None
        if args.password_file:
            with open(args.password_file) as f:
                password = f.read().strip()
        client.username_pw_set(args.username, password)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics]) if not rc.is_failure else \
        inbox.put(("error", str(rc)))
    client.on_message = lambda c, u, m: inbox.put((m.topic, m.payload))
    try:
        client.connect(host, int(port or 1883), keepalive=30)
    except OSError as e:
        raise SystemExit("error: cannot reach the broker at %s: %s" % (args.broker, e))
    client.loop_start()
    return client


def run(args):
    if not (args.site or args.base_topic):
        raise SystemExit("error: give --site (the gateways' [gateway] site) or --base-topic")
    base = args.base_topic or "binlink/%s" % args.site
    dev = _device_of(args)
    inbox = queue.Queue()
    topics = ["%s/bin/%s/event" % (base, dev.bin_id), "%s/gateway/+/rejected" % base, "%s/gateway/+/status" % base]
    client = _connect(args, topics, inbox)
    _say("watching bin %s (device %s) on %s under %s for %d s: reset the board now if it sleeps"
         % (dev.bin_id, dev.dev, args.broker, base, args.timeout))
    gateways = {}
    refused = 0
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            try:
                topic, payload = inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if topic == "error":
                raise SystemExit("error: the broker refused the connection: %s" % payload)
            if topic.endswith("/status"):
                gateways[topic.split("/")[-2]] = payload.decode(errors="replace")
                continue
            try:
                m = json.loads(payload)
            except ValueError:
                continue
            kind = m.get("event")
            if kind == "rejected":
                if m.get("device") == dev.dev:
                    refused += 1
                    _say("REFUSED by gateway %s (%s, RSSI %s dBm): %s — %s" % (m.get("gateway"), m.get("source"), m.get("rssi"),
                                                                           m.get("reason"), HINTS.get(m.get("reason"), "")))
            elif kind == "hello":
                _say("hello via gateway %s (%s): RSSI %s dBm, SNR %s, firmware %s, reset cause %s, counter %s"
                     % (m.get("gateway"), m.get("source"), m.get("rssi"), m.get("snr"), m.get("fw_version"),
                        m.get("reset_cause"), m.get("fcnt")))
            elif kind == "uplink":
                _say("reading via gateway %s (%s): fill %s %%, distance %s mm, flags %s, battery %s V, RSSI %s dBm"
                     % (m.get("gateway"), m.get("source"), m.get("fill_pct"), m.get("distance_mm"),
                        ",".join(m.get("flags") or []) or "none", m.get("battery_v"), m.get("rssi")))
                _say("ok: bin %s reports through the gateways" % dev.bin_id)
                return 0
    finally:
        client.loop_stop()
        client.disconnect()
    online = sorted(g for g, s in gateways.items() if s == "online")
    if refused:
        _say("frames from bin %s arrived but were refused (see above)" % dev.bin_id)
        return 3
    if not online:
        _say("nothing heard, and no gateway is online under %s: check the gateway service "
             "(journalctl -u binlink-gateway)" % base)
    else:
        _say("nothing heard from bin %s in %d s (gateways online: %s): check the board's console "
             "(mpremote connect PORT), its antenna and its distance to a gateway" % (dev.bin_id, args.timeout, ", ".join(online)))
    return 1
