#!/usr/bin/env python3
"""Compact relay table + Rampart/anchor ratios from a baseline.sh results directory (runs.csv).

Usage: relay_table.py RESULTS_DIR
Figures follow ../shared/bench/summarize.py: medians over repetitions; "Gbit/s per gw core" = median
throughput / median gw process CPU (utime+stime, all threads, % of one core).
"""
import csv, pathlib, re, statistics, sys

d = pathlib.Path(sys.argv[1])
rows = list(csv.DictReader(open(d / "runs.csv")))
LABEL = {"relay:wggo": "wireguard-go", "relay:bt1": "boringtun-cli --threads 1",
         "relay:bt": "boringtun-cli (default 4 threads)", "relay:custom": "**Rampart**"}


def f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def vals(sc, test, col):
    return [v for v in (f(r.get(col)) for r in rows if r["scenario"] == sc and r["test"] == test) if v is not None]


def med(v):
    return statistics.median(v) if v else None


def fmt(x, p=0):
    return "NA" if x is None else f"{x:.{p}f}"


def rng(v, p=0):
    return f"{fmt(min(v), p)}..{fmt(max(v), p)}" if v else "NA"


def eff(sc, test):
    m, c = med(vals(sc, test, "mbps")), med(vals(sc, test, "gw_cpu_pct"))
    return (m / 1000) / (c / 100) if m and c else None


def nstat_gw(sc):
    """Sum of gw-namespace UdpRcvbufErrors / UdpInDatagrams over all reps (all four tests of a scenario)."""
    err = dg = 0
    for p in sorted(d.glob(sc.replace(":", "-") + ".r*.counters")):
        sect = None
        for line in p.read_text().splitlines():
            if line.startswith("## "):
                sect = line
                continue
            if sect and sect.startswith("## nstat") and sect.endswith("gw"):
                m = re.match(r"(\w+)\s+(\d+)", line)
                if m and m.group(1) == "UdpRcvbufErrors":
                    err += int(m.group(2))
                if m and m.group(1) == "UdpInDatagrams":
                    dg += int(m.group(2))
    return err, dg


order = [s for s in dict.fromkeys(r["scenario"] for r in rows)]
n = max((len(vals(s, "tcp1", "mbps")) for s in order), default=0)
print(f"| relay (gw) | TCP 1 stream Mbit/s median [min..max] | TCP 4 streams | UDP 500M delivered (loss %) "
      f"| UDP 100M delivered (loss %) | gw CPU % TCP 1 / UDP 100M | Gbit/s per gw core TCP 1 / UDP 500M "
      f"| ping ms | gw UDP rcvbuf drops | bg CPU % before (median / max) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for sc in order:
    t1 = vals(sc, "tcp1", "mbps")
    t4 = vals(sc, "tcp4", "mbps")
    u5, u5l = vals(sc, "udp", "mbps"), vals(sc, "udp", "retr_or_lossPct")
    u1, u1l = vals(sc, "udp2", "mbps"), vals(sc, "udp2", "retr_or_lossPct")
    c1, cu = med(vals(sc, "tcp1", "gw_cpu_pct")), med(vals(sc, "udp2", "gw_cpu_pct"))
    ping = med(vals(sc, "ping", "ping_avg_ms"))
    bg = [v for v in (f(r.get("bg_cpu_pct")) for r in rows if r["scenario"] == sc) if v is not None]
    err, dg = nstat_gw(sc)
    drops = f"{err} of {dg} ({100 * err / dg:.1f} %)" if dg else "NA"
    print(f"| {LABEL.get(sc, sc)} | {fmt(med(t1))} [{rng(t1)}] | {fmt(med(t4))} [{rng(t4)}] "
          f"| {fmt(med(u5))} ({rng(u5l, 1)}) | {fmt(med(u1))} ({rng(u1l, 1)}) | {fmt(c1)} / {fmt(cu)} "
          f"| {fmt(eff(sc, 'tcp1'), 2)} / {fmt(eff(sc, 'udp'), 2)} | {fmt(ping, 2)} | {drops} "
          f"| {fmt(med(bg))} / {fmt(max(bg) if bg else None)} |")
print(f"\n(n = {n} repetitions per cell; Mbit/s unless marked; UDP delivered = sent x (1 - loss))")

if "relay:custom" in order:
    print("\n| Rampart vs | Gbit/s per gw core, TCP 1 | per core, UDP 500M | gw CPU at UDP 100M (lower is better) "
          "| TCP 1 throughput | TCP 4 throughput |")
    print("|---|---|---|---|---|---|")

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "NA"

    for sc in order:
        if sc == "relay:custom":
            continue
        print(f"| {LABEL.get(sc, sc)} | {ratio(eff('relay:custom', 'tcp1'), eff(sc, 'tcp1'))} "
              f"| {ratio(eff('relay:custom', 'udp'), eff(sc, 'udp'))} "
              f"| {ratio(med(vals('relay:custom', 'udp2', 'gw_cpu_pct')), med(vals(sc, 'udp2', 'gw_cpu_pct')))} "
              f"| {ratio(med(vals('relay:custom', 'tcp1', 'mbps')), med(vals(sc, 'tcp1', 'mbps')))} "
              f"| {ratio(med(vals('relay:custom', 'tcp4', 'mbps')), med(vals(sc, 'tcp4', 'mbps')))} |")
    bad = [r for r in rows if r["scenario"] == "relay:custom" and r["test"] != "ping" and (f(r["mbps"]) or 0) < 1]
    bad += [r for r in rows if r["scenario"] == "relay:custom" and r["test"] == "ping" and f(r["ping_avg_ms"]) is None]
    if bad:
        print("\nWARNING: relay:custom runs without traffic: "
              + ", ".join(f"rep {r['rep']} {r['test']}" for r in bad))

mfiles = sorted(d.glob("rampart-metrics.start*.txt"))
if mfiles:
    print("\nRampart counters at the end of each gateway run (last /metrics scrape, <= 5 s before stop):")
    for p in mfiles:
        kv = {}
        for line in p.read_text().splitlines():
            m = re.match(r"^(rampart_\w+)(\{[^}]*\})?\s+([0-9.e+]+)$", line)
            if m:
                kv[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        drops = {k.split('reason="')[1].rstrip('"}'): int(v) for k, v in kv.items()
                 if k.startswith("rampart_dropped_packets_total") and 'reason="' in k and v}
        tx = kv.get('rampart_datagrams_sent_total', 0)
        calls = kv.get('rampart_udp_send_calls_total', 0)
        trains = kv.get('rampart_udp_send_trains_total', 0)
        in_trains = kv.get('rampart_udp_send_train_datagrams_total', 0)
        sends = (f"; {tx / calls:.1f} datagrams per send call" if calls else "") + (
            f", {in_trains / tx * 100:.0f} % of them in {int(trains)} GSO trains of {in_trains / trains:.1f}"
            if trains and tx else "")
        rx = kv.get('rampart_datagrams_received_total', 0)
        rcalls = kv.get('rampart_udp_receive_calls_total', 0)
        rtrains = kv.get('rampart_udp_receive_trains_total', 0)
        in_rtrains = kv.get('rampart_udp_receive_train_datagrams_total', 0)
        recvs = (f" ({rx / rcalls:.1f} per receive call" if rcalls else " (") + (
            f", GRO {'on' if kv.get('rampart_udp_gro_enabled') else 'off'}"
            if 'rampart_udp_gro_enabled' in kv else "") + (
            f", {in_rtrains / rx * 100:.0f} % in {int(rtrains)} GRO trains of {in_rtrains / rtrains:.1f}"
            if rtrains and rx else "") + ")"
        print(f"- {p.name}: datagrams rx {int(rx)}{recvs}, "
              f"tx {int(tx)}{sends}; drops by reason: "
              + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none"))
