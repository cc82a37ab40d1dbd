#!/usr/bin/env python3
"""One publisher, one keep-alive connection, one message per request, each waiting for its answer:
N requests to ADDR PATH with BODY and HEADERS; prints requests/s. Used by scripts/bench-mercure.
Usage: bench-mercure-publish.py ADDR PATH BODY N [Header:Value ...]"""
import http.client
import sys
import time

addr, path, body, n = sys.argv[1], sys.argv[2], sys.argv[3].encode(), int(sys.argv[4])
headers = dict(h.split(":", 1) for h in sys.argv[5:])
host, port = addr.rsplit(":", 1)
c = http.client.HTTPConnection(host, int(port))
start = time.monotonic()
for _ in range(n):
    c.request("POST", path, body, headers)
    r = c.getresponse()
    r.read()
    if r.status not in (200, 201, 202):
        sys.exit(f"{path}: {r.status}")
print(f"{n / (time.monotonic() - start):.0f}")
