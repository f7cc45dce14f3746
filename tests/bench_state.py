"""State and radio benchmarks against the real gateway process (real pty, real Mosquitto).

- radio_replug_gap_s: a frame stream at STREAM_FPS while the pty is removed and recreated at the
  same path REPLUGS times; frames written while the port existed but never published, as seconds
  of stream per replug (the time from a radio's return to the gateway reading it again).
- state_loss_replays_accepted: the state file (and its WAL) deleted after a kill -9, the recorded
  frames played back: how many the restarted gateway accepts again.
- storage_kb_written_per_reading: write_bytes of /proc/PID/io of the gateway process (every byte it
  sent towards the disk: WAL, checkpoints, -shm; its log, on stdout, goes to a file here) per
  reading, at one frame a second from 20 bins, the state directory on this machine's ext4 disk.
  Measured in steady state: a burst first takes the state file past its first checkpoint, after
  which the WAL is rewritten in place; a gateway in service is there within its first hour.
  storage_kb_written_per_reading_every_5s: the same at one frame every 5 s, where what the kernel
  writes back on its own clock (the -shm files, every ~30 s) is shared by fewer readings;
  _every_30s: a site of 120 bins reporting hourly. Each reading then pays the -shm pages the
  kernel writes back every ~30 s on its own, and its acknowledgement a commit of its own
  (service.ACK_IDLE_S: measured, waiting a minute for the next reading's commit saves nothing
  here: 21.7 against 22.3 KB)"""
import os
import tempfile
import threading
import time

from binlink.wire import codec, framing
from binlink.gateway.service import ACK_IDLE_S
from binlink.sim.broker import Mosquitto
from binlink.sim.serial_link import PtyLink
from tests.harness import GatewayProcess, Subscriber, wait_for

KEYS = {d: bytes([d]) * 16 for d in range(1, 21)}  # TEST KEYS
STREAM_FPS = 100
REPLUGS = 20
UNPLUGGED_S = 2.5  # a person pulling a USB radio and putting it back
STEADY_WARMUP = 2000  # frames in a burst: more WAL frames than a checkpoint waits for (storage.CHECKPOINT_PAGES)


def _frame(dev, fcnt):
    return framing.frame(codec.encode_reading(KEYS[dev], dev, fcnt, 300 + fcnt % 800, 20, 3700, 0, 5, 5))


class _Rig:
    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="binlink-bench-state-", dir=os.environ.get("BENCH_STATE_DIR"))
        self.broker = Mosquitto().start()
        self.link = PtyLink(os.path.join(self.tmp, "radio0"))
        devices = [(d, "bin-%d" % d, k, 1200, 200) for d, k in KEYS.items()]
        self.gw = GatewayProcess(self.tmp, self.broker.port, [("radio0", self.link.link, "raw")], devices=devices).start()
        self.sub = Subscriber(self.broker.port, topics=("binlink/+/bin/+/event",))

    def ids(self):
        return {e["message_id"] for e in self.sub.events()}

    def close(self):
        self.gw.kill()
        self.sub.close()
        self.link.close()
        self.broker.stop()


def replug_gap():
    rig = _Rig()
    written = []  # fcnt of every frame the line took (the radio was there and its buffer had room)
    stop = threading.Event()
    lock = threading.Lock()  # a write and an unplug do not interleave

    def stream():
        fcnt, t0 = 0, time.perf_counter()
        while not stop.is_set():
            fcnt += 1
            with lock:
                if _write_nonblocking(rig.link, _frame(1, fcnt)):
                    written.append(fcnt)
            time.sleep(max(0.0, t0 + fcnt / STREAM_FPS - time.perf_counter()))

    try:
        t = threading.Thread(target=stream)
        t.start()
        for _ in range(REPLUGS):
            time.sleep(1.5)
            with lock:
                rig.link.unplug()
            time.sleep(UNPLUGGED_S)
            with lock:
                rig.link.plug()
        time.sleep(1.5)
        stop.set()
        t.join()
        want = {"000001:0:%d" % n for n in written}
        wait_for(lambda: rig.gw.metric("binlink_outbox_depth") == 0 and rig.gw.metric("binlink_frames_accepted_total") > 0,
                 what="stream published")
        time.sleep(1)
        lost = len(want - rig.ids())
        return round(lost / STREAM_FPS / REPLUGS, 2)
    finally:
        rig.close()


def _write_nonblocking(link, frame):
    """A radio does not wait for a host that is not reading: a frame the line cannot take is lost."""
    if link.master is None:
        return False
    os.set_blocking(link.master, False)
    try:
        return os.write(link.master, frame) == len(frame)
    except BlockingIOError:
        return False


def replays_after_state_loss(n=300):
    rig = _Rig()
    try:
        recorded = [_frame(1 + i % 20, 1 + i // 20) for i in range(n)]
        rig.link.write(b"".join(recorded))
        wait_for(lambda: len(rig.ids()) == n, what="recorded frames published")
        wait_for(lambda: rig.gw.metric("binlink_outbox_depth") == 0, what="all published")
        rig.gw.kill()
        db = os.path.join(rig.tmp, "state", "gateway.sqlite")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.unlink(db + suffix)
        rig.gw.start()
        rig.link.write(b"".join(recorded))
        wait_for(lambda: rig.gw.metric("binlink_frames_read_total") == n, what="replays read")
        return int(rig.gw.metric("binlink_frames_accepted_total"))
    finally:
        rig.close()


def _write_bytes(pid):
    with open("/proc/%d/io" % pid) as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/%d/io" % pid)


def storage_per_reading(frames=60, fps=1.0, steady=True):
    """KB the gateway process writes per reading at fps. steady: measured once the state file is
    past its first checkpoint (a burst of STEADY_WARMUP frames), where a gateway in service always
    is: the WAL is then rewritten in place, and the figure is what the card sees for years. Else
    a new state file, whose WAL is still growing (its first ~1,000 commits, an hour or so)."""
    rig = _Rig()
    try:
        pid = rig.gw.proc.pid
        warmup = STEADY_WARMUP if steady else 20
        for i in range(warmup):
            rig.link.write(_frame(1 + i % 20, 1 + i // 20))
            time.sleep(0.005 if steady else 1.0 / fps)
        wait_for(lambda: rig.gw.metric("binlink_frames_accepted_total") == warmup, what="warm-up accepted", timeout=120)
        wait_for(lambda: rig.gw.metric("binlink_outbox_depth") == 0, what="warm-up published", timeout=120)
        time.sleep(ACK_IDLE_S + 1.0)  # the warm-up's acknowledgements written
        wal = os.path.join(rig.tmp, "state", "gateway.sqlite-wal")
        wal_size = os.path.getsize(wal)
        before, t0 = _write_bytes(pid), time.perf_counter()
        for i in range(warmup, warmup + frames):
            rig.link.write(_frame(1 + i % 20, 1 + i // 20))
            time.sleep(max(0.0, t0 + (i - warmup + 1) / fps - time.perf_counter()))
        wait_for(lambda: rig.gw.metric("binlink_frames_accepted_total") == warmup + frames, what="all accepted")
        wait_for(lambda: rig.gw.metric("binlink_outbox_depth") == 0, what="all published")
        time.sleep(ACK_IDLE_S + 1.0)  # the last acknowledgements, written on their own, count too
        if steady and os.path.getsize(wal) > wal_size:
            raise RuntimeError("the WAL grew while measuring: the warm-up did not reach its first checkpoint")
        return round((_write_bytes(pid) - before) / frames / 1024, 1)
    finally:
        rig.close()


def run():
    return {
        "radio_replug_gap_s": replug_gap(),
        "state_loss_replays_accepted": replays_after_state_loss(),
        "storage_kb_written_per_reading": storage_per_reading(),
        "storage_kb_written_per_reading_every_5s": storage_per_reading(frames=36, fps=0.2),
        "storage_kb_written_per_reading_every_30s": storage_per_reading(frames=12, fps=1 / 30.0),
    }
