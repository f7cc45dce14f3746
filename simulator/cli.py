"""`binlink sim`: a seeded fleet of simulated bins writing to pseudo-terminals."""
import json
import logging
import os
import sys


def add_parser(sub):
    p = sub.add_parser("sim", help="run a simulated fleet into pseudo-terminals (the gateway reads them)")
    p.add_argument("--bins", type=int, default=20)
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per wall second (0: flat out)")
    p.add_argument("--duration", type=float, default=3600.0, help="simulated seconds to run")
    p.add_argument("--format", default="raw", choices=["raw", "raw+rssi", "rylr998"])
    p.add_argument("--link", action="append",
                   help="path of the pty symlink to create (repeat for several radios)")
    p.add_argument("--registry", help="device registry to write (keys included) for the gateway")
    p.add_argument("--report", metavar="FILE",
                   help="instead: compare trucks driven by the collection list with fixed weekly rounds over "
                        "--days (after a week of learning) and write a self-contained HTML report")
    p.add_argument("--days", type=float, default=30.0, help="with --report: simulated days compared (default: %(default)s)")
    p.add_argument("--chart-bins", type=int, default=6, help="with --report: bins drawn (default: %(default)s)")
    p.add_argument("--trucks", type=int, default=0,
                   help="with --report: route each listed round for this many trucks (VROOM) and compare with list order")
    p.add_argument("--truck-capacity", type=float, default=40.0, help="with --report --trucks: full bins' worth a truck carries")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--compile", action="store_true",
                   help="instead: compile the part models with Cython (from their source, with declarations of their slots; ~25 %% less CPU) and exit")
    p.add_argument("--vm", default="cpython", choices=["cpython", "micropython"], help="interpreter for the firmware")
    p.add_argument("--clock-file", help="write the simulated clock here: a gateway started with BINLINK_SIM_CLOCK=<file> "
                                        "and `binlink planner --sim-clock <file>` then live on simulated time (forecasts, rounds)")
    p.add_argument("--truth", help="write the ground truth (JSON) here at the end")
    p.add_argument("--loss", type=float, default=0.01, help="base loss rate of the radio channel")
    p.add_argument("--duplicates", type=float, default=0.01)
    p.add_argument("--bit-errors", type=float, default=0.002)
    p.add_argument("--linger", type=float, default=10.0, help="seconds to wait for the gateway to read the pty at the end")
    p.set_defaults(func=cmd_sim)


def cmd_sim(args):
    if args.compile:
        from binlink.sim import compiled

        return compiled.main()
    if args.report:
        return cmd_report(args)
    if not args.link or not args.registry:
        print("binlink sim: --link and --registry are required (or --report FILE)", file=sys.stderr)
        return 2
    from binlink.sim.fleet import Fleet

    logging.getLogger("binlink.fw").setLevel(logging.WARNING)
    for path in args.link + [args.registry]:  # the documented /tmp/binlink/... works on a fresh machine
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    vm = None
    if args.vm == "micropython":
        from binlink.sim.vm import FirmwareVM

        vm = FirmwareVM()
    fleet = Fleet(args.bins, seed=args.seed, fmt=args.format, links=args.link, registry_path=args.registry, vm=vm,
                  speed=args.speed, clock_file=args.clock_file, channel={"loss": args.loss, "duplicates": args.duplicates, "bit_errors": args.bit_errors})
    print("sim: %d bins, format %s, links %s, registry %s, %s firmware" % (
        args.bins, args.format, ", ".join(args.link), args.registry, args.vm), flush=True)
    try:
        fleet.run(args.duration)
    except KeyboardInterrupt:
        pass
    for link in fleet.links:
        link.wait_drained(args.linger)
    summary = summarize(fleet)
    print(json.dumps(summary, sort_keys=True), flush=True)
    if args.truth:
        write_truth(fleet, args.truth)
    fleet.close()
    if vm is not None:
        vm.close()
    return 0


def cmd_report(args):
    from binlink.sim import compiled, policy, report

    logging.getLogger("binlink.fw").setLevel(logging.WARNING)
    print("sim: %d bins, %g days per policy, seed %d: fixed rounds, collection list, forecast scoring" % (
        args.bins, args.days, args.seed), flush=True)
    print("sim: %s" % compiled.status(), flush=True)
    trucks = None
    if args.trucks:
        from binlink.gateway import routes

        try:
            trucks = routes.Trucks(args.trucks, args.truck_capacity).check()
        except ValueError as e:
            print("binlink sim: %s" % e, file=sys.stderr)
            return 2
    comparison = policy.compare(args.bins, args.days, args.seed, keep_series=min(args.bins, args.chart_bins),
                                processes=os.cpu_count() or 1, trucks=trucks)  # the runs' districts on every core
    report.write(args.report, comparison)
    figures = {k: v for k, v in comparison.items() if k not in ("fixed", "forecast")}
    site = comparison["forecast"].get("site") or {}
    figures.update(hot_spots=len(site.get("hot_spots", ())), quiet_sensors=len(site.get("quiet", ())))
    figures.update({"collections_per_bin_month_%s" % p: comparison[p]["collections_per_bin_month"] for p in ("fixed", "forecast")})
    print(json.dumps(figures, sort_keys=True), flush=True)
    print("report: %s" % args.report, flush=True)
    return 0


def summarize(fleet):
    return {"bins": len(fleet.devices), "sent": fleet.frames_sent, "lost_on_air": fleet.lost_on_air,
            "collections": len(fleet.truth.collections), "alarms": len(fleet.truth.alarms),
            "channel": fleet.channel.stats}


def write_truth(fleet, path):
    t = fleet.truth
    data = {
        "collections": t.collections,
        "alarms": t.alarms,
        "readings": {"%s:%d" % k: v for k, v in t.readings.items()},
        "bins": {"%06x" % d.device_id: d.bin_id for d in fleet.devices},
        "summary": summarize(fleet),
    }
    with open(path, "w") as f:
        json.dump(data, f)


