//! `cargo xtask bench`: sockmesh against direct, iptables capture, Envoy and HAProxy on one
//! virtual node (see BENCHMARKS.md for what each scenario is).
//!
//! - [`run`]: the node, the scenarios and the interleaved rounds;
//! - [`load`]: the bench's servers and load generators, run inside pods as hidden subcommands of
//!   `sockmesh-bench`;
//! - [`proxies`]: Envoy and HAProxy configs, the pod-local iptables rules, `/proc` readings;
//! - [`report`]: medians, ratios, goals, the table and BENCHMARKS.md;
//! - [`chart`]: the PNG chart (`docs/bench.png`);
//! - [`dual_link`]: the dual-link row (issue 10): warm switches of active / keep-alive links
//!   on a node of its own, after the table (`--only dual-link` runs it alone).
//!
//! The row "iptables DNAT, no proxy (netfilter cost)" sends a VIP straight to the server with one
//! nat OUTPUT DNAT rule in its client pod: its p50 minus direct's is what netfilter (conntrack +
//! NAT of each packet) costs per round trip here, X. eBPF capture replaces only the nat REDIRECT,
//! so against the same proxy behind iptables (p50 T) its rate ratio on one connection is at best
//! about T / (T - X): the report prints that ceiling next to each iptables goal and, under the
//! goals, how much of a proxy's cost over direct is its two extra socket hops and its own work
//! (with HAProxy `mode tcp` as the minimal relay), which only the sk_msg short-circuit attacks.
//!
//! Safety: traffic stays on loopback or inside the namespaces the bench creates, iptables rules
//! are only added inside the bench's pod namespaces (they die with them), every load process is
//! bounded in time, and the node's guards (plus a Ctrl-C handler) tear everything down.

pub mod chart;
pub mod dual_link;
pub mod load;
pub mod proxies;
pub mod report;
pub mod run;
pub mod upgrade;
