"""Gateway metrics: Prometheus counters on a private registry, served as text on HTTP."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.frames_read = Counter("binlink_frames_read", "Receptions read from serial sources", ["source"], registry=r)
        self.accepted = Counter("binlink_frames_accepted", "Frames verified and committed to the outbox", registry=r)
        self.readings = Counter("binlink_readings_accepted", "Readings committed (backlog entries count one each)", registry=r)
        self.rejected = Counter("binlink_frames_rejected", "Frames rejected, by reason code", ["reason"], registry=r)
        self.duplicates = Counter("binlink_duplicates", "Same frame heard again (another radio or a repeat)", registry=r)
        self.module_status = Counter("binlink_module_status_lines", "Status lines from radio modules (+OK, +READY)", registry=r)
        self.serial_reopens = Counter("binlink_serial_reopens", "Serial port (re)opens after a failure", ["source"], registry=r)
        self.published = Counter("binlink_messages_published", "MQTT messages acknowledged by the broker (QoS 1)", registry=r)
        self.outbox_depth = Gauge("binlink_outbox_depth", "Messages waiting in the durable outbox", registry=r)
        self.mqtt_connected = Gauge("binlink_mqtt_connected", "1 while connected to the broker", registry=r)
        self.storage_full = Gauge("binlink_storage_full", "1 while the state disk is full and new frames are refused", registry=r)
        self.state_problems = Counter("binlink_state_problems", "Damaged or lost state found at start, by problem", ["problem"], registry=r)
        self.state_salvaged = Counter("binlink_state_salvaged_rows", "Rows carried over from a damaged state file, by table", ["table"], registry=r)
        self.counters_from_broker = Counter("binlink_counters_from_broker", "Frame counters raised from the broker's retained bin states at start", registry=r)
        self.clock_suspect = Gauge("binlink_clock_suspect", "1 while the system clock cannot be right (before the release date or behind the broker's states)", registry=r)
        self.publish_latency = Histogram(
            "binlink_publish_latency_seconds", "From reception to the broker's acknowledgement", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600),
        )

    def value(self, name, **labels):
        """Current value of a sample, e.g. value("binlink_frames_rejected_total", reason="crc")."""
        return self.registry.get_sample_value(name, labels) or 0

    def snapshot(self):
        out = {}
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name.endswith(("_created", "_bucket")):
                    continue
                key = s.name + "".join("{%s=%s}" % kv for kv in sorted(s.labels.items()))
                out[key] = s.value
        return out

    def serve(self, host, port):
        return start_http_server(port, addr=host, registry=self.registry)
