#!/usr/bin/env python3
"""Submission scenarios with Python's smtplib and ssl, for tests/submission.rs.

usage: submission.py SCENARIO HOST PORT [USER PASSWORD]
Prints one JSON object; exits 0 when the scenario ran (assertions are in the Rust test).
"""
import json
import smtplib
import socket
import ssl
import sys
import time

scenario, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
user = sys.argv[4] if len(sys.argv) > 4 else ""
password = sys.argv[5] if len(sys.argv) > 5 else ""

ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE


def message(subject):
    return (
        f"From: {user}\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@client.example>\r\n\r\nbody of {subject}\r\n"
    )


out = {}
if scenario == "starttls-plain":
    s = smtplib.SMTP(host, port, local_hostname="client.example")
    code, text = s.ehlo()
    out["ehlo_before_tls"] = text.decode()
    try:
        s.sendmail(user, ["bob@example.test"], message("too early"))
    except smtplib.SMTPSenderRefused as e:
        out["mail_before_auth"] = [e.smtp_code, e.smtp_error.decode()]
    code, text = s.docmd("AUTH", "PLAIN AGFAYgBj")
    out["auth_before_tls"] = [code, text.decode()]
    s.starttls(context=ctx)
    code, text = s.ehlo()
    out["ehlo_after_tls"] = text.decode()
    out["tls_version"] = s.sock.version()
    code, text = s.login(user, password)
    out["login"] = [code, text.decode()]
    out["refused"] = {k: list(v) for k, v in s.sendmail(user, ["bob@example.test"], message("via 587 plain")).items()}
    try:
        s.sendmail("mallory@example.test", ["bob@example.test"], message("spoofed"))
    except smtplib.SMTPSenderRefused as e:
        out["not_owned"] = [e.smtp_code, e.smtp_error.decode()]
    s.quit()
elif scenario == "starttls-login":
    s = smtplib.SMTP(host, port, local_hostname="client.example")
    s.starttls(context=ctx)
    s.ehlo()
    s.user, s.password = user, password
    code, text = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
    out["login"] = [code, text.decode()]
    s.sendmail(user, ["bob@example.test"], message("via 587 login"))
    s.quit()
elif scenario == "implicit-tls":
    s = smtplib.SMTP_SSL(host, port, local_hostname="client.example", context=ctx)
    code, text = s.ehlo()
    out["ehlo"] = text.decode()
    out["tls_version"] = s.sock.version()
    code, text = s.login(user, password)
    out["login"] = [code, text.decode()]
    s.sendmail(user, ["bob@example.test"], message("via 465"))
    s.quit()
elif scenario == "wrong-password":
    s = smtplib.SMTP(host, port, local_hostname="client.example")
    s.starttls(context=ctx)
    s.ehlo()
    replies = []
    for _ in range(4):
        start = time.monotonic()
        try:
            code, text = s.docmd("AUTH", "PLAIN " + __import__("base64").b64encode(f"\0{user}\0wrong".encode()).decode())
            replies.append([code, text.decode(), round(time.monotonic() - start, 2)])
        except smtplib.SMTPServerDisconnected:
            replies.append(["disconnected"])
            break
        if code == 421:
            break
    out["replies"] = replies
    # A new session from the same address: the next failure is slowed by the throttle.
    s = smtplib.SMTP(host, port, local_hostname="client.example")
    s.starttls(context=ctx)
    s.ehlo()
    start = time.monotonic()
    code, text = s.docmd("AUTH", "PLAIN " + __import__("base64").b64encode(f"\0{user}\0wrong".encode()).decode())
    out["next_session"] = [code, text.decode(), round(time.monotonic() - start, 2)]
elif scenario == "injection":
    # CVE-2011-0411: commands pipelined after STARTTLS in plaintext must not run after TLS.
    raw = socket.create_connection((host, port), timeout=10)
    f = raw.makefile("rb")

    def reply():
        lines = []
        while True:
            line = f.readline().decode()
            lines.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                return lines

    reply()
    raw.sendall(b"EHLO client.example\r\n")
    reply()
    raw.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.test>\r\n")
    out["starttls"] = reply()
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tf = tls.makefile("rb")
    tls.sendall(b"NOOP\r\n")
    out["first_reply_inside_tls"] = tf.readline().decode().rstrip("\r\n")
    tls.sendall(b"QUIT\r\n")
print(json.dumps(out))
