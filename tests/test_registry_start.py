"""One bad registry entry costs one bin, not the site (issue 22): the real gateway process started and
reloaded with a registry holding bad entries, Mosquitto and a pty."""
import os
import signal
import subprocess

from binlink.wire import codec, framing
from tests.harness import KEY, GatewayProcess, wait_for


def test_one_bad_registry_entry_costs_its_bin_not_the_site(tmp_path, broker, pty):
    """At start a registry with a bad entry: that entry is skipped with an ERROR naming its bin and
    line and counted (binlink_registry_entries_rejected); the other bins' frames are accepted."""
    g = GatewayProcess(tmp_path, broker.port, [("radio0", pty.link, "raw")], devices=[(0xA1, "good-bin", KEY, 1200, 200)])
    with open(g.registry, "a") as f:
        f.write('\n[[device]]\ndevice_id = "0000b2"\nbin_id = "bad-bin"\nkey = "%s"\ndepth_mm = 1200\nfull_mm = 200\n'
                'lat = 95.0\nlon = 5.0\n' % KEY.hex())
    lines = open(g.registry).read().splitlines()
    line = len(lines) - lines[::-1].index("[[device]]")  # the bad entry's header, 1-based
    r = subprocess.run([os.path.join(os.path.dirname(os.sys.executable), "binlink"), "gateway", "check-config", "--offline",
                        g.config], capture_output=True, text=True)
    assert r.returncode == 2 and "line %d, bin bad-bin: device[1].lat: 95.0 is out of range" % line in r.stderr, r.stderr
    g.start()
    try:
        assert g.metric("binlink_registry_entries_rejected") == 1
        pty.write(framing.frame(codec.encode_reading(KEY, 0xA1, 1, 700, 20, 3700, 0, 5, 5)))
        wait_for(lambda: g.metric("binlink_frames_accepted_total") == 1, what="the good bin's frame accepted")
        log = g.output()
        assert "REGISTRY ENTRY SKIPPED" in log and "line %d, bin bad-bin" % line in log and KEY.hex() not in log
        # a reload (systemctl reload) with a new bin and a second bad entry: the same rule
        with open(g.registry, "a") as f:
            f.write('\n[[device]]\ndevice_id = "0000c3"\nbin_id = "new-bin"\nkey = "%s"\ndepth_mm = 1200\nfull_mm = 200\n'
                    '\n[[device]]\ndevice_id = "0000d4"\nbin_id = "Bad Name"\nkey = "%s"\ndepth_mm = 1200\nfull_mm = 200\n'
                    % (KEY.hex(), KEY.hex()))
        g.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: g.metric("binlink_registry_entries_rejected") == 2, what="the reload's two rejections")
        pty.write(framing.frame(codec.encode_reading(KEY, 0xC3, 1, 700, 20, 3700, 0, 5, 5)))
        wait_for(lambda: g.metric("binlink_frames_accepted_total") == 2, what="the new bin's frame accepted")
        r = subprocess.run([os.path.join(os.path.dirname(os.sys.executable), "binlink"), "registry", "--registry",
                            g.registry, "list"], capture_output=True, text=True)
        assert r.returncode == 0 and "new-bin" in r.stdout and "good-bin" in r.stdout
        assert r.stderr.count("registry error:") == 2 and "bin 'Bad Name'" in r.stderr
    finally:
        g.terminate()
