//! Outpost's anycast-style node selector: it listens on one address and splices each TCP
//! connection to the best healthy edge.
//!
//! Status: lands with the "Topology" issue; this crate is its home.
