"""A tiny authoritative DNS server on 127.0.0.1 for the relay tests (dnspython, UDP only).

    records = {"remote.test": [("MX", "10 mx1.remote.test.")],
               "mx1.remote.test": [("A", "127.0.0.2")],
               "broken.test": "SERVFAIL", "slow.test": "TIMEOUT"}

A name in `records` with no record of the asked type answers NOERROR with no answer (what
makes the implicit MX rule apply); a name not in `records` answers NXDOMAIN. One type can
fail alone: `("A", "TIMEOUT")` or `("A", "SERVFAIL")` in a name's list.
"""
import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DNSResponder:
    def __init__(self, records, host="127.0.0.1"):
        self.records = {name.lower().rstrip("."): value for name, value in records.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()
        self.queries = []                   # (name, type) in arrival order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def nameserver(self):
        """The value for [relay] nameservers."""
        return f"{self.address[0]}:{self.address[1]}"

    def stop(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _serve(self):
        while not self._stop.is_set():
            try:
                data, client = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            response = self._answer(data)
            if response is not None:
                self.sock.sendto(response, client)

    def _answer(self, data):
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        entry = self.records.get(name)
        if entry == "TIMEOUT":
            return None
        if entry == "SERVFAIL":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            values = [value for kind, value in entry if kind == rdtype]
            if "TIMEOUT" in values:
                return None
            if "SERVFAIL" in values:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif values:
                rrset = dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN,
                                                 question.rdtype, values)
                response.answer.append(rrset)
        return response.to_wire()
