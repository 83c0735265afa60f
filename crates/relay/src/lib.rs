//! estafeta-relay
