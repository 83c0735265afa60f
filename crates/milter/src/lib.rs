//! The milter client: the Sendmail/Postfix milter protocol (version 6) spoken to filters such
//! as rspamd, OpenDKIM or ClamAV before a message is acknowledged.
