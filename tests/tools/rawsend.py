#!/usr/bin/env python3
"""Sends hand-made (malformed) IPv4 packets through the host's routing table with a raw socket.

Used by the end-to-end tests to push bad inner packets into a WireGuard tunnel: the client encrypts whatever
the kernel routes to the wg interface, so the gateway sees exactly these bytes after decryption.

  rawsend.py KIND --src A --dst B [--count N]

KIND: tcp-truncated (TCP header cut to 10 bytes), udp-badlen (UDP length field larger than the packet),
fragment (a UDP packet with More Fragments set), unknown-proto (IP protocol 253).
"""
import argparse
import socket
import struct
import sys


def ip_header(src, dst, proto, payload_len, frag=0):
    # Total length and checksum are filled in by the kernel for IP_HDRINCL sockets.
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0x1234, frag, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))


def build(kind, src, dst):
    if kind == "tcp-truncated":
        payload = struct.pack("!HH", 40000, 22) + b"\x00" * 6
        return ip_header(src, dst, 6, len(payload)) + payload
    if kind == "udp-badlen":
        payload = struct.pack("!HHHH", 40000, 5000, 200, 0) + b"abcd"
        return ip_header(src, dst, 17, len(payload)) + payload
    if kind == "fragment":
        payload = struct.pack("!HHHH", 40000, 5000, 8 + 64, 0) + b"x" * 64
        return ip_header(src, dst, 17, len(payload), frag=0x2000) + payload
    if kind == "unknown-proto":
        payload = b"\x00" * 16
        return ip_header(src, dst, 253, len(payload)) + payload
    raise SystemExit("unknown kind %r" % kind)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--count", type=int, default=1)
    a = p.parse_args()
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    pkt = build(a.kind, a.src, a.dst)
    for _ in range(a.count):
        s.sendto(pkt, (a.dst, 0))
    print("sent %d %s" % (a.count, a.kind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
