//! estafeta-auth
