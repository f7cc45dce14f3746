"""How the publisher reacts when a broker session ends: Backoff spaces reconnects (and restarts of
the publisher process), DenialFinder works out which publish a broker's ACL denies when all the
broker does is drop the connection. Policy, not protocol: the wire is mqtt_wire's."""
import random


class Backoff:
    """Reconnect and restart delays: doubling up to a ceiling, with jitter (gateways that lost the same
    broker do not all come back in the same second), and back to the floor after a good run."""

    def __init__(self, low, high, good_after_s):
        self.low, self.high, self.good_after_s = low, high, good_after_s
        self.current = low

    def next_delay(self):
        delay = self.current * random.uniform(0.5, 1.0)
        self.current = min(self.high, self.current * 2)
        return delay

    def ran(self, seconds):
        """A session (or process) lasted this long: long enough, and the next failure starts from the floor."""
        if seconds >= self.good_after_s:
            self.current = self.low


class DenialFinder:
    """Which publish does the broker deny? Mosquitto 2.0.11 answers one its ACL refuses by dropping
    the connection (MQTT 3.1.1 and 5 alike), and the PUBACKs it had queued for the messages before
    it, and the refusal's own reason code, are lost with it. So: after a session lost with messages
    in flight, those messages go one at a time in the next session (`careful`); a loss then names the
    one message in flight. Named twice in a row (once is what a broker restart looks like), or once
    for a topic denied before, its topic is held back until `retry_s` has passed."""

    def __init__(self, retry_s):
        self.retry_s = retry_s
        self.careful_rows = 0  # outbox rows up to this id go one at a time ...
        self.careful_others = 0  # ... and this many status or discovery messages
        self.suspect = None
        self.held_back = {}  # topic -> when it is tried again
        self.denied_before = set()

    def session_lost(self, now, in_flight):
        """in_flight: [(outbox id or None, topic)] when the broker dropped the session. Returns the
        topic found denied (to log and count), or None."""
        found = None
        if self.careful() and len(in_flight) == 1:
            topic = in_flight[0][1]
            if topic == self.suspect or topic in self.denied_before:
                self.suspect, found = None, topic
                self.held_back[topic] = now + self.retry_s
                self.denied_before.add(topic)
            else:
                self.suspect = topic
        rows = [row_id for row_id, _ in in_flight if row_id is not None]
        self.careful_rows = max(self.careful_rows, max(rows, default=0))
        self.careful_others = max(self.careful_others, len(in_flight) - len(rows))
        return found

    def careful(self):
        return bool(self.careful_rows or self.careful_others)

    def progress(self, last_fed, others_left):
        """Ends careful sending once what was in flight has been sent again and answered."""
        if self.careful_rows and last_fed >= self.careful_rows:
            self.careful_rows = 0
        if not others_left:
            self.careful_others = 0

    def due(self, now):
        """Held-back topics whose time to be tried again has come (they are no longer held back)."""
        due = [t for t, at in self.held_back.items() if at <= now]
        for t in due:
            del self.held_back[t]
        return due
