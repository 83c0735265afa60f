"""dkimpy (an independent DKIM implementation) against estafeta, with the public keys served by
the test DNS server.

    dkim_check.py verify DNS_PORT FILE          exit 0 when every DKIM-Signature verifies;
                                                prints one line per signature
    dkim_check.py sign SELECTOR DOMAIN KEYFILE  reads a message on stdin, writes it signed
                                                (rsa-sha256 or ed25519-sha256 by the key)

Run with a Python that has dkimpy and dnspython (Debian: /usr/bin/python3 with python3-dkim).
"""
import sys

import dkim
import dns.message
import dns.query
import dns.rdatatype


def dnsfunc_for(port):
    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        response = dns.query.udp(query, "127.0.0.1", timeout=timeout, port=port)
        for rrset in response.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None
    return dnsfunc


def verify(port, path):
    with open(path, "rb") as f:
        message = f.read()
    d = dkim.DKIM(message)
    count = len([1 for line in message.split(b"\n") if line.lower().startswith(b"dkim-signature:")])
    if count == 0:
        print("no DKIM-Signature")
        return 1
    failed = 0
    for i in range(count):
        ok = d.verify(idx=i, dnsfunc=dnsfunc_for(port))
        sig = d.signature_fields
        print("signature %d d=%s s=%s a=%s: %s" % (
            i, sig.get(b"d", b"?").decode(), sig.get(b"s", b"?").decode(),
            sig.get(b"a", b"?").decode(), "pass" if ok else "FAIL"))
        if not ok:
            failed += 1
    return 1 if failed else 0


def sign(selector, domain, keyfile):
    message = sys.stdin.buffer.read()
    with open(keyfile, "rb") as f:
        key = f.read()
    headers = [b"From", b"To", b"Subject", b"Date", b"Message-ID"]
    if b"BEGIN" in key:
        sig = dkim.sign(message, selector.encode(), domain.encode(), key,
                        include_headers=headers, canonicalize=(b"relaxed", b"relaxed"))
    else:
        # A raw base64 ed25519 seed, as dkimpy's own ed25519 keys are.
        sig = dkim.sign(message, selector.encode(), domain.encode(), key.strip(),
                        include_headers=headers, canonicalize=(b"relaxed", b"relaxed"),
                        signature_algorithm=b"ed25519-sha256")
    sys.stdout.buffer.write(sig + message)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "verify":
        sys.exit(verify(int(sys.argv[2]), sys.argv[3]))
    elif sys.argv[1] == "sign":
        sys.exit(sign(sys.argv[2], sys.argv[3], sys.argv[4]))
    sys.exit(2)
