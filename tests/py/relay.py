#!/usr/bin/env python3
"""RCPT to a remote address from a chosen source address, optionally after STARTTLS + AUTH.

usage: relay.py HOST PORT SOURCE_IP RCPT [USER PASSWORD]
Prints the RCPT reply as "CODE TEXT".
"""
import smtplib
import ssl
import sys

host, port, source, rcpt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = smtplib.SMTP(host, port, local_hostname="client.example", source_address=(source, 0))
s.ehlo()
if len(sys.argv) > 6:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s.starttls(context=ctx)
    s.ehlo()
    s.login(sys.argv[5], sys.argv[6])
s.mail(sys.argv[5] if len(sys.argv) > 6 else "someone@outside.example")
code, text = s.rcpt(rcpt)
print(code, text.decode())
s.quit()
