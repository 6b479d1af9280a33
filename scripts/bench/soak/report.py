#!/usr/bin/env python3
"""Judge a scripts/soak.sh run: soak.csv, soak.svg, summary.txt and PASS/FAIL.

    python3 scripts/bench/soak/report.py target/soak

Reads what soak.sh left in the directory: samples.tsv (one row per sample),
slices.jsonl (loadgen's per-slice latencies), sync.json (loadgen's totals),
stream.json (simulate's output) and run.json (rates and exit statuses).
Standard library only. Exits 1 when any check fails.

Windows, by sample time t (a sample at t covers (t - SAMPLE_SECS, t]):
warm-up t <= W is not judged; the reference is the first minute after it;
"last 3 min" and "last min" end at the run's end (each at most a third of
the judged time, for short runs).
"""

import csv
import json
import math
import os
import statistics
import sys

# Memory: RSS in the last 3 minutes may exceed the reference minute's maximum
# by this share. Under steady churn the RSS still saw-tooths: every 5 s each
# partition snapshots and encodes its keys (a few MB) and frees them once
# saved, mimalloc hands freed pages back lazily, and a shard's table doubles
# (tables never shrink) when the fluctuating key set crosses its load
# threshold. Short runs swung 151-175 MiB with no trend. 10% above the
# reference's peak leaves room for that and still catches a leak of about a
# byte per check or event over a 10-minute run (printed with the result).
RSS_SLACK = 0.10
# Latency: the median of the last minute's per-slice p99s may be this
# multiple of the reference minute's.
P99_FACTOR = 1.5
# Lag: the last minute's median may exceed the reference's by one second of
# events. A processor short of capacity by d events/s falls d * 60 events
# further behind every minute; the gauge itself jumps with fetches and
# checkpoint pauses.
LAG_SLACK_SECS = 1.0


def load(out):
    with open(os.path.join(out, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(out, "samples.tsv")) as f:
        samples = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")]
    slices = {}
    path = os.path.join(out, "slices.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    s = json.loads(line)
                    slices[s["slice"]] = s
    sync = {}
    if os.path.exists(os.path.join(out, "sync.json")):
        with open(os.path.join(out, "sync.json")) as f:
            sync = json.load(f)
    stream = {}
    if os.path.exists(os.path.join(out, "stream.json")):
        with open(os.path.join(out, "stream.json")) as f:
            for line in f:
                if '"published"' in line:
                    stream = json.loads(line)
    return run, samples, slices, sync, stream


def not_ok(codes):
    """Answers that were neither allowed (200) nor refused (429)."""
    return sum(v for k, v in codes.items() if k not in ("200", "429"))


def main(out):
    run, samples, slices, sync, stream = load(out)
    T, S, W = run["soak_secs"], run["sample_secs"], run["warmup_secs"]
    judged = T - W
    ref_end = W + min(60, judged / 3)
    rss_from = T - min(180, judged / 3)
    last_from = T - min(60, judged / 3)

    rows = []
    prev = None
    for s in samples:
        t = int(s["t_s"])
        sl = slices.get(t // S - 1, {})
        codes = sl.get("status_codes", {})
        rate = (s["events_consumed"] - prev["events_consumed"]) / S if prev else s["events_consumed"] / S
        prev = s
        window = "warmup" if t <= W else "reference" if t <= ref_end else ""
        if t > rss_from:
            window = "last-3-min" if t <= last_from else "last-min"
        rows.append({
            "t_s": t,
            "window": window,
            "rss_mib": round(s["rss_kib"] / 1024, 2),
            "keys_tracked": int(s["keys_tracked"]),
            "keys_expired_total": int(s["keys_expired"]),
            "stream_lag": int(s["lag"]),
            "events_consumed_total": int(s["events_consumed"]),
            "events_per_s": round(rate),
            # Events due by simulate's schedule less events consumed: an upper
            # bound of the backlog (simulate's own delays count too) that
            # does not rest on the lag gauge. Jitters by the scrape's timing.
            "stream_backlog_est": round(run["stream_rate"] * t - s["events_consumed"]),
            "sync_answered": sl.get("requests", 0),
            "sync_p50_ms": sl.get("p50_ms", ""),
            "sync_p99_ms": sl.get("p99_ms", ""),
            "sync_max_ms": sl.get("max_ms", ""),
            "sync_not_200_429": not_ok(codes),
            "sync_errors": sum(sl.get("errors", {}).values()),
            "dead_letters_total": int(s["dead_letters"]),
            "checkpoint_failures_total": int(s["checkpoint_failures"]),
            "error_log_lines": int(s["error_lines"]),
            "warn_log_lines": int(s["warn_lines"]),
            "cpu_idle_pct": int(s["idle_pct"]),
        })
    with open(os.path.join(out, "soak.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["t_s"])
        w.writeheader()
        w.writerows(rows)

    ref = [r for r in rows if W < r["t_s"] <= ref_end]
    tail = [r for r in rows if r["t_s"] > rss_from]
    last = [r for r in rows if r["t_s"] > last_from]
    checks = []  # (name, passed, figures)
    lines = []

    def check(name, ok, figures):
        checks.append((name, ok, figures))

    complete = len(rows) == T // S
    # Errors.
    codes = sync.get("status_codes", {})
    lg_errors = sum(sync.get("errors", {}).values())
    final = rows[-1] if rows else {"dead_letters_total": 0, "checkpoint_failures_total": 0}
    parts = {
        "loadgen errors": lg_errors,
        "answers not 200/429": not_ok(codes),
        "dead letters": final["dead_letters_total"],
        "checkpoint failures": final["checkpoint_failures_total"],
        "ERROR log lines": run["error_lines"],
        "panics": run["panics"],
    }
    bad = {k: v for k, v in parts.items() if v}
    exits = []
    if run["loadgen_rc"]:
        exits.append(f"loadgen exited {run['loadgen_rc']}")
    if run["simulate_rc"]:
        exits.append(f"simulate exited {run['simulate_rc']}")
    if not run["alive"] or not complete:
        exits.append("quotaflow died during the soak")
    if not run["stopped_clean"]:
        exits.append("quotaflow did not log a clean stop")
    check("no errors", not bad and not exits,
          ", ".join(f"{k} {v}" for k, v in parts.items()) + (("; " + "; ".join(exits)) if exits else ""))
    if not (ref and tail and last):
        check("enough samples", False, f"{len(rows)} samples of {T // S}")
    else:
        # Memory.
        ref_rss = max(r["rss_mib"] for r in ref)
        tail_rss = max(r["rss_mib"] for r in tail)
        limit = ref_rss * (1 + RSS_SLACK)
        work = (run["sync_rate"] + run["stream_rate"]) * (T - ref_end)
        per_item = RSS_SLACK * ref_rss * 2**20 / work if work else 0
        check("memory flat", tail_rss <= limit,
              f"RSS max {tail_rss:.1f} MiB in the last {T - rss_from:.0f} s vs {ref_rss:.1f} MiB in the reference minute "
              f"({100 * (tail_rss / ref_rss - 1):+.1f}%, limit +{100 * RSS_SLACK:.0f}% = {limit:.1f} MiB; "
              f"that margin is {per_item:.2f} B per check or event after the reference)")
        # Lag: the gauge, and the backlog estimate beside it (the gauge
        # compares a high watermark from librdkafka's last statistics, up to
        # a second old, with the current position, so it reads 0 until the
        # backlog exceeds about a second of traffic).
        ref_lag = statistics.median(r["stream_lag"] for r in ref)
        last_lag = statistics.median(r["stream_lag"] for r in last)
        ref_est = statistics.median(r["stream_backlog_est"] for r in ref)
        last_est = statistics.median(r["stream_backlog_est"] for r in last)
        slack = max(1, round(run["stream_rate"] * LAG_SLACK_SECS))
        check("lag does not grow", last_lag <= ref_lag + slack and last_est <= max(ref_est, 0) + slack,
              f"median partition_lag {last_lag:g} events in the last {T - last_from:.0f} s vs {ref_lag:g} in the reference; "
              f"backlog estimate (due by simulate's schedule - consumed) {last_est:g} vs {ref_est:g}; "
              f"limit +{slack} = {LAG_SLACK_SECS:g} s of events")
        # Latency.
        ref_p99 = [r["sync_p99_ms"] for r in ref if r["sync_p99_ms"] != ""]
        last_p99 = [r["sync_p99_ms"] for r in last if r["sync_p99_ms"] != ""]
        if ref_p99 and last_p99:
            a, b = statistics.median(ref_p99), statistics.median(last_p99)
            check("p99 steady", b <= P99_FACTOR * a,
                  f"median of {len(last_p99)} slice p99s {b:.2f} ms in the last {T - last_from:.0f} s vs "
                  f"{a:.2f} ms ({len(ref_p99)} slices) in the reference ({b / a if a else float('inf'):.2f}x, "
                  f"limit {P99_FACTOR:g}x = {P99_FACTOR * a:.2f} ms)")
        else:
            check("p99 steady", False, "no per-slice latencies")
        # The soak means nothing unless keys really expired all along.
        expired_last = last[-1]["keys_expired_total"] - (rows[rows.index(last[0]) - 1]["keys_expired_total"])
        check("keys expire (churn works)", expired_last > 0,
              f"{final['keys_expired_total']:,} keys expired in all, {expired_last:,} in the last "
              f"{T - last_from:.0f} s; keys tracked (the /check store) {min(r['keys_tracked'] for r in rows[1:] or rows):,}"
              f"–{max(r['keys_tracked'] for r in rows):,}")

        # The criterion takes maxima; medians show the trend under the
        # checkpoints' sawtooth (each partition's snapshot is a few MB).
        m0 = statistics.median(r["rss_mib"] for r in ref)
        m1 = statistics.median(r["rss_mib"] for r in tail)
        lines.append(f"RSS median {m1:.1f} MiB in the last {T - rss_from:.0f} s vs {m0:.1f} MiB in the reference "
                     f"({100 * (m1 / m0 - 1):+.1f}%); range over the judged run "
                     f"{min(r['rss_mib'] for r in rows if r['t_s'] > W):.1f}–{max(r['rss_mib'] for r in rows if r['t_s'] > W):.1f} MiB")
        ref_keys = max(r["keys_tracked"] for r in ref)
        tail_keys = max(r["keys_tracked"] for r in tail)
        lines.append(f"keys tracked: max {tail_keys:,} in the last {T - rss_from:.0f} s vs {ref_keys:,} in the reference")

    achieved = sync.get("throughput", 0)
    published = stream.get("published", 0)
    consumed = rows[-1]["events_consumed_total"] if rows else 0
    cores = run["cpu_secs"] / T if T else 0
    handled = sync.get("requests", 0) + consumed
    head = [
        f"soak {run['run']} ({run['date']}): {T} s, samples every {S} s, first {W} s not judged; "
        f"reference {W}–{ref_end:.0f} s, last 3 min from {rss_from:.0f} s, last min from {last_from:.0f} s",
        f"rates {run['rates_from']}",
    ]
    if run["sync_max"]:
        head.append(f"  maximum of the mix ({run['max_secs']} s, both at full speed together): sync {run['sync_max']:,} checks/s; "
                    f"stream {run['stream_max']:,} events/s (simulate published {run['published_max']:,}/s, "
                    f"quotaflow consumed {run['consumed_max']:,}/s)")
    head += [
        f"  sync: {run['sync_rate']:,} checks/s asked, {achieved:,.0f}/s answered; users: a window of "
        f"{run['sync_users']:,} moving {run['sync_churn']:,}/s, a new hot user {run['sync_hot_churn']:g}/s; status {json.dumps(sync.get('status_codes', {}))}; "
        f"whole run p50 {sync.get('p50_ms', 0):.2f} ms, p99 {sync.get('p99_ms', 0):.2f} ms, max {sync.get('max_ms', 0):.1f} ms",
        f"  stream: {run['stream_rate']:,} events/s asked, {published / T if T else 0:,.0f}/s published "
        f"({published:,}), {consumed:,} consumed by the last sample; {run['stream_users']:,} users, "
        f"{run['stream_hot_users']} hot",
        f"quotaflow CPU: {run['cpu_secs']:.1f} s = {cores:.2f} cores, "
        f"{run['cpu_secs'] / handled * 1e6 if handled else 0:.1f} us per check or event; "
        f"CPU idle before the run {run['idle_before']}%, during it "
        f"{statistics.median(r['cpu_idle_pct'] for r in rows) if rows else 0:g}% (median of the samples)",
    ]
    body = [f"{'PASS' if ok else 'FAIL'}  {name}: {fig}" for name, ok, fig in checks]
    verdict = all(ok for _, ok, _ in checks)
    text = "\n".join(head + lines + body + [f"soak: {'PASS' if verdict else 'FAIL'}"]) + "\n"
    print(text, end="")
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text)
    svg(os.path.join(out, "soak.svg"), rows, run, W, ref_end, rss_from, last_from, ref, checks)
    print(f"results: {out}/soak.csv, {out}/soak.svg, {out}/summary.txt")
    return 0 if verdict else 1


def svg(path, rows, run, W, ref_end, rss_from, last_from, ref, checks):
    """Four panels over time: RSS, keys tracked, sync p99, stream lag."""
    T = run["soak_secs"]
    width, ph, left, right, top = 640, 120, 62, 12, 26
    panels = [
        ("RSS (MiB)", "rss_mib", rss_from,
         max((r["rss_mib"] for r in ref), default=0) * (1 + RSS_SLACK)),
        ("keys tracked (/check store)", "keys_tracked", last_from, None),
        ("p99 of /check per slice (ms)", "sync_p99_ms", last_from,
         P99_FACTOR * statistics.median([r["sync_p99_ms"] for r in ref if r["sync_p99_ms"] != ""] or [0])),
        ("stream lag (events): partition_lag, and due by schedule - consumed (grey)", "stream_lag", last_from,
         statistics.median([r["stream_lag"] for r in ref] or [0]) + max(1, round(run["stream_rate"] * LAG_SLACK_SECS))),
    ]
    top += 16
    pw = width - left - right
    height = top + len(panels) * (ph + 34) + 10
    x = lambda t: left + pw * t / T
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'font-family="sans-serif" font-size="10">',
         '<rect width="100%" height="100%" fill="white"/>',
         f'<text x="{left}" y="14" font-size="12">quotaflow soak, {run["date"][:10]}: {run["sync_rate"]:,} checks/s + '
         f'{run["stream_rate"]:,} events/s for {T} s</text>',
         f'<text x="{left}" y="28">'
         + " · ".join(f'{"PASS" if ok else "FAIL"} {name}' for name, ok, _ in checks) + '</text>']
    for i, (title, key, judged_from, limit) in enumerate(panels):
        y0 = top + i * (ph + 34) + 14
        vals = [(r["t_s"], r[key]) for r in rows if r[key] != ""]
        extra = [r["stream_backlog_est"] for r in rows] if key == "stream_lag" else []
        top_v = max([v for _, v in vals] + extra + [limit or 0, 1e-9])
        step = nice_step(top_v / 3)
        vmax = step * (int(top_v / step) + 1)
        y = lambda v: y0 + ph - ph * v / vmax
        o.append(f'<text x="{left}" y="{y0 - 4}" font-weight="bold">{title}</text>')
        # Windows: warm-up (not judged), the reference, the judged end.
        o.append(f'<rect x="{x(0):.1f}" y="{y0}" width="{x(W) - x(0):.1f}" height="{ph}" fill="#eee"/>')
        o.append(f'<rect x="{x(W):.1f}" y="{y0}" width="{x(ref_end) - x(W):.1f}" height="{ph}" fill="#dbe9f6"/>')
        o.append(f'<rect x="{x(judged_from):.1f}" y="{y0}" width="{x(T) - x(judged_from):.1f}" height="{ph}" fill="#fde8d0"/>')
        o.append(f'<rect x="{left}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        v = 0.0
        while v <= vmax * 1.0001:
            o.append(f'<text x="{left - 4}" y="{y(v) + 3:.1f}" text-anchor="end">{human(v)}</text>')
            v += step
        if limit:
            o.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(limit):.1f}" y2="{y(limit):.1f}" '
                     'stroke="#c00" stroke-dasharray="4 3"/>')
            what = "limit of the max" if key == "rss_mib" else "limit of the median"
            o.append(f'<text x="{left + pw - 2}" y="{y(limit) - 3:.1f}" text-anchor="end" fill="#c00">{what}</text>')
        if key == "stream_lag":
            est = " ".join(f"{x(r['t_s']):.1f},{y(max(r['stream_backlog_est'], 0)):.1f}" for r in rows)
            o.append(f'<polyline points="{est}" fill="none" stroke="#888" stroke-width="1"/>')
        pts = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in vals)
        o.append(f'<polyline points="{pts}" fill="none" stroke="#1f5fa8" stroke-width="1.5"/>')
        step = 60 if T >= 300 else max(10, T // 6 // 10 * 10)
        for t in range(0, T + 1, step):
            o.append(f'<text x="{x(t):.1f}" y="{y0 + ph + 12}" text-anchor="middle">{t}</text>')
    o.append(f'<text x="{left + pw}" y="{height - 4}" text-anchor="end">seconds; grey: warm-up, blue: reference '
             'minute, orange: judged end (RSS: last 3 min, others: last min)</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def nice_step(raw):
    """1, 2 or 5 times a power of ten, at least raw."""
    p = 10 ** math.floor(math.log10(raw))
    return next(m * p for m in (1, 2, 5, 10) if m * p >= raw)


def human(v):
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "target/soak"))
