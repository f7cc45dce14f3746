"""Outbox rows handed from the service, which owns the state file, to the publisher process.

The service holds the outbox with exclusive locking: SQLite then keeps the WAL index in the
service's memory instead of a -shm file that the kernel writes back to the SD card every ~30 s
(a third of what a site reading every 30 s writes; docs/gateway.md, "SD-card write volume"). No
other process can open the file meanwhile, so the publisher asks for rows over its connection:
("pending", number, after id, limit), answered between two group commits with ("rows", number,
rows as stored, error or None). Payloads are rendered in the publisher, as before."""
import sqlite3
import time

from binlink.gateway import payloads

WAIT_S = 30.0  # the service answers between its commits: this long without an answer means it is stuck


class ServiceGone(Exception):
    """The service's end of the connection closed: the publisher process ends."""


class OutboxUnavailable(Exception):
    """The service could not hand rows over: its file unreadable, or no answer within WAIT_S."""


class Rows:
    """The publisher's side: pending() asks and waits; handle(kind, args) takes whatever else the
    service sends meanwhile (stop, bins, firmware, stats)."""

    def __init__(self, conn, handle):
        self.conn = conn
        self.handle = handle
        self.asked = 0  # the number of the last request: a late answer to an earlier one is dropped

    def pending(self, after, limit):
        """Unacknowledged rows after id `after`, oldest first: (id, topic, payload JSON or None when
        unreadable, retain, received_at). Raises ServiceGone or OutboxUnavailable."""
        self.asked += 1
        try:
            self.conn.send(("pending", self.asked, after, limit))
            deadline = time.monotonic() + WAIT_S
            while self.conn.poll(max(0.0, deadline - time.monotonic())):
                kind, *args = self.conn.recv()
                if kind != "rows":
                    self.handle(kind, args)
                elif args[0] == self.asked:
                    if args[2] is not None:
                        raise OutboxUnavailable(args[2])
                    return rendered(args[1])
        except (EOFError, OSError) as e:
            raise ServiceGone() from e
        raise OutboxUnavailable("the service did not answer for %d s" % WAIT_S)


def rendered(rows):
    """Outbox.pending() rows with their payloads as published: JSON, or None for a row that cannot
    be read (damaged on disk)."""
    return [(i, topic, payloads.readable(p), retain, at) for i, topic, p, retain, at in rows]


def answer(box, request):
    """The service's side: the ("rows", ...) message for a ("pending", ...) request."""
    number, after, limit = request
    try:
        return ("rows", number, box.pending(after, limit), None)
    except sqlite3.Error as e:
        return ("rows", number, [], "cannot read the outbox: %s" % e)
