"""`make bench`: measures speed and size, merges the figures into build/bench.json.

Each section is a function returning a dict of keys; ratios are measured side by side in one run.
`python -m tests.bench codec gateway` runs only the named sections."""
import json
import os
import sys
import time

from binlink import codec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "bench.json")
KEY = bytes(range(16))  # TEST KEY


def bench_codec():
    frames = [codec.encode_reading(KEY, 0xA1, n, 800 + n % 1000, 20, 3700, 0, 5, 5) for n in range(1, 20001)]
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        last = 0
        for f in frames:
            last = codec.decode_body(f, codec.verify(f, KEY, last))["fcnt"]
        best = max(best, len(frames) / (time.perf_counter() - t0))
    return {"bytes_per_reading": len(frames[0]), "decode_frames_per_s": round(best)}


def bench_gateway():
    from tests import bench_gateway

    return bench_gateway.run()


SECTIONS = {"codec": bench_codec, "gateway": bench_gateway}


def main(names):
    results = {}
    if os.path.exists(OUT):
        with open(OUT) as f:
            results = json.load(f)
    for name in names or list(SECTIONS):
        print("==> bench %s" % name, flush=True)
        figures = SECTIONS[name]()
        for k, v in figures.items():
            print("    %s = %s" % (k, v))
        results.update(figures)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote %s" % OUT)


if __name__ == "__main__":
    main(sys.argv[1:])
