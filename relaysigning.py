"""Which relayed mail is ours to DKIM-sign (RFC 6376), and its DKIM-Signature header.

    header = dkim_header(message, signer, config.local_domains, trace)   # b"": not signed

Mail whose reverse-path domain is a local domain is signed as it goes (relay.py puts the
header before the text, DATA, or at the start of the first chunk, BDAT). Only clients in
[relay] networks and after AUTH may send mail of a local domain to another one, so that is
ours to sign; a forward is not (anyone may write to an alias, and a forged From: of ours must
not leave with our signature): it leaves with an SRS reverse path, or, when that would not
fit, with our Delivered-To first.
"""
import threading

import forwarding
import spool

# A forward's spool text begins with the Delivered-To: of its alias (storage.Draft)
FORWARD_MARK = b"delivered-to:"
# Texts held whole for signing at once: dkimpy needs about 4.6 times a text's size
SIGNING = threading.BoundedSemaphore(2)


def dkim_header(message, signer, local_domains, trace):
    """The DKIM-Signature header for `message` (spool.SpooledMessage), b"" when there is no
    `signer` (dkimsign.Signer) or the message is not ours to sign; `trace(text)` is told
    the result. The signer needs the whole unstuffed text in memory (dkimpy hashes bytes):
    acceptable for the mail of our own domains only, which is all that is read here."""
    if signer is None or not ours_to_sign(message, local_domains):
        return b""
    domain = message.envelope.reverse_path.domain
    with SIGNING:
        text = b"".join(spool.unstuffed(message.text_chunks()))   # RFC 5321 4.5.2
        signature = signer.sign(text, domain)
    trace(f"DKIM: {'signed' if signature else 'not signed'} for {domain} (RFC 6376 5)")
    return signature


def ours_to_sign(message, local_domains):
    """Mail of a local domain that is not a forward (see the module's docstring)."""
    reverse_path = message.envelope.reverse_path
    if reverse_path.domain not in local_domains or \
            reverse_path.local_part.startswith(forwarding.PREFIX):
        return False
    return not message.read_text(len(FORWARD_MARK)).lower().startswith(FORWARD_MARK)
