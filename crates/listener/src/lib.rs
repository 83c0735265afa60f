//! estafeta-listener
