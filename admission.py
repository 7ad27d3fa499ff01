"""Who may start a session: max_clients in all and max_clients_per_ip from one address.

One `Admission` counts the sessions of every listener of a server; with [server] processes
it lives in the supervisor, which every accepting process asks (processes.py).
"""
import collections
import threading

import replies


class Admission:
    """Who may start a session: max_clients in all and max_clients_per_ip from one address,
    counted over every listener."""

    def __init__(self, config):
        self.config = config
        self.clients = collections.Counter()    # client ip -> open sessions
        self.lock = threading.Lock()

    def admit(self, ip):
        """None when the client may start, else the 421 it gets."""
        hostname = self.config.hostname
        with self.lock:
            if sum(self.clients.values()) >= self.config.max_clients:
                return replies.TOO_MANY_CLIENTS.format(hostname=hostname)
            if self.clients[ip] >= self.config.max_clients_per_ip:
                return replies.TOO_MANY_FROM_YOU.format(hostname=hostname)
            self.clients[ip] += 1
        return None

    def release(self, ip):
        with self.lock:
            self.clients[ip] -= 1
            if self.clients[ip] <= 0:
                del self.clients[ip]
