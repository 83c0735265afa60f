//! estafeta-policy
