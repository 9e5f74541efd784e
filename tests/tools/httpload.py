#!/usr/bin/env python3
"""Bounded HTTP load for end-to-end tests: COUNT GET requests to URL, PARALLEL at a time, each on a fresh
TCP connection (Connection: close). Prints one JSON line: {"ok", "failed", "bytes", "errors": [first few]}.

  httpload.py URL --count N --parallel P [--expect-bytes B] [--deadline S]
"""
import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--expect-bytes", type=int, default=-1)
    p.add_argument("--deadline", type=float, default=240.0)
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args()
    u = urllib.parse.urlparse(a.url)
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "failed": 0, "bytes": 0, "errors": []}
    stop_at = time.monotonic() + a.deadline

    def worker():
        while True:
            with lock:
                if state["next"] >= a.count or time.monotonic() > stop_at:
                    return
                state["next"] += 1
            try:
                c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=a.timeout)
                c.request("GET", u.path or "/", headers={"Connection": "close"})
                r = c.getresponse()
                body = r.read()
                c.close()
                good = r.status == 200 and (a.expect_bytes < 0 or len(body) == a.expect_bytes)
                err = None if good else "status %d, %d bytes" % (r.status, len(body))
            except Exception as e:  # counted, reported
                good, body, err = False, b"", repr(e)
            with lock:
                if good:
                    state["ok"] += 1
                    state["bytes"] += len(body)
                else:
                    state["failed"] += 1
                    if len(state["errors"]) < 5:
                        state["errors"].append(err)

    threads = [threading.Thread(target=worker) for _ in range(a.parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    del state["next"]
    print(json.dumps(state), flush=True)
    return 0 if state["ok"] == a.count else 1


if __name__ == "__main__":
    sys.exit(main())
