//! What this host offers.
