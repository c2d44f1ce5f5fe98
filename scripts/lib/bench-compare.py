#!/usr/bin/env python3
"""The SVM implementations side by side (issue 13), from scripts/bench.sh's results file.

Usage: bench-compare.py RESULTS IMPL...

RESULTS is bench.sh's results.txt, every line tagged with `svm_impl=IMPL`. Prints one
Markdown table of the invalidation figures (T, per extra GPU) and one of the fault figures
(end to end, the driver's part, throughput), each cell `IMPL1 / IMPL2 / ...`, computed as
bench-report.py computes them for one implementation. Only the standard library is used.
"""
import statistics
import sys
from collections import defaultdict

MODES = ["single", "per_device", "shared"]


def parse(path):
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
            if "bench" in kv and "svm_impl" in kv:
                rows.append(kv)
    return rows


def us(ns):
    return "-" if ns is None else f"{ns / 1000:.0f}"


def main():
    rows, impls = parse(sys.argv[1]), sys.argv[2:]
    inv = defaultdict(list)
    for r in rows:
        if r["bench"] == "svm_invalidate":
            g = int(r.get("guest_gpus", r["devices"]))
            inv[(r["svm_impl"], int(r["lat_us"]), r["svm_mode"], g, int(r["devices"]))].append(r)

    def netv(r):
        return int(r["median_ns"]) - int(r["baseline_median_ns"])

    point = {}  # (impl, lat, mode, n) -> (T, per extra GPU)
    for (i, lat, m, g, d), rs in inv.items():
        if d != g:
            continue
        t = statistics.median(netv(r) for r in rs)
        ref = inv.get((i, lat, m, g, 1)) if g > 1 else None
        cost = statistics.median((netv(a) - netv(b)) / (g - 1) for a, b in zip(rs, ref)) if ref else None
        point[(i, lat, m, g)] = (t, cost)
    keys = sorted({k[1:] for k in point})
    print("Invalidation (T and per extra GPU as in the tables above, µs), "
          + " / ".join(impls) + ":")
    print()
    print("| TLB latency (µs) | N | mode | T | per extra GPU |")
    print("| --- | --- | --- | --- | --- |")
    for lat in sorted({k[0] for k in keys}):
        for n in sorted({k[2] for k in keys}):
            for m in MODES:
                if (lat, m, n) not in keys:
                    continue
                ps = [point.get((i, lat, m, n), (None, None)) for i in impls]
                print(f"| {lat} | {n} | {m} | {' / '.join(us(p[0]) for p in ps)} | "
                      f"{' / '.join(us(p[1]) for p in ps)} |")
    faults = {(r["svm_impl"], int(r["devices"])): r for r in rows if r["bench"] == "fault"}
    thr = {(r["svm_impl"], int(r["devices"]), int(r["contexts"])): r
           for r in rows if r["bench"] == "fault_throughput"}
    if faults or thr:
        ctxs = sorted({k[2] for k in thr})
        print()
        print("GPU faults (`svm_mode=shared`; end to end on the device's clock, the driver's")
        print("event -> reply, the bare round trip: µs; throughput: faults/s), " + " / ".join(impls) + ":")
        print()
        print("| N | end to end | driver: event -> reply | bare RTT | "
              + " | ".join(f"faults/s, {c} context{'s' if c > 1 else ''}" for c in ctxs) + " |")
        print("| --- | --- | --- | --- |" + " --- |" * len(ctxs))
        for n in sorted({k[1] for k in list(faults) + list(thr)}):
            def cell(key):
                return " / ".join(us(int(faults[(i, n)][key])) if (i, n) in faults else "-" for i in impls)
            tcells = [" / ".join(thr[(i, n, c)]["faults_per_s"] if (i, n, c) in thr else "-" for i in impls)
                      for c in ctxs]
            print(f"| {n} | {cell('device_end_to_end_mean_ns')} | {cell('fault_service_median_ns')} | "
                  f"{cell('bare_round_trip_median_ns')} | " + " | ".join(tcells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
