"""Clearing messages another process queues for the gateway's outbox (`binlink registry retire`).

The service holds the state file alone (storage.connect: exclusive locking), so a command run
beside it leaves a spool file in <state_dir>/spool instead; the service takes it in within a
second (at its next start when it is not running), commits its messages and deletes it. What a
spool file holds is input like any frame: a file that is not exactly what put() writes is set
aside as <name>.rejected and said in the log, never half taken."""
import json
import math
import os
import time

from binlink.gateway import storage

DIR = "spool"
MAX_MESSAGES = 1000  # a retired bin's state and discovery topics are a dozen
MAX_KEY, MAX_TOPIC = 256, 1024


def put(state_dir, messages, now=None):
    """messages: [(message key, topic)], each an empty retained payload. Atomic: a reader sees the
    whole file or none of it. Returns its path."""
    spool = os.path.join(state_dir, DIR)
    os.makedirs(spool, exist_ok=True)
    now = time.time() if now is None else now
    path = os.path.join(spool, "%.6f-%d.json" % (now, os.getpid()))
    with open(path + ".tmp", "w") as f:
        json.dump({"at": now, "messages": [{"key": k, "topic": t} for k, t in messages]}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    storage.sync_folder(path)  # a retire's clears survive a power cut once it said they are queued
    return path


def pending(state_dir):
    """Spool files waiting, oldest first."""
    spool = os.path.join(state_dir, DIR)
    try:
        names = sorted(n for n in os.listdir(spool) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    return [os.path.join(spool, n) for n in names]


def read(path):
    """(at, [(key, topic)]) of a spool file; ValueError naming what is wrong with it."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_MESSAGES * (MAX_KEY + MAX_TOPIC + 40) + 100))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError("unreadable: %s" % e) from None
    if not isinstance(data, dict) or set(data) != {"at", "messages"}:
        raise ValueError("not a spool file: keys must be at and messages")
    at, messages = data["at"], data["messages"]
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at < 0:
        raise ValueError("at: not a time")
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        raise ValueError("messages: 1 to %d expected" % MAX_MESSAGES)
    out = []
    for m in messages:
        if not isinstance(m, dict) or set(m) != {"key", "topic"}:
            raise ValueError("a message must have key and topic only")
        key, topic = m["key"], m["topic"]
        if not (isinstance(key, str) and 0 < len(key) <= MAX_KEY):
            raise ValueError("key: 1 to %d characters expected" % MAX_KEY)
        if not (isinstance(topic, str) and 0 < len(topic) <= MAX_TOPIC) or any(c in topic for c in "+#\0"):
            raise ValueError("topic %r: not a topic to publish to" % topic[:80] if isinstance(topic, str) else "topic: not text")
        out.append((key, topic))
    return float(at), out


def reject(path):
    """Sets a bad file aside (kept for a person to look at, never read again)."""
    os.replace(path, path[:-len(".json")] + ".rejected")


def done(path):
    os.unlink(path)
