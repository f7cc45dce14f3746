"""`make demo` stopped as the README says: Ctrl-C in the terminal, i.e. SIGINT to its whole process group."""
import os
import signal
import subprocess
import time

from tests.harness import BINLINK


def test_ctrl_c_stops_the_demo_with_a_summary_that_adds_up():
    p = subprocess.Popen([BINLINK, "demo", "--bins", "20", "--seconds", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(12)  # broker, gateway and fleet up, frames flowing
        os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole foreground group
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-2000:]
    assert "Traceback" not in out + err
    fields = {k: int(v) for k, v in (kv.split("=") for kv in out.strip().splitlines()[-1].split())}
    assert fields["sent"] > 0 and fields["lost_after_gateway"] == 0
    assert fields["sent"] == fields["published"] + fields["hellos"] + fields["lost_on_air"] + fields["rejected"]
