"""Gateway metrics: Prometheus counters on a private registry, served as text on HTTP.

The publisher process keeps its own counts and reports them to the service as deltas
(`apply_publisher_report`): one registry, one endpoint, one stats message for both processes."""
import ipaddress
import logging
import socket
import threading
from collections import OrderedDict
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, MetricsHandler
from prometheus_client.core import HistogramMetricFamily

from binlink.gateway import logs
from binlink.gateway.latency import LATENCY_BUCKETS, LatencyCounts

log = logs.get("metrics")
MAX_CONNECTIONS = 32  # open at once; one more closes the oldest, so idle connections cannot lock scrapes out
CONNECTION_TIMEOUT_S = 10.0  # a connection silent this long (no request, or not reading the answer) is closed


class _LatencyCollector:
    def __init__(self, counts):
        self.counts = counts

    def collect(self):
        cumulative, n = [], 0
        for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), self.counts.buckets):
            n += count
            cumulative.append(("+Inf" if bound == float("inf") else str(bound), n))
        yield HistogramMetricFamily("binlink_publish_latency_seconds", "From reception to the broker's acknowledgement",
                                    buckets=cumulative, sum_value=self.counts.sum)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.frames_read = Counter("binlink_frames_read", "Receptions read from serial sources", ["source"], registry=r)
        self.accepted = Counter("binlink_frames_accepted", "Frames verified and committed to the outbox", registry=r)
        self.readings = Counter("binlink_readings_accepted", "Readings committed (backlog entries count one each)", registry=r)
        self.rejected = Counter("binlink_frames_rejected", "Frames rejected, by reason code", ["reason"], registry=r)
        self.duplicates = Counter("binlink_duplicates", "Same frame heard again (another radio or a repeat)", registry=r)
        self.repeated = Counter("binlink_frames_repeated", "Frames accepted whose readings were all stored before "
                                "(a batch sent again: the bin's answer was lost)", registry=r)
        self.echo_saved = Counter("binlink_echo_saved", "Readings stored from a later frame's echo: their own frame was not heard",
                                  registry=r)
        self.module_status = Counter("binlink_module_status_lines", "Status lines from radio modules (+OK, +READY)", registry=r)
        self.serial_connected = Gauge("binlink_serial_connected", "1 while the serial port is open", ["source"], registry=r)
        self.serial_reopens = Counter("binlink_serial_reopens", "Serial port reopened after it was lost (the first open is not counted)",
                                      ["source"], registry=r)
        self.published = Counter("binlink_messages_published", "MQTT messages acknowledged by the broker (QoS 1)", registry=r)
        self.outbox_depth = Gauge("binlink_outbox_depth", "Messages in the durable outbox the broker has not acknowledged", registry=r)
        self.acks_unwritten = Gauge("binlink_outbox_acks_unwritten", "Broker acknowledgements not yet written to the outbox "
                                    "(they ride with the next commit; a power cut now republishes them)", registry=r)
        self.outbox_unreadable = Counter("binlink_outbox_unreadable_rows", "Outbox rows the publisher could not read "
                                         "(damaged on disk): skipped, not published", registry=r)
        self.mqtt_connected = Gauge("binlink_mqtt_connected", "1 while connected to the broker", registry=r)
        self.mqtt_connect_failures = Counter("binlink_mqtt_connect_failures", "Broker connection attempts that failed "
                                             "(unreachable, refused, TLS)", registry=r)
        self.mqtt_sessions_lost = Counter("binlink_mqtt_sessions_lost", "Broker sessions ended by a failure, by reason: "
                                          "silent (no PINGRESP), protocol (malformed packet), closed (by the broker or the network)",
                                          ["reason"], registry=r)
        self.mqtt_subscriptions_refused = Counter("binlink_mqtt_subscriptions_refused", "Subscriptions the broker refused "
                                                  "(SUBACK 0x80: its ACL), e.g. Home Assistant's status", registry=r)
        self.mqtt_publishes_denied = Counter("binlink_mqtt_publishes_denied", "Publishes the broker denied (PUBACK, then the "
                                             "connection dropped): their topic is held back, its messages stay in the outbox",
                                             registry=r)
        self.publisher_restarts = Counter("binlink_publisher_restarts", "Publisher process restarted after it died", registry=r)
        self.shared_up = Gauge("binlink_shared_state_up", "1 while the shared state (Redis) answers; 0: local state only", registry=r)
        self.shared_errors = Counter("binlink_shared_state_errors", "Failed calls to the shared state (Redis)", registry=r)
        self.resynced = Counter("binlink_counter_resyncs", "Counters taken up from a hello carrying the full counter", registry=r)
        self.recovered = Counter("binlink_frames_recovered", "Frames held until a resync, then accepted", registry=r)
        self.storage_full = Gauge("binlink_storage_full", "1 while the state disk is full and new frames are refused", registry=r)
        self.readback_rejected = Counter("binlink_readback_rejected", "Values read back and refused (retained states, "
                                         "Redis entries, state rows), by where they came from and why: skipped, never trusted",
                                         ["source", "reason"], registry=r)
        self.state_problems = Counter("binlink_state_problems", "Damaged or lost state found at start, by problem", ["problem"], registry=r)
        self.state_salvaged = Counter("binlink_state_salvaged_rows", "Rows carried over from a damaged state file, by table", ["table"], registry=r)
        self.counters_from_broker = Counter("binlink_counters_from_broker", "Frame counters raised from the broker's retained bin states at start", registry=r)
        self.wifi_takeovers = Counter("binlink_wifi_uplink_takeovers", "Wi-Fi uplink connection taken over: the broker "
                                      "closed it for another client with the same client id (or closed it again and "
                                      "again right after connecting)", registry=r)
        self.clock_suspect = Gauge("binlink_clock_suspect", "1 while the system clock cannot be right (before the release date or behind the broker's states)", registry=r)
        self.counter_headroom = Gauge("binlink_counter_headroom_min", "Frames left before the busiest bin's counter "
                                      "is used up (2^32-1 minus the highest last accepted counter): re-key the bin "
                                      "(binlink registry rekey BIN) long before 0", registry=r)
        self.counter_headroom.set(2**32 - 1)
        self.downlinks_sent = Counter("binlink_downlinks_sent", "Downlinks written to a radio, by command carried (every "
                                      "downlink carries ack: kind=ack counts the downlinks)", ["kind"], registry=r)
        self.downlink_write_errors = Counter("binlink_downlink_write_errors", "Downlinks that could not be written to "
                                             "the radio's serial port (closed, failed or timed out)", registry=r)
        self.downlinks_skipped = Counter("binlink_downlinks_skipped", "Uplinks asking for an answer that got none, by "
                                         "reason: duty_cycle (over the radio's airtime budget), late (the bin's window "
                                         "passed), no_radio (downlink = false, or a Wi-Fi uplink with no mqtt.downlink_topic), too_long", ["reason"], registry=r)
        self.publish_latency = LatencyCounts()
        r.register(_LatencyCollector(self.publish_latency))

    def apply_publisher_report(self, report):
        """Counts from the publisher process (publisher_worker.Worker._report); its acknowledgements
        are counted when the service writes them (published, outbox depth)."""
        if report.get("connect_failures"):
            self.mqtt_connect_failures.inc(report["connect_failures"])
        if report.get("unreadable_rows"):
            self.outbox_unreadable.inc(report["unreadable_rows"])
        if report.get("subscriptions_refused"):
            self.mqtt_subscriptions_refused.inc(report["subscriptions_refused"])
        if report.get("publishes_denied"):
            self.mqtt_publishes_denied.inc(report["publishes_denied"])
        for reason in ("silent", "protocol", "closed"):
            if report.get("lost_" + reason):
                self.mqtt_sessions_lost.labels(reason).inc(report["lost_" + reason])
        if "connected" in report:
            self.mqtt_connected.set(1 if report["connected"] else 0)
        if report.get("latency"):
            self.publish_latency.add(report["latency"])

    def value(self, name, **labels):
        """Current value of a sample, e.g. value("binlink_frames_rejected_total", reason="crc")."""
        return self.registry.get_sample_value(name, labels) or 0

    def snapshot(self):
        """Readable nested JSON for the stats topic: {"frames_read_total": {"lora0": 12}, "outbox_depth": 0, ...}."""
        out = {}
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name.endswith(("_created", "_bucket")):
                    continue
                key = s.name.removeprefix("binlink_")
                if s.labels:
                    out.setdefault(key, {})[",".join(s.labels[k] for k in sorted(s.labels))] = s.value
                else:
                    out[key] = s.value
        return out

    def serve(self, host, port):
        """The text exposition on HTTP: (server, its thread). Said at start when it listens beyond
        this host: the metrics name bins and count their frames and rejections."""
        host = host.strip("[]")  # "[::1]:9108"
        server = _MetricsServer((host, port), MetricsHandler.factory(self.registry))
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        if not _loopback(host):
            logs.event(log, logging.WARNING, "metrics endpoint reachable from other hosts: it names bins and counts "
                       "their frames and rejections; listen on 127.0.0.1 or firewall it", listen="%s:%d" % (host, port))
        return server, thread


class _MetricsServer(ThreadingHTTPServer):
    """At most MAX_CONNECTIONS open, each closed after CONNECTION_TIMEOUT_S of silence: idle
    connections cannot use up the process's file descriptors or keep a scrape out."""
    daemon_threads = True
    request_queue_size = 128  # a burst of connections waits to be accepted, rather than retrying a second later

    def __init__(self, address, handler):
        self._open = OrderedDict()  # socket -> None, oldest first
        self._open_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        request.settimeout(CONNECTION_TIMEOUT_S)
        with self._open_lock:
            if len(self._open) >= MAX_CONNECTIONS:
                oldest, _ = self._open.popitem(last=False)
                try:
                    oldest.shutdown(socket.SHUT_RDWR)  # its thread reads the end and closes it
                except OSError:
                    pass  # the peer closed it meanwhile
            self._open[request] = None
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def open_connections(self):
        with self._open_lock:
            return len(self._open)


def _loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "" (every address) or a name
        return False
