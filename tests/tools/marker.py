#!/usr/bin/env python3
"""Servers and clients that carry recognisable markers, for Rampart's end-to-end trust tests (python3 standard
library only). Run inside a test namespace; every mode is bounded in time (--timeout / --secs).

  marker.py tcp-serve --bind A --port P --marker M [--every SECS] [--banner] --log FILE
      Accepts TCP connections. With --every > 0 each connection gets "M n" lines every SECS (a chatty
      upstream); with --banner one "M" line on accept; otherwise it is silent. Logs JSON lines to FILE:
      {"event": "accept", "conn": k, "peer"}, {"event": "recv", "conn": k, "data"} and, when the connection
      ends, {"event": "closed", "conn": k, "how": "eof" | "reset" | "error"}.
  marker.py udp-serve --bind A --port P --marker M [--every SECS] [--echo] --log FILE
      Logs every datagram ({"event": "recv", "peer", "data"}). With --every > 0 it sends "M n" every SECS to
      each peer it has heard from; with --echo it answers each datagram with "M " + the datagram.
  marker.py http-serve --bind A --port P --body TEXT [--log FILE]
      Answers every HTTP request with 200 and TEXT (HTTP/1.0, one request per connection).
  marker.py tcp-hold --addr A --port P [--src S] [--send TEXT] [--secs SECS]
      A plain client: connects, sends TEXT, reads until the peer closes, the connection fails or SECS pass;
      prints CONNECTED once connected and, at the end, {"received", "how"} (how: eof, reset, error, secs).
  marker.py udp-hold --addr A --port P --src S [--sport N] --send TEXT [--every SECS] [--secs SECS]
      Sends TEXT every SECS (0: once) and prints what comes back: {"received": [...]} at the end.

Servers print LISTENING once bound, clients CONNECTED/SENT once started, so callers poll instead of sleeping.
"""

import argparse
import json
import socket
import sys
import threading
import time


def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class Log:
    def __init__(self, path):
        self.f = open(path, "a") if path else None
        self.lock = threading.Lock()

    def write(self, **kv):
        if not self.f:
            return
        kv["t"] = round(time.time(), 3)
        with self.lock:
            self.f.write(json.dumps(kv) + "\n")
            self.f.flush()


def tcp_serve(a):
    log = Log(a.log)
    srv = socket.socket(family(a.bind), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((a.bind, a.port))
    srv.listen(64)
    srv.settimeout(0.5)
    print("LISTENING", flush=True)
    deadline = time.monotonic() + a.timeout
    k = 0

    def serve(conn, k):
        done = threading.Event()

        def reader():
            how = "eof"
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    log.write(event="recv", conn=k, data=data.decode("utf-8", "replace"))
            except ConnectionResetError:
                how = "reset"
            except OSError as e:
                how = "error: %r" % (e,)
            log.write(event="closed", conn=k, how=how)
            done.set()

        threading.Thread(target=reader, daemon=True).start()
        try:
            if a.banner:
                conn.sendall(("%s\n" % a.marker).encode())
            n = 0
            while a.every > 0 and not done.is_set():
                conn.sendall(("%s %d\n" % (a.marker, n)).encode())
                n += 1
                done.wait(a.every)
        except OSError:
            pass
        done.wait()
        conn.close()

    while time.monotonic() < deadline:
        try:
            conn, peer = srv.accept()
        except socket.timeout:
            continue
        log.write(event="accept", conn=k, peer="%s:%d" % (peer[0], peer[1]))
        threading.Thread(target=serve, args=(conn, k), daemon=True).start()
        k += 1
    return 0


def udp_serve(a):
    log = Log(a.log)
    s = socket.socket(family(a.bind), socket.SOCK_DGRAM)
    s.bind((a.bind, a.port))
    print("LISTENING", flush=True)
    s.settimeout(0.05)
    peers = []
    deadline = time.monotonic() + a.timeout
    next_tick = time.monotonic()
    n = 0
    while time.monotonic() < deadline:
        try:
            data, peer = s.recvfrom(65535)
            log.write(event="recv", peer="%s:%d" % (peer[0], peer[1]), data=data.decode("utf-8", "replace"))
            if peer not in peers:
                peers.append(peer)
            if a.echo:
                s.sendto(("%s " % a.marker).encode() + data, peer)
        except socket.timeout:
            pass
        except OSError:
            continue
        if a.every > 0 and time.monotonic() >= next_tick:
            next_tick = time.monotonic() + a.every
            for p in peers:
                try:
                    s.sendto(("%s %d" % (a.marker, n)).encode(), p)
                except OSError:  # the peer's port is gone (ICMP unreachable): keep serving the others
                    pass
            n += 1
    return 0


def http_serve(a):
    log = Log(a.log)
    srv = socket.socket(family(a.bind), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((a.bind, a.port))
    srv.listen(64)
    srv.settimeout(0.5)
    print("LISTENING", flush=True)
    body = (a.body + "\n").encode()
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        try:
            conn, peer = srv.accept()
        except socket.timeout:
            continue
        try:
            conn.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 16384:
                data = conn.recv(4096)
                if not data:
                    break
                head += data
            log.write(event="request", peer="%s:%d" % (peer[0], peer[1]),
                      line=head.split(b"\r\n", 1)[0].decode("utf-8", "replace"))
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % len(body) + body)
        except OSError:
            pass
        finally:
            conn.close()
    return 0


def tcp_hold(a):
    try:
        c = socket.socket(family(a.addr), socket.SOCK_STREAM)
        if a.src:
            c.bind((a.src, a.sport))
        c.settimeout(10)
        c.connect((a.addr, a.port))
    except OSError as e:
        print(json.dumps({"received": "", "how": "connect failed: %r" % (e,)}), flush=True)
        return 1
    print("CONNECTED", flush=True)
    received = bytearray()
    how = "secs"
    try:
        if a.send:
            c.sendall(a.send.encode())
        end = time.monotonic() + a.secs
        while time.monotonic() < end:
            c.settimeout(max(0.05, min(1.0, end - time.monotonic())))
            try:
                data = c.recv(65536)
            except socket.timeout:
                continue
            if not data:
                how = "eof"
                break
            received += data
    except ConnectionResetError:
        how = "reset"
    except OSError as e:
        how = "error: %r" % (e,)
    print(json.dumps({"received": received.decode("utf-8", "replace"), "how": how}), flush=True)
    return 0


def udp_hold(a):
    s = socket.socket(family(a.addr), socket.SOCK_DGRAM)
    s.bind((a.src, a.sport))
    s.settimeout(0.05)
    received = []
    s.sendto(a.send.encode(), (a.addr, a.port))
    print("SENT", flush=True)
    end = time.monotonic() + a.secs
    next_send = time.monotonic() + a.every if a.every > 0 else end
    while time.monotonic() < end:
        if time.monotonic() >= next_send:
            try:
                s.sendto(a.send.encode(), (a.addr, a.port))
            except OSError:
                pass
            next_send = time.monotonic() + a.every
        try:
            data, _ = s.recvfrom(65535)
            if len(received) < 1000:
                received.append(data.decode("utf-8", "replace"))
        except socket.timeout:
            pass
        except OSError:
            pass
    print(json.dumps({"received": received}), flush=True)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)

    t = sub.add_parser("tcp-serve")
    t.add_argument("--bind", required=True)
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--marker", required=True)
    t.add_argument("--every", type=float, default=0.0)
    t.add_argument("--banner", action="store_true")
    t.add_argument("--log")
    t.add_argument("--timeout", type=float, default=900)

    u = sub.add_parser("udp-serve")
    u.add_argument("--bind", required=True)
    u.add_argument("--port", type=int, required=True)
    u.add_argument("--marker", required=True)
    u.add_argument("--every", type=float, default=0.0)
    u.add_argument("--echo", action="store_true")
    u.add_argument("--log")
    u.add_argument("--timeout", type=float, default=900)

    h = sub.add_parser("http-serve")
    h.add_argument("--bind", required=True)
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--body", required=True)
    h.add_argument("--log")
    h.add_argument("--timeout", type=float, default=900)

    c = sub.add_parser("tcp-hold")
    c.add_argument("--addr", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--src")
    c.add_argument("--sport", type=int, default=0)
    c.add_argument("--send", default="")
    c.add_argument("--secs", type=float, default=600)

    d = sub.add_parser("udp-hold")
    d.add_argument("--addr", required=True)
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--src", required=True)
    d.add_argument("--sport", type=int, default=0)
    d.add_argument("--send", required=True)
    d.add_argument("--every", type=float, default=0.0)
    d.add_argument("--secs", type=float, default=600)

    a = p.parse_args()
    return {"tcp-serve": tcp_serve, "udp-serve": udp_serve, "http-serve": http_serve, "tcp-hold": tcp_hold,
            "udp-hold": udp_hold}[a.mode](a)


if __name__ == "__main__":
    sys.exit(main())
