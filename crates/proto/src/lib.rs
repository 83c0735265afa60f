//! estafeta-proto
