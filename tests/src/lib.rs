//! Virtual-node harness.
