//! `cargo xtask bench`: sockmesh against direct, iptables capture, Envoy and HAProxy on one
//! virtual node (see BENCHMARKS.md for what each scenario is).
//!
//! - [`run`]: the node, the scenarios and the interleaved rounds;
//! - [`load`]: the bench's servers and load generators, run inside pods as hidden subcommands of
//!   `sockmesh-bench`;
//! - [`proxies`]: Envoy and HAProxy configs, the pod-local iptables rules, `/proc` readings;
//! - [`report`]: medians, ratios, goals, the table and BENCHMARKS.md;
//! - [`chart`]: the PNG chart (`docs/bench.png`).
//!
//! Safety: traffic stays on loopback or inside the namespaces the bench creates, iptables rules
//! are only added inside the bench's pod namespaces (they die with them), every load process is
//! bounded in time, and the node's guards (plus a Ctrl-C handler) tear everything down.

pub mod chart;
pub mod load;
pub mod proxies;
pub mod report;
pub mod run;
