#!/usr/bin/env python3
"""Sends one message with MAIL FROM ... REQUIRETLS (RFC 8689) through Python's smtplib.

usage: requiretls.py HOST PORT FROM RCPT SUBJECT
First, in plaintext: EHLO must not offer REQUIRETLS and MAIL ... REQUIRETLS must get 530.
Then STARTTLS (certificate not checked), EHLO must offer REQUIRETLS, and the message is sent.
Prints one JSON object: the plaintext MAIL reply, whether each EHLO offered REQUIRETLS, and
the replies of the transaction over TLS.
"""
import json
import smtplib
import ssl
import sys

host, port, sender, rcpt, subject = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
s = smtplib.SMTP(host, port, local_hostname="client.example")
s.ehlo()
out = {"plain_offers": s.has_extn("requiretls")}
code, text = s.mail(sender, ["REQUIRETLS"])
out["plain_mail"] = f"{code} {text.decode()}"
s.rset()
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s.starttls(context=ctx)
s.ehlo()
out["tls_offers"] = s.has_extn("requiretls")
msg = f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n\r\nconfidential\r\n"
refused = s.sendmail(sender, [rcpt], msg, mail_options=["REQUIRETLS"])
out["refused"] = {k: [v[0], v[1].decode()] for k, v in refused.items()}
s.quit()
print(json.dumps(out))
