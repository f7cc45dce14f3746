"""Resynchronisation under forgery, in process (the real pipeline and codec, a clock of our own):
how many genuine reports a bin whose counter this gateway lost sends before it is placed again
while a forger follows each report with forged frames naming it, and what held frames cost in
memory when a forger names 1,000 bins."""
import gc
import logging
import random
import tempfile
import time
import tracemalloc

from binlink.wire import codec
from binlink.gateway import config
from binlink.gateway.metrics import Metrics
from binlink.gateway.module_formats import Reception
from binlink.gateway.outbox import Outbox
from binlink.gateway.pipeline import Pipeline
from binlink.gateway.registry import Device

REPORT_S = 900
FIRST_FCNT = 70000  # past 65,536: 16 bits alone cannot place it
FORGER_KEY = bytes(range(16))  # TEST KEY, no bin's


def _key(device_id):
    return bytes([device_id % 251 + 1]) * 16  # TEST KEYS


def make_pipeline(tmp, device_ids):
    cfg = config.parse({"gateway": {"id": "g", "site": "s", "registry": "r", "state_dir": tmp}, "source": []})
    devices = {d: Device(d, "bin-%d" % d, _key(d), 1200, 200) for d in device_ids}
    clock = [time.time()]  # a plausible clock: the pipeline says so when it is not
    pipeline = Pipeline(cfg, devices, Outbox("%s/o.sqlite" % tmp), Metrics(), clock=lambda: clock[0])
    return pipeline, clock


def _forged(rng, device_id, fcnt_near):
    """A frame naming the bin, its 16 counter bits those the bin will send next or random ones."""
    fcnt = fcnt_near + rng.randrange(1, 12) if rng.random() < 0.5 else rng.randrange(0x10000)
    return codec.encode_reading(FORGER_KEY, device_id, fcnt, rng.randrange(2000), 20, 3700, 0, 5, 5)


def reports_needed(forged_per_report=10, decoys=0, forged_first=False, seed=1, max_reports=20):
    """Genuine reports bin 1 sends before the gateway places its counter again. A forger sends
    forged_per_report frames naming it after each report (before it, with forged_first), and as
    many naming each of `decoys` other bins."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        p, clock = make_pipeline(tmp, range(1, decoys + 2))
        try:
            for report in range(1, max_reports + 1):
                fcnt = FIRST_FCNT + report
                genuine = codec.encode_reading(_key(1), 1, fcnt, 700, 20, 3700, 0, 5, 5)
                forged = [_forged(rng, d, fcnt) for d in range(1, decoys + 2) for _ in range(forged_per_report)]
                rng.shuffle(forged)
                for frame in ([*forged, genuine] if forged_first else [genuine, *forged]):
                    clock[0] += 0.5
                    p.process([("radio0", Reception(frame))])
                if 1 in p.counters:
                    assert p.counters[1] == fcnt
                    return report
                clock[0] += REPORT_S
            return None
        finally:
            p.close()


def held_frames_mb(bins=1000, frames_per_bin=40, seed=1):
    """MB the pipeline holds after a forger sent frames_per_bin forged frames naming each of
    `bins` bins (traced allocations, after a collection)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        p, clock = make_pipeline(tmp, range(1, bins + 1))
        try:
            frames = [_forged(rng, d, FIRST_FCNT) for d in range(1, bins + 1) for _ in range(frames_per_bin)]
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i in range(0, len(frames), 100):
                    clock[0] += 0.1
                    p.process([("radio0", Reception(f)) for f in frames[i:i + 100]])
                del frames
                gc.collect()
                return (tracemalloc.get_traced_memory()[0] - before) / 1e6, len(p.resync)
            finally:
                tracemalloc.stop()
        finally:
            p.close()


def run():
    logging.disable(logging.WARNING)  # the forger's thousands of rejections, one line each
    try:
        mb, _ = held_frames_mb()
        needed = [reports_needed(forged_first=first) for first in (False, True)]
    finally:
        logging.disable(logging.NOTSET)
    return {"resync_under_forgery_reports_needed": None if None in needed else max(needed),
            "held_frames_mb_1000_bins": round(mb, 1)}


if __name__ == "__main__":
    print(run())
