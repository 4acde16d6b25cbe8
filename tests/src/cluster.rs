//! [`Cluster`]: several [`VirtualNode`]s routed to each other, for multi-node tests.
//!
//! Node `i` (0-based) is built with [`NodeOptions`] index `i + 1`: its pods get
//! `198.18.<i+1>.(2+k)/24` and `2001:db8:0:<i+1>::(2+k)/64`, its bridge holds the gateway
//! `198.18.<i+1>.1` / `2001:db8:0:<i+1>::1`, and every pod routes through it. Each pair of nodes
//! `(i, j)` is joined by a veth created directly between the two node network namespaces (nothing
//! in the host netns), addressed from `198.18.255.0/24` (`/30` per pair) and
//! `2001:db8:ffff:<pair>::/64`; each node routes the other nodes' pod subnets over it, with
//! forwarding switched on inside the node netns only.
//!
//! Every node keeps its own cgroup subtree, so each can run its own [`crate::Daemon`]
//! (`Daemon::start(cluster.node(i), ..)`): daemons already get their own pin dir, state file,
//! admin socket and metrics port. Dropping the cluster drops the nodes, which deletes their
//! namespaces (and with them the inter-node veths).
//!
//! The module also holds small helpers the multi-node, dual-stack, coexistence and inbound tests
//! share: status queries by pod and direction, a `peer serve` on any address, inbound enrolment.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::daemon::{toml_str, Daemon};
use crate::node::{ip, NodeOptions, Pod, VirtualNode};
use crate::process::run_host_ok;
use crate::servers::Server;
use crate::util::{peer_command, sockmesh_bin};

/// Most nodes per cluster (pairs must fit in `198.18.255.0/24` as `/30`s).
pub const MAX_NODES: usize = 8;

const SYSCTL_TIMEOUT: Duration = Duration::from_secs(30);

/// Routed virtual nodes. Dropping it tears every node down.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<VirtualNode>,
}

/// The addresses of the link between nodes `i < j` (pair number `pair`): `(i side, j side)`.
fn link_addrs(pair: usize) -> ((String, String), (String, String)) {
    let base = 4 * pair as u8;
    (
        (
            format!("198.18.255.{}", base + 1),
            format!("2001:db8:ffff:{pair:x}::1"),
        ),
        (
            format!("198.18.255.{}", base + 2),
            format!("2001:db8:ffff:{pair:x}::2"),
        ),
    )
}

/// `sysctl -qw key=value` inside the network namespace at `netns` (only net.* keys: they are
/// per-netns, so nothing changes in the host's).
pub fn netns_sysctl(netns: &Path, key: &str, value: &str) -> Result<()> {
    if !key.starts_with("net.") {
        bail!("refusing to set non-netns sysctl {key}");
    }
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .args(["sysctl", "-qw", &format!("{key}={value}")]);
    run_host_ok(cmd, SYSCTL_TIMEOUT).map(drop)
}

impl Cluster {
    /// Builds one node per entry of `pods` (the pod names of that node), all with IPv6 and a
    /// gateway, and routes them to each other. On error everything built so far is torn down.
    pub fn new(pods: &[&[&str]]) -> Result<Cluster> {
        if pods.is_empty() || pods.len() > MAX_NODES {
            bail!("a cluster has 1-{MAX_NODES} nodes, got {}", pods.len());
        }
        let mut cluster = Cluster { nodes: Vec::new() };
        for (i, names) in pods.iter().enumerate() {
            let opts = NodeOptions {
                index: (i + 1) as u8,
                ipv6: true,
                gateway: true,
            };
            let node = VirtualNode::with_options(names, opts)
                .with_context(|| format!("failed to build cluster node {i}"))?;
            cluster.nodes.push(node);
        }
        cluster.connect().context("failed to route the cluster's nodes")?;
        Ok(cluster)
    }

    fn connect(&self) -> Result<()> {
        for node in &self.nodes {
            let ns = node.node_netns();
            netns_sysctl(&ns, "net.ipv4.ip_forward", "1")?;
            netns_sysctl(&ns, "net.ipv6.conf.all.forwarding", "1")?;
        }
        let mut pair = 0;
        for i in 0..self.nodes.len() {
            for j in i + 1..self.nodes.len() {
                let (a, b) = (&self.nodes[i], &self.nodes[j]);
                let (a_if, b_if) = (format!("ic{j}"), format!("ic{i}"));
                let ((a4, a6), (b4, b6)) = link_addrs(pair);
                pair += 1;
                // Created inside a's netns with the peer end moved straight into b's.
                ip(&[
                    "-n",
                    a.node_netns_name(),
                    "link",
                    "add",
                    &a_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &b_if,
                    "netns",
                    b.node_netns_name(),
                ])?;
                for (node, ifname, v4, v6) in [(a, &a_if, &a4, &a6), (b, &b_if, &b4, &b6)] {
                    let ns = node.node_netns_name();
                    ip(&["-n", ns, "addr", "add", &format!("{v4}/30"), "dev", ifname])?;
                    ip(&[
                        "-n",
                        ns,
                        "addr",
                        "add",
                        &format!("{v6}/64"),
                        "dev",
                        ifname,
                        "nodad",
                    ])?;
                    ip(&["-n", ns, "link", "set", ifname, "up"])?;
                }
                // Each side routes the other's pod subnets via the other's link address.
                for (from, to, via4, via6) in [(a, b, &b4, &b6), (b, a, &a4, &a6)] {
                    let ns = from.node_netns_name();
                    let o = to.options();
                    ip(&["-n", ns, "route", "add", &o.pod_subnet(), "via", via4])?;
                    ip(&["-n", ns, "-6", "route", "add", &o.pod_subnet6(), "via", via6])?;
                }
            }
        }
        Ok(())
    }

    /// Node `i` (0-based; its pods are in `198.18.<i+1>.0/24`).
    pub fn node(&self, i: usize) -> &VirtualNode {
        &self.nodes[i]
    }

    pub fn nodes(&self) -> &[VirtualNode] {
        &self.nodes
    }
}

// ---------------------------------------------------------------------------------------------
// helpers shared by the multi-node / dual-stack / coexistence / inbound tests

/// `peer serve --listen <listen> --mode <mode>` inside `pod` (any address: `[::]:7000`,
/// `0.0.0.0:7000`, `[2001:db8::3]:7000`, ...).
pub fn serve_peer(pod: &Pod, listen: &str, mode: &str) -> Result<Server> {
    let mut cmd = peer_command();
    cmd.args(["serve", "--listen", listen, "--mode", mode]);
    Server::start(&pod.cgroup, Some(&pod.netns), cmd)
}

/// The status `connections` of `pod`, optionally only those going `direction`
/// (`"outbound"` / `"inbound"`).
pub fn connections(daemon: &Daemon, pod: &str, direction: Option<&str>) -> Result<Vec<Value>> {
    let st = daemon.status()?;
    let conns = st["connections"]
        .as_array()
        .ok_or_else(|| anyhow!("status has no connections array: {st}"))?;
    Ok(conns
        .iter()
        .filter(|c| c["pod"] == pod)
        .filter(|c| direction.is_none_or(|d| c["direction"] == d))
        .cloned()
        .collect())
}

/// `status --json`, pretty-printed (or why not), for assertion messages.
pub fn status_dump(daemon: &Daemon) -> String {
    daemon
        .status()
        .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
        .unwrap_or_else(|e| format!("<status failed: {e:#}>"))
}

/// A `[[pods]]` entry for `pod` with `inbound_ports = [...]`.
pub fn pod_toml_with_inbound(pod: &Pod, inbound_ports: &[u16]) -> String {
    let ports: Vec<String> = inbound_ports.iter().map(u16::to_string).collect();
    format!(
        "\n[[pods]]\nname = {}\nnetns = {}\ncgroup = {}\ninbound_ports = [{}]\n",
        toml_str(&pod.name),
        toml_str(&pod.netns.to_string_lossy()),
        toml_str(&pod.cgroup.to_string_lossy()),
        ports.join(", ")
    )
}

/// `sockmesh enroll ... --inbound-port P ...` for `pod`.
pub fn enroll_inbound(daemon: &Daemon, pod: &Pod, inbound_ports: &[u16]) -> Result<()> {
    let netns = pod.netns.to_string_lossy().into_owned();
    let cgroup = pod.cgroup.to_string_lossy().into_owned();
    let ports: Vec<String> = inbound_ports.iter().map(u16::to_string).collect();
    let mut args = vec![
        "enroll", "--name", &pod.name, "--netns", &netns, "--cgroup", &cgroup,
    ];
    for p in &ports {
        args.push("--inbound-port");
        args.push(p);
    }
    daemon.cli(&args).map(drop)
}

/// Whether the `sockmesh` binary under test knows inbound capture (`enroll --inbound-port`).
pub fn daemon_supports_inbound() -> bool {
    let mut cmd = Command::new(sockmesh_bin());
    cmd.args(["enroll", "--help"]);
    crate::process::run_host(cmd, Duration::from_secs(15))
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--inbound-port"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_addresses_do_not_collide() {
        let mut seen = std::collections::HashSet::new();
        for pair in 0..(MAX_NODES * (MAX_NODES - 1) / 2) {
            let ((a4, a6), (b4, b6)) = link_addrs(pair);
            for a in [a4, a6, b4, b6] {
                assert!(seen.insert(a.clone()), "{a} used twice");
            }
        }
    }

    #[test]
    fn inbound_toml_lists_the_ports() {
        let pod = Pod {
            name: "b".into(),
            netns: "/run/netns/x".into(),
            netns_name: "x".into(),
            cgroup: "/sys/fs/cgroup/x".into(),
            ip: "198.18.1.3".parse().unwrap(),
            ip6: None,
        };
        let t = pod_toml_with_inbound(&pod, &[7000, 8080]);
        assert!(t.contains("inbound_ports = [7000, 8080]"), "{t}");
    }
}
