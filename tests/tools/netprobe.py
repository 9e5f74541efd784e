#!/usr/bin/env python3
"""Small network probes for Rampart's end-to-end tests (python3 standard library only).

Run inside a test namespace with `ip netns exec NS python3 netprobe.py ...`. Every mode is
bounded in time (--timeout) so a broken tunnel makes it fail instead of hang.

Modes:
  exchange serve|connect  full-duplex TCP transfer of N random bytes each way; prints one JSON
                          line {"sent", "sent_sha256", "recv", "recv_sha256"} computed on this end.
  ident serve             TCP server that answers every connection with its --name and logs
                          which client (the line the client sent) connected.
  ident probe             connects once, sends --me, prints the server's name (exit 1 on failure).
  udp recv                logs every datagram as "SRC_IP PAYLOAD" to --log.
  udp send                sends --count datagrams from --src to ADDR:PORT.

Servers print "LISTENING" on stdout once their socket is bound, so callers poll instead of sleep.
"""

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time


def family(addr):
    return socket.AF_INET6 if addr and ":" in addr else socket.AF_INET


def listen_tcp(bind, port, backlog):
    srv = socket.socket(family(bind), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(backlog)
    print("LISTENING", flush=True)
    return srv


def duplex(conn, nbytes):
    """Sends nbytes of random data while receiving until EOF; hashes both directions."""
    sent_hash = hashlib.sha256()
    errors = []
    handed = [0]  # bytes the kernel took (a cut transfer reports how far it got)

    def sender():
        try:
            remaining = nbytes
            while remaining > 0:
                chunk = os.urandom(min(65536, remaining))
                sent_hash.update(chunk)
                conn.sendall(chunk)
                handed[0] += len(chunk)
                remaining -= len(chunk)
            conn.shutdown(socket.SHUT_WR)
        except Exception as e:  # reported below, the receiver decides the exit code
            errors.append("send: " + repr(e))

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    recv_hash = hashlib.sha256()
    received = 0
    try:
        while True:
            data = conn.recv(262144)
            if not data:
                break
            recv_hash.update(data)
            received += len(data)
    except Exception as e:
        errors.append("recv after %d bytes: %r" % (received, e))
    t.join()
    conn.close()
    return {
        "sent": nbytes,
        "sent_to_kernel": handed[0],
        "sent_sha256": sent_hash.hexdigest(),
        "recv": received,
        "recv_sha256": recv_hash.hexdigest(),
        "errors": errors,
    }


def cmd_exchange(a):
    if a.role == "serve":
        srv = listen_tcp(a.bind, a.port, 1)
        srv.settimeout(a.timeout)
        conn, _peer = srv.accept()
        srv.close()
    else:
        deadline = time.monotonic() + a.timeout
        while True:
            try:
                source = (a.src or "", a.sport) if a.sport or a.src else None
                conn = socket.create_connection((a.addr, a.port), timeout=5, source_address=source)
                break
            except OSError as e:
                if time.monotonic() >= deadline:
                    print("connect failed: %r" % (e,), file=sys.stderr)
                    return 1
                time.sleep(0.5)
    conn.settimeout(a.idle_timeout)
    result = duplex(conn, a.bytes)
    print(json.dumps(result), flush=True)
    return 0 if not result["errors"] else 2


def read_line(conn, limit=512):
    buf = b""
    while b"\n" not in buf and len(buf) < limit:
        data = conn.recv(limit)
        if not data:
            break
        buf += data
    return buf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def cmd_ident(a):
    if a.role == "serve":
        srv = listen_tcp(a.bind, a.port, 16)
        srv.settimeout(0.5)
        deadline = time.monotonic() + a.timeout
        with open(a.log, "a") as log:
            while time.monotonic() < deadline:
                try:
                    conn, peer = srv.accept()
                except socket.timeout:
                    continue
                try:
                    conn.settimeout(5)
                    who = read_line(conn)
                    log.write("from=%s peer=%s\n" % (who, peer[0]))
                    log.flush()
                    conn.sendall((a.name + "\n").encode())
                except OSError as e:
                    log.write("error=%r peer=%s\n" % (e, peer[0]))
                    log.flush()
                finally:
                    conn.close()
        return 0
    try:
        conn = socket.create_connection((a.addr, a.port), timeout=a.timeout)
        conn.settimeout(a.timeout)
        conn.sendall((a.me + "\n").encode())
        answer = read_line(conn)
        conn.close()
    except OSError as e:
        print("probe failed: %r" % (e,), file=sys.stderr)
        return 1
    if not answer:
        print("probe failed: empty answer", file=sys.stderr)
        return 1
    print(answer, flush=True)
    return 0


def cmd_udp(a):
    s = socket.socket(family(a.bind if a.role == "recv" else a.addr), socket.SOCK_DGRAM)
    if a.role == "recv":
        s.bind((a.bind, a.port))
        print("LISTENING", flush=True)
        s.settimeout(0.5)
        deadline = time.monotonic() + a.timeout
        with open(a.log, "a") as log:
            while time.monotonic() < deadline:
                try:
                    data, peer = s.recvfrom(65535)
                except socket.timeout:
                    continue
                log.write("%s %s\n" % (peer[0], data.decode("utf-8", "replace")))
                log.flush()
        return 0
    s.bind((a.src, 0))
    for i in range(a.count):
        s.sendto(("%s %d" % (a.payload, i)).encode(), (a.addr, a.port))
        time.sleep(a.interval)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)

    ex = sub.add_parser("exchange")
    ex.add_argument("role", choices=["serve", "connect"])
    ex.add_argument("--bind", default="0.0.0.0")
    ex.add_argument("--addr")
    ex.add_argument("--src", help="connect: source address")
    ex.add_argument("--sport", type=int, default=0, help="connect: source port (0: any)")
    ex.add_argument("--port", type=int, required=True)
    ex.add_argument("--bytes", type=int, required=True)
    ex.add_argument("--timeout", type=float, default=60, help="accept/connect deadline (s)")
    ex.add_argument("--idle-timeout", type=float, default=60, help="max silence during transfer (s)")

    idp = sub.add_parser("ident")
    idp.add_argument("role", choices=["serve", "probe"])
    idp.add_argument("--bind", default="0.0.0.0")
    idp.add_argument("--addr")
    idp.add_argument("--port", type=int, required=True)
    idp.add_argument("--name", help="identity a server answers with")
    idp.add_argument("--me", help="identity a probe announces")
    idp.add_argument("--log", help="server log of connecting identities")
    idp.add_argument("--timeout", type=float, default=300)

    ud = sub.add_parser("udp")
    ud.add_argument("role", choices=["recv", "send"])
    ud.add_argument("--bind", default="0.0.0.0")
    ud.add_argument("--src", default="")
    ud.add_argument("--addr")
    ud.add_argument("--port", type=int, required=True)
    ud.add_argument("--count", type=int, default=1)
    ud.add_argument("--interval", type=float, default=0.02)
    ud.add_argument("--payload", default="probe")
    ud.add_argument("--log")
    ud.add_argument("--timeout", type=float, default=300)

    a = p.parse_args()
    return {"exchange": cmd_exchange, "ident": cmd_ident, "udp": cmd_udp}[a.mode](a)


if __name__ == "__main__":
    sys.exit(main())
