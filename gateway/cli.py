"""`binlink` command line: decode, gateway (and check-config), registry, watch, plan; sim and demo (extra binlink[sim])."""
import argparse
import json
import os
import sys

import binlink
from binlink.wire import codec


def _hex(text):
    try:
        return bytes.fromhex(text.strip().replace(" ", ""))
    except ValueError:
        raise argparse.ArgumentTypeError("not hex: %r" % text) from None


def cmd_decode(args):
    frame = args.frame
    try:
        if args.key is None:
            ftype, device_id, fcnt_low = codec.parse_header(frame)
            print("warning: no --key given, tag not verified", file=sys.stderr)
            out = codec.decode_body(frame, fcnt_low)
            out["verified"] = False
        else:
            out = codec.decode(frame, args.key, args.last_fcnt)
    except codec.ProtocolError as e:
        print("rejected: %s%s" % (e.reason, " (%s)" % e.detail if e.detail else ""), file=sys.stderr)
        return 2
    except ValueError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    print(json.dumps(out, sort_keys=True))
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="binlink", description=__doc__)
    p.add_argument("--version", action="version", version="binlink %s" % binlink.__version__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("decode", help="verify and decode one frame given in hex")
    d.add_argument("frame", type=_hex, metavar="FRAME_HEX")
    d.add_argument("--key", type=_hex, help="device key, 32 hex digits")
    d.add_argument("--last-fcnt", type=int, default=None, help="last accepted frame counter")
    d.set_defaults(func=cmd_decode)

    g = sub.add_parser("gateway", help="run the gateway service, or check its config")
    g.add_argument("--config", default="/etc/binlink/gateway.toml", help="TOML config (default: %(default)s)")
    g.set_defaults(func=cmd_gateway)
    gsub = g.add_subparsers(dest="gateway_command")
    cc = gsub.add_parser("check-config", help="validate a config and its device registry, naming every problem")
    cc.add_argument("path")
    cc.add_argument("--offline", action="store_true", help="do not connect to the MQTT broker")
    cc.add_argument("--user", default=None, help="run as root: check as this user (default: binlink, the service's)")
    cc.set_defaults(func=cmd_check_config)

    from binlink.gateway import planner, registry_cli, watch
    from binlink.sim import cli as sim_cli, demo  # stdlib at import; their packages load when run

    planner.add_parsers(sub)  # `binlink planner` (service) and `binlink plan` (view)

    registry_cli.add_parser(sub)
    watch.add_parser(sub)
    sim_cli.add_parser(sub)
    demo.add_parser(sub)
    return p


def _config_errors(problems):
    for problem in problems:
        print("config error: %s" % problem, file=sys.stderr)
    return 2


def cmd_check_config(args):
    from binlink.gateway import config, config_checks

    try:
        return config_checks.run(args.path, offline=args.offline, user=args.user)
    except config.ConfigError as e:
        return _config_errors(e.problems)


def cmd_gateway(args):
    from binlink.gateway import config, service

    try:
        return service.run(args.config)
    except config.ConfigError as e:
        return _config_errors(e.problems)


def _permission_hint(args, e):
    """One line for a PermissionError: the file, the user, and what to do."""
    import pwd

    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = "uid %d" % os.geteuid()
    what = e.filename or str(e)
    line = "error: permission denied: %s (as user %s)" % (what, user)
    if getattr(args, "command", None) == "registry":
        line += ": run it as root (sudo binlink registry ...): the registry keeps its owner, group and mode"
    return line


def main(argv=None):
    """Every command ends in one line, never a traceback, for what a user can meet: Ctrl-C (exit
    130), a missing permission or an unreachable service (exit 1), a bad config (exit 2)."""
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except PermissionError as e:
        print(_permission_hint(locals().get("args"), e), file=sys.stderr)
        return 1
    except BrokenPipeError:  # `binlink registry list | head`
        sys.stderr.close()
        return 1
    except ConnectionError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1


def _run(args):
    if args.command == "registry":
        from binlink.gateway import config

        try:
            from redis import RedisError
        except ImportError:  # only a [redis] config needs it; the file alone works without
            RedisError = ()
        try:
            return args.func(args)
        except config.ConfigError as e:
            return _config_errors(e.problems)
        except RedisError as e:  # the file is written; the shared registry is not
            print("error: shared registry (Redis): %s; run `binlink registry push` when it answers" % type(e).__name__,
                  file=sys.stderr)
            return 1
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        if args.command not in ("sim", "demo"):
            raise
        # a gateway install: the simulator's packages are the extra binlink[sim]
        print("error: `binlink %s` needs the simulator extra: pip install 'binlink[sim]' (missing %s)" % (args.command, e.name),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
