//! estafeta-maildir
