//! estafeta-config
