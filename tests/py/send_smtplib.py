#!/usr/bin/env python3
"""Sends one message with Python's smtplib, as a real third-party client would.

Usage: send_smtplib.py HOST PORT SENT_FILE

Connects with smtplib.SMTP, says EHLO, and sends one multi-line message (with lines that
start with a dot, which smtplib dot-stuffs on the wire) to two local recipients. Writes the
message exactly as the server should store it (CRLF line breaks, dots not stuffed) to
SENT_FILE, so that the caller can compare it byte for byte with the delivered Maildir files.
The SMTP dialogue is printed on stderr (smtplib debug output) for failure messages.
"""

import smtplib
import sys

FROM = "alice@example.test"
TO = ["bob@localhost", "carol@example.test"]

LINES = [
    "From: Alice <alice@example.test>",
    "To: Bob <bob@localhost>, Carol <carol@example.test>",
    "Subject: smtplib end-to-end test",
    "Message-ID: <smtplib-e2e@example.test>",
    "",
    "Hello Bob and Carol,",
    ".a line that starts with a dot",
    "..two dots",
    ".",
    "a line after a lone dot",
    "",
    "-- ",
    "Alice",
]


def main() -> int:
    host, port, sent_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    message = ("\r\n".join(LINES) + "\r\n").encode("ascii")
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.set_debuglevel(1)
        code, _ = smtp.ehlo("smtplib.example")
        if code != 250:
            print(f"EHLO failed: {code}", file=sys.stderr)
            return 2
        refused = smtp.sendmail(FROM, TO, message)
        if refused:
            print(f"refused recipients: {refused}", file=sys.stderr)
            return 3
    with open(sent_file, "wb") as f:
        f.write(message)
    print("sent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
