//! Integration-test helpers (being written).
