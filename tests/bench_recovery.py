"""What start-up recovery believes of the broker (issue 18), against the real gateway process, a
real Mosquitto and a real pty; the scenarios are tests/test_recovery_trust.py's.

- recovery_poisoned_states: the size of the fixed set of hostile retained states (HOSTILE there).
- recovery_poisoned_states_rejected: how many of them the gateway refused (counted in
  binlink_readback_rejected_total{source="retained"}), the fewer of a start with its state intact
  and one after the state file was lost; goal: all of them.
- rekey_restart_readings_lost: readings 0..4 of a bin's new key refused after `binlink registry
  rekey`, summed over each order of events that follows it (clean restart, SIGKILL, state file lost
  with the old key's retained state on the broker, the same with a state from before key_epoch);
  goal 0 (issue 18 found them refused as replays: 20 of 20 by its finding, not measured here)."""
import os
import shutil
import tempfile

from binlink.sim.broker import Mosquitto
from binlink.sim.serial_link import PtyLink
from tests.harness import Subscriber
from tests.test_recovery_trust import HOSTILE, REKEY_ORDERS, poisoned_start, rekey_then


def _with_rig(scenario):
    """scenario(tmp, broker, pty, subscriber) on a fresh broker (no retained state of another run)."""
    tmp = tempfile.mkdtemp(prefix="binlink-bench-recovery-", dir=os.environ.get("BENCH_STATE_DIR"))
    broker = Mosquitto().start()
    link = PtyLink(os.path.join(tmp, "by-id-radio0"))
    sub = Subscriber(broker.port)
    try:
        return scenario(tmp, broker, link, sub)
    finally:
        sub.close()
        link.close()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def run():
    found, _ = _with_rig(poisoned_start)
    lost = sum(_with_rig(lambda tmp, broker, pty, sub, order=order: rekey_then(order, tmp, broker, pty, sub))
               for order in REKEY_ORDERS)
    return {
        "recovery_poisoned_states_rejected": int(min(refused for refused, _ in found.values())),
        "recovery_poisoned_states": len(HOSTILE),
        "rekey_restart_readings_lost": lost,
    }


if __name__ == "__main__":
    print(run())
