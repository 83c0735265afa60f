//! The LMTP client (RFC 2033): local delivery into Dovecot or another LMTP server, with one
//! reply per recipient after the data.
