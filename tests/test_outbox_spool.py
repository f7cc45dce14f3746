"""The state file held by one process: the spool other commands queue through (outbox_spool.py),
the rows the publisher asks the service for (outbox_feed.py), the RAM mark that finds a WAL which
lost committed frames (storage.CommitMark), and that no second process can open the file."""
import json
import os
import sqlite3

import pytest
from hypothesis import given, strategies as st

from binlink.gateway import outbox_feed, outbox_spool, storage
from binlink.gateway.outbox import Batch, Message, Outbox


def test_what_put_writes_read_gives_back(tmp_path):
    messages = [("retire:0000b2:%d" % i, "binlink/city/bin/bin-b/state%d" % i) for i in range(12)]
    path = outbox_spool.put(str(tmp_path), messages, now=1790000000.5)
    assert outbox_spool.pending(str(tmp_path)) == [path]
    assert outbox_spool.read(path) == (1790000000.5, messages)
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
    outbox_spool.done(path)
    assert outbox_spool.pending(str(tmp_path)) == []


@pytest.mark.parametrize("content, problem", [
    (b"", "unreadable"),
    (b"\xff\xfe garbage", "unreadable"),
    (b"[]", "not a spool file"),
    (b'{"at": 1, "messages": [], "extra": 1}', "not a spool file"),
    (b'{"at": "now", "messages": [{"key": "k", "topic": "t"}]}', "at: not a time"),
    (b'{"at": 1, "messages": []}', "messages: 1 to"),
    (b'{"at": 1, "messages": [{"key": "k", "topic": "a/#"}]}', "not a topic to publish to"),
    (b'{"at": 1, "messages": [{"key": "", "topic": "t"}]}', "key: 1 to"),
    (b'{"at": 1, "messages": [{"key": "k", "topic": "t", "payload": "x"}]}', "key and topic only"),
    (json.dumps({"at": 1, "messages": [{"key": "k", "topic": "t"}] * (outbox_spool.MAX_MESSAGES + 1)}).encode(), ""),
])
def test_a_spool_file_not_as_put_writes_it_is_refused_naming_why(tmp_path, content, problem):
    path = str(tmp_path / "x.json")
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(ValueError) as e:
        outbox_spool.read(path)
    assert problem in str(e.value)
    outbox_spool.reject(path)
    assert os.listdir(str(tmp_path)) == ["x.rejected"]


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode)
       | st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                      lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(["at", "messages", "key", "topic", "x"]), c, max_size=4),
                      max_leaves=20).map(lambda v: json.dumps(v).encode()))
def test_any_spool_file_is_read_or_refused_never_raises_otherwise(tmp_path_factory, content):
    path = str(tmp_path_factory.mktemp("spool") / "f.json")
    with open(path, "wb") as f:
        f.write(content)
    try:
        at, messages = outbox_spool.read(path)
    except ValueError:
        return
    assert isinstance(at, float) and messages and all(isinstance(k, str) and isinstance(t, str) for k, t in messages)


def _box_with_rows(tmp_path, n):
    box = Outbox(str(tmp_path / "gateway.sqlite"))
    batch = Batch()
    for i in range(n):
        batch.messages.append(Message("m%d" % i, "binlink/city/bin/b/event", '{"n":%d}' % i, False, 1.0 + i))
    box.commit(batch)
    return box


def test_the_service_hands_rows_over_as_stored_and_the_publisher_renders_them(tmp_path):
    box = _box_with_rows(tmp_path, 5)
    kind, number, rows, error = outbox_feed.answer(box, (7, 2, 2))
    assert (kind, number, error) == ("rows", 7, None)
    assert [r[0] for r in rows] == [3, 4] and rows == box.pending(2, 2)
    assert [(r[0], r[2]) for r in outbox_feed.rendered(rows)] == [(3, b'{"n":2}'), (4, b'{"n":3}')]
    box.db.close()  # an unreadable file is said in the answer, not raised in the service
    kind, number, rows, error = outbox_feed.answer(box, (8, 0, 10))
    assert (kind, number, rows) == ("rows", 8, []) and error.startswith("cannot read the outbox")


def test_no_other_process_opens_the_state_file_while_it_is_held_and_there_is_no_shm(tmp_path):
    box = _box_with_rows(tmp_path, 3)
    assert not os.path.exists(box.path + "-shm")  # the WAL index stays in memory: nothing for the card
    other = sqlite3.connect(box.path, timeout=0.2)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("SELECT count(*) FROM outbox").fetchone()
    other.close()
    box.close()
    assert not os.path.exists(box.path + ".open") and not os.path.exists(box.path + "-wal")
    assert sqlite3.connect(box.path).execute("SELECT count(*) FROM outbox").fetchone()[0] == 3


def test_the_commit_mark_names_the_newest_row_of_this_very_file(tmp_path):
    box = _box_with_rows(tmp_path, 4)
    assert box.mark.read() == 4
    box.db.close()  # a crash: the mark stays, as the process's RAM disk keeps it
    assert storage.CommitMark(box.path).read() == 4
    os.replace(box.path, box.path + ".old")  # another file at the same path is not this mark's
    sqlite3.connect(box.path).execute("CREATE TABLE t (x)")
    assert storage.CommitMark(box.path).read() is None
    storage.CommitMark(box.path).close(remove=True)
