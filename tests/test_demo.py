"""`make demo` stopped as the README says: Ctrl-C in the terminal, i.e. SIGINT to its whole process group."""
import os
import re
import signal
import subprocess
import threading

from tests.harness import BINLINK, Subscriber, wait_for, wait_port


def test_ctrl_c_stops_the_demo_with_a_summary_that_adds_up():
    p = subprocess.Popen([BINLINK, "demo", "--bins", "20", "--seconds", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = [], []

    def read(f, into):
        for line in f:
            into.append(line)

    readers = [threading.Thread(target=read, args=(f, into), daemon=True) for f, into in ((p.stdout, out), (p.stderr, err))]
    for r in readers:
        r.start()
    sub = None
    try:
        # the demo names its broker's port; frames flowing = readings published by its gateway, which
        # happens only once the fleet runs, the moment the live view (where Ctrl-C is handled) starts
        line = wait_for(lambda: next((m for m in map(re.compile(r"broker .* on 127\.0\.0\.1:(\d+)").search, out) if m), None)
                        or p.poll() is not None, timeout=60, what="the demo's broker")
        assert p.poll() is None, "".join(out + err)[-2000:]
        wait_port(int(line.group(1)), timeout=30)  # named as it starts: on a loaded host it may not listen yet
        sub = Subscriber(int(line.group(1)), topics=("binlink/demo/#",))
        wait_for(lambda: len(sub.events()) >= 20 or p.poll() is not None, timeout=90, what="readings published")
        assert p.poll() is None, "".join(out + err)[-2000:]
        os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole foreground group
        p.wait(timeout=90)
    finally:
        if sub is not None:
            sub.close()
        if p.poll() is None:
            p.kill()
    for r in readers:
        r.join(10)
    out, err = "".join(out), "".join(err)
    assert p.returncode == 0, err[-2000:]
    assert "Traceback" not in out + err
    fields = {k: int(v) for k, v in (kv.split("=") for kv in out.strip().splitlines()[-1].split())}
    assert fields["sent"] > 0 and fields["lost_after_gateway"] == 0
    assert fields["sent"] == fields["published"] + fields["hellos"] + fields["lost_on_air"] + fields["rejected"]
