"""A scripted milter for estafeta-milter's integration tests (Debian's python3-milter).

    /usr/bin/python3 scripted.py PORT [full|lean]

What it does is chosen by the message:
- HELO "reject.example": REJECT at HELO;
- recipient "reject-rcpt@...": REPLYCODE 550 5.1.1 at RCPT; "tempfail-rcpt@...": TEMPFAIL;
  "accept-rcpt@...": ACCEPT (no more questions for this message);
- header "X-Test: ACTION" at the end of the message, ACTION one of: modify, reply, multiline,
  tempfail, discard, reject, accept, skip, progress, header-reject (REJECT at that header).
At the end of the message it reports what it received in X-Seen-* header fields.
Mode "lean" declares the steps it does not want (HELO, DATA, EOH) and no replies for
connect, MAIL, RCPT and headers, as rspamd does.
"""
import sys
import time

import Milter


class Scripted(Milter.Base):
    def __init__(self):
        self.reset()
        self.helo = ""
        self.client = ""

    def reset(self):
        self.action = ""
        self.mail_from = ""
        self.mail_args = []
        self.rcpts = []
        self.headers = []
        self.received = b""
        self.chunks = 0
        self.skip = False

    def connect(self, hostname, family, hostaddr):
        self.client = "%s %s %s" % (hostname, hostaddr[0], hostaddr[1])
        self.macro_j = self.getsymval("j") or ""
        return Milter.CONTINUE

    def hello(self, heloname):
        self.helo = heloname
        if heloname == "reject.example":
            return Milter.REJECT
        return Milter.CONTINUE

    def envfrom(self, f, *args):
        self.reset()
        self.mail_from = f
        self.mail_args = list(args)
        self.mail_macro = self.getsymval("{mail_addr}") or ""
        return Milter.CONTINUE

    def envrcpt(self, to, *args):
        local = to.strip("<>").split("@")[0]
        if local == "reject-rcpt":
            self.setreply("550", "5.1.1", "No such user here")
            return Milter.REJECT
        if local == "tempfail-rcpt":
            return Milter.TEMPFAIL
        if local == "accept-rcpt":
            return Milter.ACCEPT
        self.rcpts.append(to)
        return Milter.CONTINUE

    def data(self):
        return Milter.CONTINUE

    def header(self, name, value):
        self.headers.append((name, value))
        if name.lower() == "x-test":
            self.action = value.strip()
            if self.action == "header-reject":
                return Milter.REJECT
        return Milter.CONTINUE

    def eoh(self):
        return Milter.CONTINUE

    def body(self, chunk):
        self.chunks += 1
        self.received += chunk
        if self.action == "skip":
            self.skip = True
            return Milter.SKIP
        return Milter.CONTINUE

    def eom(self):
        a = self.action
        self.addheader("X-Seen-Client", self.client)
        self.addheader("X-Seen-Helo", self.helo)
        self.addheader("X-Seen-From", "%s %s" % (self.mail_from, " ".join(self.mail_args)))
        self.addheader("X-Seen-Rcpts", " ".join(self.rcpts))
        self.addheader("X-Seen-Headers", "|".join("%s=%s" % (n, v.replace("\r\n", "\\r\\n")) for n, v in self.headers))
        self.addheader("X-Seen-Body", "%d bytes in %d chunks" % (len(self.received), self.chunks))
        self.addheader("X-Seen-Macros", "j=%s i=%s mail_addr=%s" % (
            getattr(self, "macro_j", ""), self.getsymval("i") or "", getattr(self, "mail_macro", "")))
        if a == "modify":
            self.chgheader("Subject", 1, "changed subject")
            self.chgheader("X-Remove", 1, "")
            self.addheader("X-Top", "first", 0)
            self.replacebody(b"replaced body\r\nline two\r\n")
            self.addrcpt("<added@example.org>")
            self.addrcpt("<added-par@example.org>", "NOTIFY=NEVER")
            self.delrcpt("<bob@example.org>")
            self.chgfrom("<new-sender@example.org>", "SIZE=100")
            self.quarantine("held for review")
            return Milter.ACCEPT
        if a == "reply":
            self.setreply("554", "5.7.1", "Custom refusal")
            return Milter.REJECT
        if a == "multiline":
            self.setreply("451", "4.7.1", "first line", "second line")
            return Milter.TEMPFAIL
        if a == "tempfail":
            return Milter.TEMPFAIL
        if a == "discard":
            return Milter.DISCARD
        if a == "reject":
            return Milter.REJECT
        if a == "accept":
            return Milter.ACCEPT
        if a == "progress":
            for _ in range(3):
                time.sleep(0.6)
                self.progress()
            return Milter.CONTINUE
        return Milter.CONTINUE


class Lean(Scripted):
    @Milter.nocallback
    def hello(self, heloname):
        return Milter.CONTINUE

    @Milter.nocallback
    def data(self):
        return Milter.CONTINUE

    @Milter.nocallback
    def eoh(self):
        return Milter.CONTINUE

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        return Scripted.connect(self, hostname, family, hostaddr)

    @Milter.noreply
    def envfrom(self, f, *args):
        return Scripted.envfrom(self, f, *args)

    @Milter.noreply
    def header(self, name, value):
        self.headers.append((name, value))
        if name.lower() == "x-test":
            self.action = value.strip()
        return Milter.CONTINUE


def main():
    port = sys.argv[1]
    mode = sys.argv[2] if len(sys.argv) > 2 else "full"
    Milter.factory = Lean if mode == "lean" else Scripted
    flags = (Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.ADDRCPT
             | Milter.ADDRCPT_PAR | Milter.DELRCPT | Milter.CHGFROM | Milter.QUARANTINE)
    Milter.set_flags(flags)
    sys.stdout.write("listening on %s\n" % port)
    sys.stdout.flush()
    Milter.runmilter("scripted", "inet:%s@127.0.0.1" % port, timeout=60)


if __name__ == "__main__":
    main()
