#!/usr/bin/env python3
"""A device-side attacker for Rampart's end-to-end tests: raw IPv4/IPv6 TCP and UDP through a device's
WireGuard interface (python3 standard library only).

It sends and receives with an AF_PACKET socket bound to the wg interface, so it bypasses the device's own
routing and source checks: it can address 127.0.0.1, the gateway's underlay address, 169.254.169.254, a
5-tuple of a connection the kernel owns, and it can put IPv6 extension headers in front of TCP. wireguard-go
encrypts whatever the interface transmits (its AllowedIPs decide which peer), so the gateway sees exactly
these bytes after decryption. Every mode is bounded in time.

  rawtcp.py connect --iface IF --src A --dst B --dport P [--sport S] [--count N] [--send TEXT] [--hold SECS]
                    [--adopt] [--answer-wait SECS]
      Opens N TCP connections (source ports S..S+N-1) one after another (the next starts once the previous
      one was answered or timed out, so they claim gateway state in that order), prints OPENED, sends TEXT
      ({i} is the connection's index) on each established one, ACKs whatever arrives for HOLD seconds, then
      resets them. With --adopt, a bare ACK answering the SYN (the challenge ACK of a socket that is already
      established on that 4-tuple) is taken as the peer's sequence numbers and the connection goes on from
      there (a hijack). The device kernel's own RSTs for these ports are dropped by an nft rule while it runs.
      Prints one JSON line: {"conns": [{"sport", "state", "received", "rst", "fin"}]}; state is established,
      adopted, reset, unreachable or timeout.
  syn --iface IF --src A --dst B --dport P [--sport S] [--hbh] [--wait SECS]
      One SYN (with --hbh: behind an IPv6 Hop-by-Hop header); prints {"answer": synack|rst|icmp|none}.
  rst --iface IF --src A --dst B --dport P --sport S [--learn SECS]
      Learns the sequence number of the connection from one of its segments that the device sends (within
      SECS), then sends a RST whose sequence number is 2^31 away from it: out of any window, a peer that
      checks ignores it. Prints {"sent_seq", "learned_seq"}.
  acks --iface IF --src A --dst B --dport P --sport S [--count N] [--every SECS]
      N bare ACKs on the 5-tuple (arbitrary numbers), one every SECS.
  udp --iface IF --src A --dst B --dport P [--sport S] [--flows N] [--send TEXT] [--every SECS] [--hold SECS]
      Opens N UDP flows (source ports S..S+N-1, one after another), sends TEXT ({i} = flow index) on each every
      SECS for HOLD seconds, and collects what comes back on each. A kernel UDP socket bound to each source
      port keeps the device from answering with ICMP port unreachable. Prints {"flows": [{"sport", "replies"}]}.
  flood --iface IF --src A --dst B [--secs SECS] [--rate PPS]
      TCP SYNs and UDP datagrams to random ports of B from random source ports, at most PPS packets per second
      for SECS seconds. Prints {"sent": n}.
  sniff --iface IF [--secs SECS] --marker M [--marker M2 ...] [--all-directions]
      Prints LISTENING, then counts the packets the interface receives whose payload contains each marker
      (with --all-directions also the ones it sends), and the 5-tuples they travelled on. Prints
      {"counts": {M: n}, "tuples": {M: ["tcp SRC:SPORT > DST:DPORT"]}, "packets": n}.
"""

import argparse
import ipaddress
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4

PROTO_HOPOPT = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ICMPV6 = 58
PROTO_DSTOPTS = 60

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def checksum(data):
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


class Addr:
    """Source and destination of one flow, IPv4 or IPv6."""

    def __init__(self, src, dst):
        self.src = ipaddress.ip_address(src)
        self.dst = ipaddress.ip_address(dst)
        if self.src.version != self.dst.version:
            raise SystemExit("--src and --dst must be the same IP version")
        self.v6 = self.src.version == 6

    def pseudo(self, proto, length, src=None, dst=None):
        src, dst = (src or self.src).packed, (dst or self.dst).packed
        if self.v6:
            return src + dst + struct.pack("!IxxxB", length, proto)
        return src + dst + struct.pack("!xBH", proto, length)

    def packet(self, proto, l4, hbh=False):
        """An IP packet around the L4 bytes `l4` (whose checksum field must already be filled)."""
        if self.v6:
            ext = b""
            nh = proto
            if hbh:
                # Hop-by-Hop Options: next header, length 0 (8 bytes), one PadN option of 4 bytes.
                ext = struct.pack("!BBBB4x", proto, 0, 1, 4)
                nh = PROTO_HOPOPT
            hdr = struct.pack("!IHBB", 6 << 28, len(ext) + len(l4), nh, 64)
            return hdr + self.src.packed + self.dst.packed + ext + l4
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), random.randrange(65536), 0x4000, 64, proto, 0,
                          self.src.packed, self.dst.packed)
        hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
        return hdr + l4


def tcp_segment(addr, sport, dport, seq, ack, flags, payload=b"", mss=None, hbh=False):
    opts = struct.pack("!BBH", 2, 4, mss) if mss else b""
    off = (20 + len(opts)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, off << 4, flags, 65535, 0, 0)
    seg = hdr + opts + payload
    c = checksum(addr.pseudo(PROTO_TCP, len(seg)) + seg)
    seg = seg[:16] + struct.pack("!H", c) + seg[18:]
    return addr.packet(PROTO_TCP, seg, hbh=hbh)


def udp_datagram(addr, sport, dport, payload):
    d = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = checksum(addr.pseudo(PROTO_UDP, len(d)) + d) or 0xFFFF
    d = d[:6] + struct.pack("!H", c) + d[8:]
    return addr.packet(PROTO_UDP, d)


class Parsed:
    __slots__ = ("src", "dst", "proto", "sport", "dport", "seq", "ack", "flags", "payload", "icmp_type")


def parse(pkt):
    """The IP packet's addresses and L4 fields (IPv6 extension headers are walked); None if not TCP/UDP/ICMP."""
    if not pkt:
        return None
    p = Parsed()
    p.sport = p.dport = p.seq = p.ack = p.flags = 0
    p.icmp_type = None
    p.payload = b""
    ver = pkt[0] >> 4
    if ver == 4 and len(pkt) >= 20:
        ihl = (pkt[0] & 0xF) * 4
        total = struct.unpack("!H", pkt[2:4])[0]
        p.proto = pkt[9]
        p.src = str(ipaddress.IPv4Address(pkt[12:16]))
        p.dst = str(ipaddress.IPv4Address(pkt[16:20]))
        l4 = pkt[ihl:max(total, ihl)]
    elif ver == 6 and len(pkt) >= 40:
        nh = pkt[6]
        p.src = str(ipaddress.IPv6Address(pkt[8:24]))
        p.dst = str(ipaddress.IPv6Address(pkt[24:40]))
        off = 40
        for _ in range(8):
            if nh in (PROTO_HOPOPT, PROTO_ROUTING, PROTO_DSTOPTS) and len(pkt) >= off + 8:
                nh, off = pkt[off], off + (pkt[off + 1] + 1) * 8
            elif nh == PROTO_FRAGMENT and len(pkt) >= off + 8:
                nh, off = pkt[off], off + 8
            else:
                break
        p.proto = nh
        l4 = pkt[off:]
    else:
        return None
    if p.proto == PROTO_TCP and len(l4) >= 20:
        p.sport, p.dport, p.seq, p.ack, offx, p.flags = struct.unpack("!HHIIBB", l4[:14])
        p.payload = l4[(offx >> 4) * 4:]
    elif p.proto == PROTO_UDP and len(l4) >= 8:
        p.sport, p.dport = struct.unpack("!HH", l4[:4])
        p.payload = l4[8:]
    elif p.proto in (PROTO_ICMP, PROTO_ICMPV6) and len(l4) >= 4:
        p.icmp_type = l4[0]
        p.payload = l4[4:]
    else:
        p.payload = l4
    return p


class Iface:
    """An AF_PACKET socket on the wg interface: everything it receives and sends."""

    def __init__(self, name):
        self.name = name
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        self.sock.bind((name, ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def send(self, pkt):
        proto = ETH_P_IPV6 if pkt[0] >> 4 == 6 else ETH_P_IP
        try:
            self.sock.sendto(pkt, (self.name, proto))
            return True
        except OSError:  # e.g. ENOBUFS under a flood: the packet is lost, like on a wire
            return False

    def recv(self, timeout):
        """(packet, outgoing) or None at timeout."""
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return None
        data, meta = self.sock.recvfrom(65535)
        return data, meta[2] == PACKET_OUTGOING


class RstFilter:
    """An nft table dropping the device kernel's own RSTs from the given source ports on the interface (the
    kernel knows no socket for our handshakes and would reset them). Removed on exit, also on SIGTERM."""

    def __init__(self, iface, sports):
        self.table = "rawtcp%d" % os.getpid()
        lo, hi = min(sports), max(sports)
        rules = (
            "table inet %s {\n chain out {\n  type filter hook output priority 0; policy accept;\n"
            "  oifname \"%s\" tcp sport %d-%d tcp flags & rst == rst drop\n }\n}\n" % (self.table, iface, lo, hi)
        )
        subprocess.run(["nft", "-f", "-"], input=rules.encode(), check=True)
        signal.signal(signal.SIGTERM, self._term)

    def _term(self, *_):
        self.remove()
        sys.exit(3)

    def remove(self):
        if self.table:
            subprocess.run(["nft", "delete", "table", "inet", self.table], check=False)
            self.table = None


class Conn:
    def __init__(self, addr, sport, dport, index):
        self.addr, self.sport, self.dport, self.index = addr, sport, dport, index
        self.iss = random.randrange(1 << 32)
        self.snd_nxt = (self.iss + 1) & 0xFFFFFFFF
        self.rcv_nxt = 0
        self.state = "syn_sent"
        self.received = bytearray()
        self.rst = False
        self.fin = False
        self.unacked = None  # (seq, payload, sent_at, tries)

    def matches(self, p):
        return (p.proto == PROTO_TCP and p.src == str(self.addr.dst) and p.dst == str(self.addr.src)
                and p.sport == self.dport and p.dport == self.sport)

    def seg(self, flags, payload=b"", seq=None):
        return tcp_segment(self.addr, self.sport, self.dport, self.snd_nxt if seq is None else seq,
                           self.rcv_nxt, flags, payload)

    def syn(self):
        return tcp_segment(self.addr, self.sport, self.dport, self.iss, 0, SYN, mss=1200)

    def open(self):
        return self.state in ("established", "adopted")

    def handle(self, p, iface, adopt):
        """One received segment of this connection."""
        if p.flags & RST:
            self.rst = True
            if self.state == "syn_sent":
                self.state = "reset"
            elif self.open():
                self.state = "reset"
            return
        if self.state == "syn_sent":
            if p.flags & SYN and p.flags & ACK and p.ack == self.snd_nxt:
                self.rcv_nxt = (p.seq + 1) & 0xFFFFFFFF
                self.state = "established"
                iface.send(self.seg(ACK))
            elif adopt and p.flags & ACK and not p.flags & SYN:
                # A challenge ACK: the socket on the other side is established; its numbers are in this ACK.
                self.snd_nxt = p.ack
                self.rcv_nxt = (p.seq + len(p.payload)) & 0xFFFFFFFF
                self.received += p.payload
                self.state = "adopted"
                iface.send(self.seg(ACK))
            return
        if not self.open():
            return
        if p.payload:
            self.received += p.payload
            if p.seq == self.rcv_nxt:
                self.rcv_nxt = (self.rcv_nxt + len(p.payload)) & 0xFFFFFFFF
        if p.flags & FIN and (p.seq + len(p.payload)) & 0xFFFFFFFF == self.rcv_nxt:
            self.fin = True
            self.rcv_nxt = (self.rcv_nxt + 1) & 0xFFFFFFFF
        if self.unacked and p.flags & ACK:
            seq, payload, _, _ = self.unacked
            if ((p.ack - (seq + len(payload))) & 0xFFFFFFFF) < (1 << 31):
                self.unacked = None
        if p.payload or p.flags & FIN:
            iface.send(self.seg(ACK))

    def send_payload(self, iface, payload):
        self.unacked = (self.snd_nxt, payload, time.monotonic(), 1)
        iface.send(self.seg(PSH | ACK, payload))
        self.snd_nxt = (self.snd_nxt + len(payload)) & 0xFFFFFFFF

    def tick(self, iface):
        if self.open() and self.unacked:
            seq, payload, at, tries = self.unacked
            if time.monotonic() - at > 1.0 and tries < 5:
                self.unacked = (seq, payload, time.monotonic(), tries + 1)
                iface.send(self.seg(PSH | ACK, payload, seq=seq))

    def report(self):
        return {"sport": self.sport, "state": self.state, "rst": self.rst, "fin": self.fin,
                "received": self.received.decode("utf-8", "replace")}


def pump(iface, conns, until, adopt):
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return
        got = iface.recv(min(left, 0.2))
        for c in conns:
            c.tick(iface)
        if not got:
            continue
        pkt, outgoing = got
        if outgoing:
            continue
        p = parse(pkt)
        if p is None:
            continue
        for c in conns:
            if c.matches(p):
                c.handle(p, iface, adopt)
            elif (p.icmp_type is not None and c.state == "syn_sent" and p.proto in (PROTO_ICMP, PROTO_ICMPV6)
                  and p.icmp_type in (3, 1)):
                inner = parse(p.payload[4:])
                if inner and inner.proto == PROTO_TCP and inner.sport == c.sport and inner.dport == c.dport:
                    c.state = "unreachable"


def cmd_connect(a):
    addr = Addr(a.src, a.dst)
    iface = Iface(a.iface)
    sports = [a.sport + i for i in range(a.count)]
    flt = RstFilter(a.iface, sports)
    conns = []
    try:
        for i, sport in enumerate(sports):
            c = Conn(addr, sport, a.dport, i)
            conns.append(c)
            deadline = time.monotonic() + a.answer_wait
            while c.state == "syn_sent" and time.monotonic() < deadline:
                iface.send(c.syn())
                pump(iface, conns, min(deadline, time.monotonic() + 1.0), a.adopt)
            if c.state == "syn_sent":
                c.state = "timeout"
            elif c.open() and a.send:
                c.send_payload(iface, a.send.replace("{i}", str(i)).encode())
        print("OPENED", flush=True)
        pump(iface, conns, time.monotonic() + a.hold, a.adopt)
        for c in conns:
            if c.open():
                iface.send(c.seg(RST | ACK))
    finally:
        flt.remove()
    print(json.dumps({"conns": [c.report() for c in conns]}), flush=True)
    return 0


def cmd_syn(a):
    addr = Addr(a.src, a.dst)
    iface = Iface(a.iface)
    flt = RstFilter(a.iface, [a.sport])
    iss = random.randrange(1 << 32)
    answer, detail = "none", ""
    try:
        iface.send(tcp_segment(addr, a.sport, a.dport, iss, 0, SYN, mss=1200, hbh=a.hbh))
        deadline = time.monotonic() + a.wait
        while answer == "none" and time.monotonic() < deadline:
            got = iface.recv(deadline - time.monotonic())
            if not got or got[1]:
                continue
            p = parse(got[0])
            if p is None or p.src != str(addr.dst):
                continue
            if p.proto == PROTO_TCP and p.sport == a.dport and p.dport == a.sport:
                if p.flags & RST:
                    answer = "rst"
                elif p.flags & SYN and p.flags & ACK:
                    answer = "synack"
                    # Do not leave a half-open connection behind.
                    iface.send(tcp_segment(addr, a.sport, a.dport, iss + 1, 0, RST))
            elif p.proto in (PROTO_ICMP, PROTO_ICMPV6) and p.icmp_type in (1, 3):
                answer, detail = "icmp", "type %d" % p.icmp_type
    finally:
        flt.remove()
    print(json.dumps({"answer": answer, "detail": detail}), flush=True)
    return 0


def cmd_rst(a):
    addr = Addr(a.src, a.dst)
    iface = Iface(a.iface)
    learned = None
    deadline = time.monotonic() + a.learn
    while learned is None and time.monotonic() < deadline:
        got = iface.recv(deadline - time.monotonic())
        if not got or not got[1]:
            continue
        p = parse(got[0])
        if (p and p.proto == PROTO_TCP and p.src == str(addr.src) and p.dst == str(addr.dst)
                and p.sport == a.sport and p.dport == a.dport):
            learned = p.seq
    if learned is None:
        print("no segment of %s:%d -> %s:%d seen within %ss" % (a.src, a.sport, a.dst, a.dport, a.learn),
              file=sys.stderr)
        return 1
    bad = (learned + (1 << 31)) & 0xFFFFFFFF
    iface.send(tcp_segment(addr, a.sport, a.dport, bad, 0, RST))
    print(json.dumps({"learned_seq": learned, "sent_seq": bad}), flush=True)
    return 0


def cmd_acks(a):
    addr = Addr(a.src, a.dst)
    iface = Iface(a.iface)
    sent = 0
    for _ in range(a.count):
        if iface.send(tcp_segment(addr, a.sport, a.dport, random.randrange(1 << 32), random.randrange(1 << 32), ACK)):
            sent += 1
        time.sleep(a.every)
    print(json.dumps({"sent": sent}), flush=True)
    return 0 if sent == a.count else 1


def cmd_udp(a):
    addr = Addr(a.src, a.dst)
    iface = Iface(a.iface)
    family = socket.AF_INET6 if addr.v6 else socket.AF_INET
    flows = []
    absorbers = []
    for i in range(a.flows):
        sport = a.sport + i
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind(("::" if addr.v6 else "0.0.0.0", sport))
        absorbers.append(s)
        flows.append({"sport": sport, "replies": [], "index": i})

    def send(f):
        payload = a.send.replace("{i}", str(f["index"])).encode()
        iface.send(udp_datagram(addr, f["sport"], a.dport, payload))

    def collect(until):
        while time.monotonic() < until:
            got = iface.recv(until - time.monotonic())
            if not got or got[1]:
                continue
            p = parse(got[0])
            if p is None or p.proto != PROTO_UDP or p.dst != str(addr.src):
                continue
            for f in flows:
                if p.dport == f["sport"] and len(f["replies"]) < 200:
                    f["replies"].append(p.payload.decode("utf-8", "replace"))

    for f in flows:
        send(f)
        collect(time.monotonic() + a.gap)
    print("OPENED", flush=True)
    end = time.monotonic() + a.hold
    while time.monotonic() < end:
        for f in flows:
            send(f)
        collect(min(end, time.monotonic() + a.every))
    for s in absorbers:
        s.close()
    print(json.dumps({"flows": [{"sport": f["sport"], "replies": f["replies"]} for f in flows]}), flush=True)
    return 0


def cmd_flood(a):
    addr = Addr(a.src, a.dst)
    iface = Iface(a.iface)
    sent = 0
    start = time.monotonic()
    end = start + a.secs
    while True:
        now = time.monotonic()
        if now >= end:
            break
        # Pace to the rate in batches of 50.
        due = int((now - start) * a.rate)
        if sent >= due:
            time.sleep(min(0.01, end - now))
            continue
        for _ in range(min(50, due - sent)):
            sport, dport = random.randrange(1024, 65536), random.randrange(1, 65536)
            if sent % 2:
                pkt = udp_datagram(addr, sport, dport, b"flood")
            else:
                pkt = tcp_segment(addr, sport, dport, random.randrange(1 << 32), 0, SYN)
            iface.send(pkt)
            sent += 1
    print(json.dumps({"sent": sent, "secs": round(time.monotonic() - start, 1)}), flush=True)
    return 0


def cmd_sniff(a):
    iface = Iface(a.iface)
    markers = [m.encode() for m in a.marker]
    counts = {m: 0 for m in a.marker}
    tuples = {m: set() for m in a.marker}
    packets = 0
    print("LISTENING", flush=True)
    end = time.monotonic() + a.secs
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop and time.monotonic() < end:
        try:
            got = iface.recv(min(0.2, end - time.monotonic()))
        except InterruptedError:
            continue
        if not got:
            continue
        pkt, outgoing = got
        if outgoing and not a.all_directions:
            continue
        packets += 1
        p = parse(pkt)
        data = p.payload if p else pkt
        for m, text in zip(markers, a.marker):
            if m in data:
                counts[text] += 1
                if p:
                    name = {PROTO_TCP: "tcp", PROTO_UDP: "udp"}.get(p.proto, "proto%d" % p.proto)
                    tuples[text].add("%s %s:%d > %s:%d" % (name, p.src, p.sport, p.dst, p.dport))
    print(json.dumps({"counts": counts, "tuples": {m: sorted(t) for m, t in tuples.items()},
                      "packets": packets}), flush=True)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)

    def flow(sp, need_sport=False):
        sp.add_argument("--iface", required=True)
        sp.add_argument("--src", required=True)
        sp.add_argument("--dst", required=True)
        sp.add_argument("--dport", type=int, required=True)
        if need_sport:
            sp.add_argument("--sport", type=int, required=True)
        else:
            sp.add_argument("--sport", type=int, default=random.randrange(20000, 40000))

    c = sub.add_parser("connect")
    flow(c)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--send", default="")
    c.add_argument("--hold", type=float, default=3.0)
    c.add_argument("--adopt", action="store_true")
    c.add_argument("--answer-wait", type=float, default=5.0)

    s = sub.add_parser("syn")
    flow(s)
    s.add_argument("--hbh", action="store_true")
    s.add_argument("--wait", type=float, default=3.0)

    r = sub.add_parser("rst")
    flow(r, need_sport=True)
    r.add_argument("--learn", type=float, default=10.0)

    k = sub.add_parser("acks")
    flow(k, need_sport=True)
    k.add_argument("--count", type=int, default=5)
    k.add_argument("--every", type=float, default=0.05)

    u = sub.add_parser("udp")
    flow(u)
    u.add_argument("--flows", type=int, default=1)
    u.add_argument("--send", default="udp {i}")
    u.add_argument("--every", type=float, default=0.2)
    u.add_argument("--gap", type=float, default=0.3, help="wait after each flow's first datagram")
    u.add_argument("--hold", type=float, default=3.0)

    f = sub.add_parser("flood")
    f.add_argument("--iface", required=True)
    f.add_argument("--src", required=True)
    f.add_argument("--dst", required=True)
    f.add_argument("--secs", type=float, default=10.0)
    f.add_argument("--rate", type=float, default=2000.0)

    n = sub.add_parser("sniff")
    n.add_argument("--iface", required=True)
    n.add_argument("--secs", type=float, default=10.0)
    n.add_argument("--marker", action="append", required=True)
    n.add_argument("--all-directions", action="store_true")

    a = p.parse_args()
    return {"connect": cmd_connect, "syn": cmd_syn, "rst": cmd_rst, "acks": cmd_acks, "udp": cmd_udp,
            "flood": cmd_flood, "sniff": cmd_sniff}[a.mode](a)


if __name__ == "__main__":
    sys.exit(main())
