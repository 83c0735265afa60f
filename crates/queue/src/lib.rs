//! estafeta-queue
