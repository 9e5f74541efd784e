#!/usr/bin/env python3
"""A connected on-ramp client for Rampart's end-to-end tests (python3 standard library only): what a tunnel
terminator does, over the gateway's Unix SOCK_SEQPACKET socket.

Modes:
  bridge   connects, sends an RCX1 context, prints the reply as one JSON line, then creates a TUN device in
           the current namespace (address --addr, routes --route ...) and copies packets between the TUN and
           the connection, one IP packet per datagram, until the connection or the process ends.
  probe    connects (optionally as --uid/--gid), sends --first (hex) or a context built from --tenant/--site/
           --device, prints {"reply": {...}|null, "closed": bool}; with --garbage N it then sends N datagrams
           that are not IP packets and reports whether the gateway closed the connection.

Every wait is bounded (--timeout) so a broken gateway makes it fail instead of hang.
"""

import argparse
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time

STATUS = {
    0: "accepted",
    1: "malformed",
    2: "not_permitted",
    3: "tenant_not_allowed",
    4: "unknown_tenant",
    5: "too_many_connections",
    6: "claim_not_allowed",
}


def context(tenant, site=None, device=None):
    """The canonical RCX1 encoding (docs/onramps.md): header, TLVs in type order, zero padding to 4."""
    body = b""
    for t, v in ((1, tenant), (2, site), (3, device)):
        if v is not None:
            v = v.encode()
            body += bytes([t, len(v)]) + v
    total = 4 + len(body)
    total += (-total) % 4
    return bytes([1, 0]) + struct.pack(">H", total) + body + b"\0" * (total - 4 - len(body))


def parse_reply(b):
    if len(b) != 12 or b[0] != 1:
        return {"raw": b.hex()}
    return {"status": STATUS.get(b[1], b[1]), "session": struct.unpack(">Q", b[4:])[0]}


def connect(path, timeout):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    s.connect(path)
    return s


def recv_or_close(s, timeout):
    """The next datagram, or None when the gateway closed the connection (or timed out: 'timeout')."""
    s.settimeout(timeout)
    try:
        b = s.recv(65536)
    except socket.timeout:
        return "timeout"
    except (ConnectionResetError, BrokenPipeError):
        return None
    return b if b else None


def probe(a):
    if a.gid is not None:
        os.setgroups([])
        os.setgid(a.gid)
    if a.uid is not None:
        os.setuid(a.uid)
    s = connect(a.socket, a.timeout)
    first = bytes.fromhex(a.first) if a.first is not None else context(a.tenant, a.site, a.device)
    s.send(first)
    out = {"reply": None, "closed": False}
    if not a.no_reply:
        r = recv_or_close(s, a.timeout)
        if r is None:
            out["closed"] = True
        elif r != "timeout":
            out["reply"] = parse_reply(r)
    if a.garbage and not out["closed"]:
        sent = 0
        for i in range(a.garbage):
            try:
                s.send(b"garbage %d" % i)
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                break
        out["garbage_sent"] = sent
    if not out["closed"]:
        # Closed by the gateway: recv returns b"" (or a reset); still open: it times out.
        r = recv_or_close(s, a.wait_close)
        out["closed"] = r is None
    print(json.dumps(out), flush=True)


TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def bridge(a):
    s = connect(a.socket, a.timeout)
    s.send(context(a.tenant, a.site, a.device))
    r = recv_or_close(s, a.timeout)
    reply = parse_reply(r) if isinstance(r, bytes) else None
    print(json.dumps({"reply": reply}), flush=True)
    if not reply or reply.get("status") != "accepted":
        sys.exit(1)
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", a.tun.encode(), IFF_TUN | IFF_NO_PI))
    subprocess.run(["ip", "addr", "add", a.addr, "dev", a.tun], check=True)
    subprocess.run(["ip", "link", "set", a.tun, "up", "mtu", "1420"], check=True)
    for net in a.route:
        subprocess.run(["ip", "route", "add", net, "dev", a.tun], check=True)
    print("READY", flush=True)
    s.setblocking(False)
    while True:
        ready, _, _ = select.select([tun, s], [], [])
        if tun in ready:
            pkt = os.read(tun, 65536)
            try:
                s.send(pkt)
            except BlockingIOError:
                pass  # the gateway reads slower than we write: dropped here, TCP recovers
        if s in ready:
            try:
                pkt = s.recv(65536)
            except BlockingIOError:
                continue
            if not pkt:
                print("CLOSED", flush=True)
                return
            os.write(tun, pkt)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["bridge", "probe"])
    p.add_argument("--socket", required=True)
    p.add_argument("--tenant")
    p.add_argument("--site")
    p.add_argument("--device")
    p.add_argument("--first", help="first datagram, hex (instead of a context)")
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    p.add_argument("--no-reply", action="store_true")
    p.add_argument("--garbage", type=int, default=0)
    p.add_argument("--wait-close", type=float, default=10.0)
    p.add_argument("--tun", default="onr0")
    p.add_argument("--addr")
    p.add_argument("--route", action="append", default=[])
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()
    if a.mode == "probe":
        probe(a)
    else:
        bridge(a)


if __name__ == "__main__":
    main()
