"""`binlink gateway check-config`: everything the gateway will meet, tried as the gateway will meet it.

Run as root, the checks that depend on who asks (files, the state directory, serial ports, the
broker's credentials) run in a child process as the service user (`binlink`, or --user), and the
output says which user. Errors (exit 2) stop the gateway or cost bins; warnings (exit 0) are things
the gateway rides out (a broker offline, a radio unplugged). --offline skips the broker."""
import errno
import json
import os
import pwd
import queue
import ssl
import sys
import tempfile

from binlink.gateway import config, registry

SERVICE_USER = "binlink"
BROKER_TIMEOUT_S = 10.0


def state_dir_problems(path, who):
    """The state directory made and written as the gateway will: its missing parents created (and
    removed again), a file written in it. `who` names the user in the problem."""
    made, existing = [], os.path.abspath(path)
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            return ["gateway.state_dir: %s is not a directory" % existing]
        made.append(existing)
        existing = os.path.dirname(existing)
    doing = "create %s in %s" % (made[-1], existing) if made else "write in %s" % path
    try:
        for d in reversed(made):
            os.mkdir(d, 0o750)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".check-config.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return ["gateway.state_dir: cannot %s as %s: %s" % (doing, who, e.strerror or e)]
    finally:
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                pass
    return []


def serial_problems(cfg, who):
    """(errors, warnings): each source's port opened as the gateway opens it. Absent or busy is a
    warning (the gateway waits for the radio and reopens it); not allowed is an error."""
    errors, warnings = [], []
    for i, s in enumerate(cfg.sources):
        key = "source[%d].port" % i
        if not os.path.exists(s.port):
            warnings.append("%s: %s does not exist (radio unplugged? ls -l /dev/serial/by-id/); the gateway waits "
                            "for it" % (key, s.port))
            continue
        try:
            os.close(os.open(s.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
        except PermissionError:
            errors.append("%s: %s cannot be opened by %s: permission denied (the service user needs the group "
                          "that owns it, usually dialout)" % (key, s.port, who))
        except OSError as e:
            (warnings if e.errno in (errno.EBUSY, errno.EAGAIN, errno.EIO) else errors).append(
                "%s: %s cannot be opened by %s: %s" % (key, s.port, who, e.strerror or e))
    return errors, warnings


def broker_problems(m):
    """(errors, warnings): a connection to the broker with the gateway's credentials and TLS.
    Unreachable is a warning (the outbox keeps readings); refused credentials, a TLS failure or a
    refusal of any kind are errors."""
    import paho.mqtt.client as mqtt

    where = "%s:%d" % (m.host, m.port)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="binlink-check-config-%d" % os.getpid())
    answers = queue.Queue()
    c.on_connect = lambda client, userdata, flags, rc, props: answers.put(rc)
    try:
        config.apply_mqtt_settings(c, m)
        c.connect(m.host, m.port, keepalive=30)
    except ssl.SSLError as e:
        return ["mqtt: TLS with the broker at %s failed: %s (mqtt.ca_file, mqtt.cert_file)" % (where, e)], []
    except (OSError, ValueError) as e:
        return [], ["mqtt: cannot reach the broker at %s: %s; the gateway keeps readings in its outbox until it can "
                    "(--offline skips this check)" % (where, getattr(e, "strerror", None) or e)]
    c.loop_start()
    try:
        rc = answers.get(timeout=BROKER_TIMEOUT_S)
    except queue.Empty:
        return [], ["mqtt: the broker at %s did not answer within %d s" % (where, BROKER_TIMEOUT_S)]
    finally:
        c.loop_stop()
        c.disconnect()
    if rc.is_failure:
        who = "user %r" % m.username if m.username else "an anonymous connection"
        return ["mqtt: the broker at %s refused %s: %s (mqtt.username, mqtt.password_file)" % (where, who, rc)], []
    return [], []


def inline_secret_problems(cfg, path):
    """A password written in the config itself is only as private as the config file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []
    if cfg.mqtt.password and mode & config.OTHERS:
        return ["mqtt.password: written in %s, which is readable by other users: move it to mqtt.password_file "
                "(mode 0640, root:binlink) or chmod 640 %s" % (path, path)]
    return []


def checks(cfg, path, offline, who):
    """(errors, warnings, device count) as the current user."""
    try:
        open(path, "rb").close()
    except OSError as e:
        return (["%s: cannot be read by %s: %s (the service reads it: chown root:binlink, chmod 640)"
                 % (path, who, e.strerror or e)], [], 0)
    own = state_dir_problems(cfg.state_dir, who)  # tried for real; check_files asks os.access
    errors = [p for p in config.check_files(cfg) if not (own and p.startswith("gateway.state_dir:"))] + own
    warnings = []
    devices = 0
    try:
        reg = registry.load(cfg.registry, strict=False)
        devices = len(reg)
        errors += ["gateway.registry: %s (the gateway starts without this bin)" % p for p in reg.rejected]
    except config.ConfigError as e:
        errors += ["gateway.registry: %s" % p for p in e.problems]
    e, w = serial_problems(cfg, who)
    errors, warnings = errors + e, warnings + w
    if not offline:
        e, w = broker_problems(cfg.mqtt)
        errors, warnings = errors + e, warnings + w
    return errors, warnings, devices


def as_user(user, fn):
    """fn() in a child process running as user (with its groups); its JSON-able result comes back.
    A failure in the child raises RuntimeError with its one-line reason."""
    pw = pwd.getpwnam(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, run, report, exit without the parent's cleanup
        try:
            os.close(r)
            os.setgroups(os.getgrouplist(user, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            out = {"ok": fn()}
        except BaseException as e:  # noqa: BLE001 (said by the parent in one line, never a traceback)
            out = {"error": "%s: %s" % (type(e).__name__, e)}
        with os.fdopen(w, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    try:
        out = json.loads(data)
    except ValueError:
        raise RuntimeError("the check as user %s ended without an answer" % user) from None
    if "error" in out:
        raise RuntimeError("as user %s: %s" % (user, out["error"]))
    return out["ok"]


def who_checks(user):
    """(user to run the checks as or None for this process, the words naming it)."""
    if os.geteuid() != 0:
        try:
            name = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # a container's uid without a passwd entry
            name = "?"
        return None, "user %s (uid %d)" % (name, os.geteuid())
    name = user or SERVICE_USER
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if user:
            raise config.ConfigError(["--user %s: no such user" % user]) from None
        return None, "root, for there is no user %s here" % SERVICE_USER
    return (None if pw.pw_uid == 0 else name), "user %s (uid %d)" % (name, pw.pw_uid)


def run(path, offline=False, user=None):
    cfg = config.load(path)
    run_as, who = who_checks(user)
    if run_as is None:
        errors, warnings, devices = checks(cfg, path, offline, who)
    else:
        try:
            errors, warnings, devices = as_user(run_as, lambda: checks(cfg, path, offline, who))
        except RuntimeError as e:
            errors, warnings, devices = ["check-config %s" % e], [], 0
    errors += inline_secret_problems(cfg, path)
    for w in warnings:
        print("warning: %s" % w, file=sys.stderr)
    for e in errors:
        print("config error: %s" % e, file=sys.stderr)
    if errors:
        print("%s: %d problems (checked as %s)" % (path, len(errors), who), file=sys.stderr)
        return 2
    print("%s: ok (%d sources, %d devices, publishing under %s; checked as %s%s)"
          % (path, len(cfg.sources), devices, cfg.base_topic, who, "; broker not checked: --offline" if offline else ""))
    if cfg.redis.enabled:  # a warning, not an error: the gateway starts and works without Redis
        from binlink.gateway.metrics import Metrics
        from binlink.gateway.shared_state import SharedState

        up = SharedState(cfg.redis, Metrics(), cfg.gateway_id).up
        print("redis %s: %s" % (cfg.redis.url or cfg.redis.sentinel_master,
                                "reachable" if up else "NOT reachable (the gateway will work on local state)"),
              file=sys.stdout if up else sys.stderr)
    return 0
