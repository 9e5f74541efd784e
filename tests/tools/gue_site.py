#!/usr/bin/env python3
"""A userspace GUE site for the end-to-end tests of the unconnected on-ramp (`[[onramp.gue]]`).

  bridge  creates a TUN device in the current namespace (address --addr, routes --route ...) and carries its
          packets to the gateway in GUE over UDP (variant 0, or keyed: RCX1 private data with key id, counter
          and an HMAC-SHA256 tag), and the gateway's GUE replies back into the TUN. Prints READY.
  probe   sends --count ICMP echo requests (inner --src -> --dst) in GUE and prints one JSON line with what
          came back: {"sent": N, "replies": [{"src", "dst", "proto", "icmp_type"}...], "bad_replies": N}.
          --tamper flips a bit of the tag, --replay sends every packet twice (same counter), --flags sets GUE
          flags, --control sends control messages, --variant 1 sends bare IP packets.

Both bind UDP --bind:--port (the site's fou port: replies come back there) and send to --gw:--gw-port.
"""
import argparse
import fcntl
import hashlib
import hmac
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time


def checksum(b):
    if len(b) % 2:
        b += b"\x00"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def echo_request(src, dst, ident, seq):
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"rampart-gue-probe"
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    total = 20 + len(icmp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, seq, 0, 64, 1, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + icmp


class Sealer:
    """GUE encapsulation: variant 0 without private data, or keyed (RCX1 with key id, tag, counter)."""

    def __init__(self, key_hex=None, key_id=1, variant=0, flags=0, tamper=False):
        self.key = bytes.fromhex(key_hex) if key_hex else None
        self.key_id = key_id
        self.counter = 0
        self.variant = variant
        self.flags = flags
        self.tamper = tamper

    def seal(self, inner, counter=None):
        if self.variant == 1:
            return inner
        proto = 4 if inner[0] >> 4 == 4 else 41
        if not self.key:
            return struct.pack("!BBH", 0, proto, self.flags) + inner
        if counter is None:
            self.counter += 1
            counter = self.counter
        # RCX1: ver 1, flags 0, total length; TLVs KEY_ID (32), AUTH_TAG (33), COUNTER (34); zero padding.
        body = struct.pack("!BBI", 32, 4, self.key_id) + struct.pack("!BB", 33, 16) + b"\x00" * 16 \
            + struct.pack("!BBQ", 34, 8, counter)
        total = (4 + len(body) + 3) // 4 * 4
        ctx = bytearray(struct.pack("!BBH", 1, 0, total) + body + b"\x00" * (total - 4 - len(body)))
        hdr = struct.pack("!BBH", total // 4, proto, self.flags)
        tag_at = 4 + 6 + 2
        tag = hmac.new(self.key, hdr + bytes(ctx) + inner, hashlib.sha256).digest()[:16]
        if self.tamper:
            tag = bytes([tag[0] ^ 1]) + tag[1:]
        ctx[tag_at:tag_at + 16] = tag
        return hdr + bytes(ctx) + inner


def open_gue(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.bind, a.port))
    return s


def decap(d):
    """The inner packet of a GUE datagram from the gateway (it sends variant 0 without private data)."""
    if len(d) < 4 or d[0] >> 6 != 0 or d[0] & 0x20 or d[2:4] != b"\x00\x00":
        return None
    hlen = (d[0] & 0x1F) * 4
    return d[4 + hlen:]


TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def bridge(a):
    s = open_gue(a)
    sealer = Sealer(a.key, a.key_id)
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", a.tun.encode(), IFF_TUN | IFF_NO_PI))
    subprocess.run(["ip", "addr", "add", a.addr, "dev", a.tun], check=True)
    subprocess.run(["ip", "link", "set", a.tun, "up", "mtu", str(a.mtu)], check=True)
    for net in a.route:
        subprocess.run(["ip", "route", "add", net, "dev", a.tun], check=True)
    print("READY", flush=True)
    s.setblocking(False)
    while True:
        ready, _, _ = select.select([tun, s], [], [])
        if tun in ready:
            pkt = os.read(tun, 65536)
            try:
                s.sendto(sealer.seal(pkt), (a.gw, a.gw_port))
            except BlockingIOError:
                pass
        if s in ready:
            try:
                d, _ = s.recvfrom(65536)
            except BlockingIOError:
                continue
            inner = decap(d)
            if inner:
                os.write(tun, inner)


def probe(a):
    s = open_gue(a)
    sealer = Sealer(a.key, a.key_id, a.variant, a.flags, a.tamper)
    sent = 0
    for i in range(a.count):
        pkt = echo_request(a.src, a.dst, 0x4242, i + 1)
        if a.control:
            d = struct.pack("!BBH", 0x20, 1, 0) + pkt
        else:
            d = sealer.seal(pkt)
        s.sendto(d, (a.gw, a.gw_port))
        sent += 1
        if a.replay:
            s.sendto(d, (a.gw, a.gw_port))
            sent += 1
    out = {"sent": sent, "replies": [], "bad_replies": 0}
    deadline = time.monotonic() + a.wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([s], [], [], left)
        if not r:
            break
        d, frm = s.recvfrom(65536)
        inner = decap(d)
        if not inner or inner[0] >> 4 != 4 or len(inner) < 21:
            out["bad_replies"] += 1
            continue
        out["replies"].append({
            "from": frm[0],
            "src": socket.inet_ntoa(inner[12:16]),
            "dst": socket.inet_ntoa(inner[16:20]),
            "proto": inner[9],
            "icmp_type": inner[(inner[0] & 0xF) * 4] if inner[9] == 1 else None,
        })
    print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["bridge", "probe"])
    p.add_argument("--gw", required=True)
    p.add_argument("--gw-port", type=int, default=6080)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, default=6080)
    p.add_argument("--key", help="site key, 64 hex digits")
    p.add_argument("--key-id", type=int, default=1)
    p.add_argument("--tun", default="gue0")
    p.add_argument("--addr")
    p.add_argument("--mtu", type=int, default=1420)
    p.add_argument("--route", action="append", default=[])
    p.add_argument("--src")
    p.add_argument("--dst")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--wait", type=float, default=3.0)
    p.add_argument("--variant", type=int, default=0)
    p.add_argument("--flags", type=int, default=0)
    p.add_argument("--tamper", action="store_true")
    p.add_argument("--replay", action="store_true")
    p.add_argument("--control", action="store_true")
    a = p.parse_args()
    if a.mode == "probe":
        probe(a)
    else:
        bridge(a)


if __name__ == "__main__":
    sys.exit(main())
