"""Connecting to one of several equally good hosts: the first that answers (RFC 8305).

RFC 5321 5.1 says to try MX hosts in order of preference and leaves the order among equal
preferences to the sender. Rather than wait out a connect timeout on a host that does not
answer, the relay starts a connection to the first address, and to the next one
CONNECTION_ATTEMPT_DELAY later (or as soon as one fails), and keeps the first connection that
is made; the others are closed. Addresses of the two families take turns (RFC 8305 4).

    winner, sock, failures = first_to_connect(hops, timeout)
"""
import os
import selectors
import socket
import time

CONNECTION_ATTEMPT_DELAY = 0.25     # RFC 8305 5: the recommended default


class NoneConnected(Exception):
    """Every address failed (or the time ran out); `failures` says how each did."""

    def __init__(self, failures):
        super().__init__("no connection")
        self.failures = failures    # [(hop, OSError)]


def interleaved(hops):
    """RFC 8305 4: the addresses in their order, but IPv6 and IPv4 taking turns, starting with
    the family of the first."""
    if not hops:
        return []
    first = _family(hops[0])
    same = [hop for hop in hops if _family(hop) == first]
    other = [hop for hop in hops if _family(hop) != first]
    order = []
    for index in range(max(len(same), len(other))):
        order += same[index:index + 1] + other[index:index + 1]
    return order


def first_to_connect(hops, timeout, delay=CONNECTION_ATTEMPT_DELAY):
    """(the hop, its connected blocking socket, [(hop, OSError)] of those that failed
    before it). Raises NoneConnected when none connects within `timeout` seconds."""
    waiting = list(hops)
    failures = []
    deadline = time.monotonic() + timeout
    next_start = time.monotonic()
    with selectors.DefaultSelector() as selector:
        try:
            while True:
                now = time.monotonic()
                if waiting and (now >= next_start or not selector.get_map()):
                    _start(selector, waiting.pop(0), failures)
                    next_start = time.monotonic() + delay
                    continue
                if not selector.get_map() and not waiting:
                    raise NoneConnected(failures)
                if now >= deadline:
                    for key in list(selector.get_map().values()):
                        failures.append((key.data, TimeoutError("connect timed out")))
                    raise NoneConnected(failures)
                wait = deadline - now if not waiting else min(deadline, next_start) - now
                for key, _ in selector.select(max(wait, 0)):
                    sock, hop = key.fileobj, key.data
                    selector.unregister(sock)
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error == 0:
                        sock.setblocking(True)
                        return hop, sock, failures
                    sock.close()
                    failures.append((hop, OSError(error, os.strerror(error))))
                    next_start = time.monotonic()       # RFC 8305 5: the next one now
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()


def _start(selector, hop, failures):
    family = socket.AF_INET6 if _family(hop) == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect((hop.ip, hop.port))
    except BlockingIOError:
        pass
    except OSError as error:
        sock.close()
        failures.append((hop, error))
        return
    selector.register(sock, selectors.EVENT_WRITE, hop)


def _family(hop):
    return 6 if ":" in hop.ip else 4

