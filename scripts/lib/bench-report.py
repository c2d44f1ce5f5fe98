#!/usr/bin/env python3
"""Tables and plots of scripts/bench.sh (issue 12, section 1), from its results file.

Usage: bench-report.py RESULTS DOCS_DIR COMMAND

RESULTS holds one line of key=value pairs per guest measurement, each prefixed by the
benchmark's own `lat_us=L reps=R` (written by bench.sh):
  bench=svm_invalidate ...   one per repetition, mode and N (svmgpu bench-svm-invalidate)
  bench=fault ...            one per N (svmgpu bench-fault)
  bench=fault_throughput ... one per N and context count
Prints Markdown tables, writes docs/bench-invalidation.svg (per-extra-GPU cost against N,
one panel per TLB latency, one line per two-pass svm_mode, the target dashed) and docs/bench-fault-throughput.svg
(faults/s against contexts, one line per N), and exits 1 if a repetition's device
invalidation count is not iterations x N (a mode that skipped a device), or if its
baseline (nothing mirrored) made the devices invalidate anything.
Only the Python standard library is used (the project's python3 runs qmp-pause.sh too).
"""
import math
import statistics
import sys
from collections import defaultdict

MODES = ["single", "per_device", "shared"]
PLOT_MODES = ["per_device", "shared"]
COLORS = {"single": "#d62728", "per_device": "#1f77b4", "shared": "#2ca02c"}
N_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def parse(path):
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            kv = {}
            for tok in line.split():
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    kv[k] = v
            if "bench" in kv:
                rows.append(kv)
    return rows


def us(ns):
    return ns / 1000.0


def fmt(x, nd=0):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def svg_axes(out, x0, y0, w, h, xticks, yticks, xlabel, ylabel, title, xpos, ypos):
    out.append(f'<text x="{x0 + w / 2:.1f}" y="{y0 - 10}" text-anchor="middle" font-size="13">{title}</text>')
    for yv in yticks:
        py = ypos(yv)
        out.append(f'<line x1="{x0}" y1="{py:.1f}" x2="{x0 + w}" y2="{py:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6}" y="{py + 4:.1f}" text-anchor="end">{yv:g}</text>')
    for xv in xticks:
        px = xpos(xv)
        out.append(f'<line x1="{px:.1f}" y1="{y0}" x2="{px:.1f}" y2="{y0 + h}" stroke="#ddd"/>')
        out.append(f'<text x="{px:.1f}" y="{y0 + h + 16}" text-anchor="middle">{xv}</text>')
    out.append(f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}" stroke="black"/>')
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + h}" stroke="black"/>')
    out.append(f'<text x="{x0 + w / 2:.1f}" y="{y0 + h + 36}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="{x0 - 48}" y="{y0 + h / 2:.1f}" transform="rotate(-90 {x0 - 48} {y0 + h / 2:.1f})" text-anchor="middle">{ylabel}</text>')


def nice_ticks(lo, hi, n=6):
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw))
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 0.5:
        ticks.append(round(v, 10))
        v += step
    return ticks


def main():
    results, docs, command = sys.argv[1], sys.argv[2], sys.argv[3]
    rows = parse(results)
    ok = True
    # (lat, mode, guest N, devices mirrored) -> rows in order. A guest of N > 1 vGPUs runs,
    # per repetition, the one-device reference (--devices 1) right before the N-device
    # run: the i-th of each are a pair measured at the same time on the same host load.
    inv = defaultdict(list)
    for r in rows:
        if r["bench"] == "svm_invalidate":
            g = int(r.get("guest_gpus", r["devices"]))
            inv[(int(r["lat_us"]), r["svm_mode"], g, int(r["devices"]))].append(r)
    lats = sorted({k[0] for k in inv})
    ns_all = sorted({k[2] for k in inv})

    def netv(r):
        return int(r["median_ns"]) - int(r["baseline_median_ns"])

    for key, rs in inv.items():
        for r in rs:
            if int(r.get("device_tlb_invalidations", -1)) != int(r.get("expected_tlb_invalidations", -2)) \
                    or int(r.get("baseline_tlb_invalidations", 1)) != 0:
                ok = False
                print(f"FAILED: lat {key[0]} us, {key[1]}, guest of {key[2]}, {key[3]} device(s): device "
                      f"invalidations {r.get('device_tlb_invalidations')} for {r.get('expected_tlb_invalidations')} "
                      f"expected (iterations x N), baseline {r.get('baseline_tlb_invalidations')} (want 0)")
    net = {}  # (lat, mode, n) -> the point
    for (lat, m, g, d), rs in inv.items():
        if d != g:
            continue
        vals = [netv(r) for r in rs]
        p = dict(med=statistics.median(vals), lo=min(vals), hi=max(vals), reps=len(vals),
                 base=statistics.median(int(r["baseline_median_ns"]) for r in rs),
                 rtt=statistics.median(int(r.get("bare_round_trip_median_ns", 0)) for r in rs),
                 iters=int(rs[0]["iters"]), one=None, cost=None, clo=None, chi=None)
        ref = inv.get((lat, m, g, 1)) if g > 1 else None
        if ref:
            pairs = list(zip(rs, ref))
            p["one"] = statistics.median(netv(b) for _, b in pairs)
            costs = [(netv(a) - netv(b)) / (g - 1) for a, b in pairs]
            p["cost"], p["clo"], p["chi"] = statistics.median(costs), min(costs), max(costs)
        net[(lat, m, g)] = p
    print()
    print("Invalidation of one 64 KiB SVM range mirrored on N vGPUs (`mprotect`, guest wall time).")
    print("T = median over the repetitions of (median of the iterations - median of the no-mirror")
    print("baseline, the same call with nothing mirrored); spread = min-max over the repetitions.")
    print("T(1) here = the same measured in the same guest right before each N-device repetition,")
    print("with the range mirrored on one device only; per extra GPU = median over the repetitions")
    print("of (T(N) - T(1)) / (N - 1) of each pair (spread: min-max). RTT = bare GET_INFO round")
    print("trip in the same guest (median over its modes and repetitions).")
    cost = {}
    for lat in lats:
        print()
        print(f"TLB invalidation latency {lat} µs:")
        print()
        print("| N | mode | T (µs) | spread (µs) | reps × iters | baseline (µs) | T(1) same guest (µs) | T(N)/T(1) | per extra GPU (µs) | spread (µs) | per extra GPU / RTT | RTT (µs) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for n in ns_all:
            rtt = statistics.median([net[(lat, mm, n)]["rtt"] for mm in MODES if (lat, mm, n) in net] or [0])
            for m in MODES:
                p = net.get((lat, m, n))
                if not p:
                    continue
                c = p["cost"]
                cost[(lat, m, n)] = c
                ratio = p["med"] / p["one"] if p["one"] else None
                rel = c / rtt if c is not None and rtt > 0 else None
                spread_c = f"{fmt(us(p['clo']))}–{fmt(us(p['chi']))}" if c is not None else "-"
                print(f"| {n} | {m} | {fmt(us(p['med']))} | {fmt(us(p['lo']))}–{fmt(us(p['hi']))} | "
                      f"{p['reps']} × {p['iters']} | {fmt(us(p['base']))} | "
                      f"{fmt(us(p['one'])) if p['one'] is not None else '-'} | {fmt(ratio, 2)} | "
                      f"{fmt(us(c)) if c is not None else '-'} | {spread_c} | {fmt(rel, 2)} | {fmt(us(rtt))} |")
    print()
    print("Device invalidation counts: " + ("every repetition made exactly iterations x N, and 0 in its baseline."
                                            if ok else "WRONG, see the FAILED lines above."))
    # The devices' per-stage profile (statistics JSON of each guest, every run in it).
    prof = {(int(r["lat_us"]), int(r["guest_gpus"])): r for r in rows if r["bench"] == "device"}
    if prof:
        print()
        print("Device-side profile, per guest (all its runs; the devices' statistics JSON): an")
        print("invalidation from acceptance to COMMAND_DONE (of which after its nominal deadline),")
        print("and a fault by stage: raised -> event delivered, delivered -> reply accepted (the")
        print("driver's part), accepted -> retried. Means in µs.")
        print()
        print("| latency (µs) | N | invalidations | accept -> done | of which late | faults | raised -> delivered | with the driver | reply -> retry | driver share |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for (lat, n), r in sorted(prof.items()):
            ni, nf = int(r["tlb_invalidations"]), int(r["faults_retried"])

            def mean(k, cnt):
                return fmt(us(int(r[k]) / cnt)) if cnt else "-"
            share = 100 * int(r["fault_driver_ns"]) / int(r["fault_retry_ns"]) if int(r["fault_retry_ns"]) else None
            print(f"| {lat} | {n} | {ni} | {mean('tlb_inval_device_ns', ni)} | {mean('tlb_inval_late_ns', ni)} | "
                  f"{nf} | {mean('fault_deliver_ns', nf)} | {mean('fault_driver_ns', nf)} | "
                  f"{mean('fault_resume_ns', nf)} | {fmt(share, 1)} % |")
    # Faults.
    faults = {int(r["devices"]): r for r in rows if r["bench"] == "fault"}
    if faults:
        print()
        print("GPU fault service (`svm_mode=shared`, one-page faults on device 0): end to end = the")
        print("device's own clock, failed access -> retry (GET_STATS fault_retry_ns / faults_retried);")
        print("of that, with the driver = PAGE_FAULT delivered -> FAULT_REPLY accepted (device clock);")
        print("the driver's split = event -> reply sent (median) and reply -> device answer (mean);")
        print("user-visible = job with a fault - the same job without (medians).")
        print()
        print("| N | end to end (µs) | with the driver (µs) | driver: event -> reply (µs) | driver: reply -> answer (µs) | bare RTT (µs) | end to end / RTT | user-visible (µs) | job with / without fault (µs) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for n in sorted(faults):
            r = faults[n]
            rtt = int(r["bare_round_trip_median_ns"])
            e2e = int(r["device_end_to_end_mean_ns"])
            print(f"| {n} | {fmt(us(e2e))} | {fmt(us(int(r['device_driver_part_mean_ns'])))} | "
                  f"{fmt(us(int(r['fault_service_median_ns'])))} | {fmt(us(int(r['fault_ack_mean_ns'])))} | "
                  f"{fmt(us(rtt))} | {fmt(e2e / rtt if rtt else None, 2)} | {fmt(us(int(r['user_visible_fault_ns'])))} | "
                  f"{fmt(us(int(r['job_with_fault_median_ns'])))} / {fmt(us(int(r['job_without_fault_median_ns'])))} |")
    thr = {}
    for r in rows:
        if r["bench"] == "fault_throughput":
            thr[(int(r["devices"]), int(r["contexts"]))] = r
    if thr:
        ctxs = sorted({k[1] for k in thr})
        tns = sorted({k[0] for k in thr})
        print()
        print("Fault throughput (`svm_mode=shared`): faults/s, aggregate (per device), contexts on the")
        print("devices in turn, each running 4 jobs of 16 one-fault stores into fresh 64 KiB ranges.")
        print()
        print("| N | " + " | ".join(f"{c} context{'s' if c > 1 else ''}" for c in ctxs) + " |")
        print("| --- |" + " --- |" * len(ctxs))
        for n in tns:
            cells = []
            for c in ctxs:
                r = thr.get((n, c))
                cells.append("-" if not r else f"{r['faults_per_s']} ({r['faults_per_s_per_device'].replace('/', ' / ')})")
            print(f"| {n} | " + " | ".join(cells) + " |")
    # Plot 1: per-extra-GPU cost against N, one panel per latency.
    if lats and len(ns_all) > 1:
        pw, ph, L, T = 300, 260, 80, 50
        W = L + len(lats) * (pw + 90) + 60
        H = T + ph + 110
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
               '<rect width="100%" height="100%" fill="white"/>']
        xn = [n for n in ns_all if n > 1]
        for i, lat in enumerate(lats):
            x0 = L + i * (pw + 90)
            # Two-pass modes only: single pass costs a whole latency per GPU (in the table),
            # which would flatten them. The dashed line is the target, 0.25 x RTT.
            vals = [us(cost[(lat, m, n)]) for m in PLOT_MODES for n in xn if cost.get((lat, m, n)) is not None]
            rtts = [net[k]["rtt"] for k in net if k[0] == lat]
            target = us(0.25 * statistics.median(rtts)) if rtts else None
            lo = min(0.0, min(vals, default=0.0))
            hi = max(vals + ([target] if target else []), default=1.0)
            yt = nice_ticks(lo, hi)
            ylo, yhi = yt[0], yt[-1]
            xmax = math.log2(max(xn))

            def xpos(n, x0=x0, xmax=xmax):
                return x0 + (math.log2(n) - 1) / max(xmax - 1, 1) * pw if xmax > 1 else x0 + pw / 2

            def ypos(v, ylo=ylo, yhi=yhi):
                return T + ph - (v - ylo) / (yhi - ylo) * ph

            lat_txt = f"{lat / 1000:g} ms" if lat >= 1000 else f"{lat} µs"
            svg_axes(out, x0, T, pw, ph, xn, yt, "N (vGPUs mirroring the range)",
                     "cost per extra GPU (µs)", f"TLB latency {lat_txt}", xpos, ypos)
            if target:
                out.append(f'<line x1="{x0}" y1="{ypos(target):.1f}" x2="{x0 + pw}" y2="{ypos(target):.1f}" stroke="black" stroke-dasharray="5,4"/>')
                out.append(f'<text x="{x0 + pw - 4}" y="{ypos(target) - 5:.1f}" text-anchor="end" fill="#333">target 0.25 x RTT</text>')
            for m in PLOT_MODES:
                pts = [(xpos(n), ypos(us(cost[(lat, m, n)]))) for n in xn if cost.get((lat, m, n)) is not None]
                if not pts:
                    continue
                out.append('<polyline points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                           + f'" fill="none" stroke="{COLORS[m]}" stroke-width="2"/>')
                for x, y in pts:
                    out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{COLORS[m]}"/>')
        ly = H - 30
        for j, m in enumerate(PLOT_MODES):
            lx = L + j * 140
            out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 25}" y2="{ly}" stroke="{COLORS[m]}" stroke-width="2"/>')
            out.append(f'<text x="{lx + 30}" y="{ly + 4}">{m}</text>')
        out.append(f'<text x="{L + 300}" y="{ly + 4}" fill="#555">two-pass modes: (T(N) - T(1)) / (N - 1), no-mirror baseline subtracted, median of repetitions (single pass: one latency per GPU, see the table)</text>')
        out.append("</svg>")
        with open(f"{docs}/bench-invalidation.svg", "w", encoding="utf-8") as f:
            f.write("\n".join(out) + "\n")
        print(f"\nplot: {docs}/bench-invalidation.svg")
    # Plot 2: fault throughput against contexts, one line per N.
    if thr:
        ctxs = sorted({k[1] for k in thr})
        tns = sorted({k[0] for k in thr})
        pw, ph, L, T = 420, 280, 80, 50
        W, H = L + pw + 150, T + ph + 70
        vals = [float(r["faults_per_s"]) for r in thr.values()]
        yt = nice_ticks(0.0, max(vals, default=1.0))
        xmax = math.log2(max(ctxs)) if max(ctxs) > 1 else 1

        def xpos(c):
            return L + math.log2(c) / xmax * pw

        def ypos(v):
            return T + ph - v / yt[-1] * ph

        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
               '<rect width="100%" height="100%" fill="white"/>']
        svg_axes(out, L, T, pw, ph, ctxs, yt, "contexts (log scale)", "faults/s (all devices)",
                 "GPU fault throughput (svm_mode=shared)", xpos, ypos)
        for j, n in enumerate(tns):
            col = N_COLORS[j % len(N_COLORS)]
            pts = [(xpos(c), ypos(float(thr[(n, c)]["faults_per_s"]))) for c in ctxs if (n, c) in thr]
            out.append('<polyline points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                       + f'" fill="none" stroke="{col}" stroke-width="2"/>')
            for x, y in pts:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{col}"/>')
            ly = T + 20 + j * 20
            out.append(f'<line x1="{L + pw + 15}" y1="{ly}" x2="{L + pw + 40}" y2="{ly}" stroke="{col}" stroke-width="2"/>')
            out.append(f'<text x="{L + pw + 45}" y="{ly + 4}">N = {n}</text>')
        out.append("</svg>")
        with open(f"{docs}/bench-fault-throughput.svg", "w", encoding="utf-8") as f:
            f.write("\n".join(out) + "\n")
        print(f"plot: {docs}/bench-fault-throughput.svg")
    print(f"\ncommand: {command}")
    if not ok:
        print("RESULT: FAILED (device invalidation counts, see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
