//! [`VirtualNode`]: pod network namespaces on a bridge plus a test-owned cgroup subtree.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cgroup;
use crate::process::run_host_ok;
use crate::util::unique;

/// Where `ip netns add NAME` puts the namespace.
pub const NETNS_DIR: &str = "/run/netns";
/// The pods' subnet (RFC 2544 benchmarking range; only ever used inside the node's own netns).
pub const POD_SUBNET_PREFIX: &str = "198.18.0";
pub const POD_PREFIX_LEN: u8 = 24;
/// Pod `i` gets `198.18.0.(FIRST_POD_HOST + i)`.
pub const FIRST_POD_HOST: u8 = 2;
/// Longest pod name (netns names, cgroup names and messages stay readable).
pub const MAX_POD_NAME: usize = 32;
/// Most pods per node (the /24 and interface name budget).
pub const MAX_PODS: usize = 200;

/// The pods' IPv6 prefix (documentation range) when [`NodeOptions::ipv6`] is set: pod `i` of node
/// `index` gets `2001:db8:0:<index>::(FIRST_POD_HOST + i)/64`.
pub const POD_PREFIX6_LEN: u8 = 64;
/// Highest node index ([`NodeOptions::index`]); `198.18.255.0/24` is left for inter-node links.
pub const MAX_NODE_INDEX: u8 = 254;

/// How [`VirtualNode::with_options`] builds a node. The default is what [`VirtualNode::new`]
/// builds: index 0 (`198.18.0.0/24`), IPv4 only, no gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeOptions {
    /// Pods get `198.18.<index>.(2+i)/24` (and `2001:db8:0:<index>::(2+i)/64`), so nodes with
    /// different indexes can be routed to each other.
    pub index: u8,
    /// Also give every pod's `eth0` an IPv6 address (added `nodad`: usable at once).
    pub ipv6: bool,
    /// The bridge holds the gateway address `198.18.<index>.1` (and `2001:db8:0:<index>::1`) and
    /// every pod has a default route through it (needed to leave the node).
    pub gateway: bool,
}

impl NodeOptions {
    /// Pod `host` of this node, IPv4.
    pub fn pod_ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.index, host)
    }

    /// Pod `host` of this node, IPv6 (`2001:db8:0:<index>::<host>`).
    pub fn pod_ip6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0, self.index as u16, 0, 0, 0, host as u16)
    }

    /// The gateway (bridge) address, IPv4 (`198.18.<index>.1`).
    pub fn gateway_ip(&self) -> Ipv4Addr {
        self.pod_ip(1)
    }

    /// The gateway (bridge) address, IPv6 (`2001:db8:0:<index>::1`).
    pub fn gateway_ip6(&self) -> Ipv6Addr {
        self.pod_ip6(1)
    }

    /// `198.18.<index>.0/24`.
    pub fn pod_subnet(&self) -> String {
        format!("{}/{POD_PREFIX_LEN}", self.pod_ip(0))
    }

    /// `2001:db8:0:<index>::/64`.
    pub fn pod_subnet6(&self) -> String {
        format!("{}/{POD_PREFIX6_LEN}", self.pod_ip6(0))
    }
}

const IP_TIMEOUT: Duration = Duration::from_secs(30);
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const RMDIR_TIMEOUT: Duration = Duration::from_secs(10);

/// One pod of a [`VirtualNode`].
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// `/run/netns/<prefix>-<name>`.
    pub netns: PathBuf,
    /// The netns name for `ip -n`.
    pub netns_name: String,
    /// `<node cgroup root>/pod-<name>`.
    pub cgroup: PathBuf,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address on `eth0`, when the node was built with [`NodeOptions::ipv6`].
    pub ip6: Option<Ipv6Addr>,
}

impl Pod {
    /// Move the *calling thread* into the pod's network namespace (a netns is per thread), so a
    /// test thread can open sockets there as a client that is not in any enrolled cgroup. Use
    /// it only on a thread the test spawned for that purpose: the thread stays there.
    pub fn enter_netns_this_thread(&self) -> anyhow::Result<()> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&self.netns)?;
        // SAFETY: setns on an fd we own; affects only the calling thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow::anyhow!(
                "setns({}): {}",
                self.netns.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// The listening TCP sockets bound to `port` in the pod's netns, as `ss -Htlnp` prints
    /// them (one line each, with the owning process): what an operator checks to see the
    /// daemon's listener groups.
    pub fn listening_sockets(&self, port: u16) -> Result<Vec<String>> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display())).args([
            "ss",
            "-Htlnp",
            &format!("sport = :{port}"),
        ]);
        let out = run_host_ok(cmd, Duration::from_secs(10))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// `ip:port` as a string.
    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    /// `[ip6]:port` as a string. Panics when the pod has no IPv6 address (a test bug: build the
    /// node with [`NodeOptions::ipv6`]).
    pub fn addr6(&self, port: u16) -> String {
        let ip6 = self
            .ip6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address (NodeOptions::ipv6)", self.name));
        format!("[{ip6}]:{port}")
    }
}

/// A virtual node. Dropping it kills every process in its cgroup subtree, removes the subtree and
/// deletes its network namespaces (and so the veths and the bridge).
#[derive(Debug)]
pub struct VirtualNode {
    prefix: String,
    ifprefix: String,
    node_netns_name: Option<String>,
    /// Every netns this node created, in creation order.
    netns_names: Vec<String>,
    cgroup_root: Option<PathBuf>,
    daemon_cgroup: PathBuf,
    pods: Vec<Pod>,
    options: NodeOptions,
    bridge: String,
}

pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run_host_ok(cmd, IP_TIMEOUT).map(drop)
}

fn validate_pod_names(pods: &[&str]) -> Result<()> {
    if pods.len() > MAX_PODS {
        bail!("at most {MAX_PODS} pods per node, got {}", pods.len());
    }
    for (i, p) in pods.iter().enumerate() {
        if p.is_empty()
            || p.len() > MAX_POD_NAME
            || !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            || p.starts_with('-')
        {
            bail!("invalid pod name {p:?}: use 1-{MAX_POD_NAME} chars of [a-z0-9-]");
        }
        if pods[..i].contains(p) {
            bail!("duplicate pod name {p:?}");
        }
    }
    Ok(())
}

impl VirtualNode {
    /// Builds the node: netns `<prefix>-node` with a bridge, one netns + veth + IP per pod, and the
    /// cgroup subtree. On error everything created so far is torn down.
    pub fn new(pods: &[&str]) -> Result<VirtualNode> {
        Self::with_options(pods, NodeOptions::default())
    }

    /// Like [`VirtualNode::new`] with a node index (its own pod subnet), optional IPv6 pod
    /// addresses and an optional gateway on the bridge (see [`NodeOptions`]).
    pub fn with_options(pods: &[&str], options: NodeOptions) -> Result<VirtualNode> {
        validate_pod_names(pods)?;
        crate::sweep::sweep_once();
        if options.index > MAX_NODE_INDEX {
            bail!("node index {} > {MAX_NODE_INDEX}", options.index);
        }
        let pid = std::process::id();
        let n = unique();
        let prefix = format!("sockmesh-test-{pid}-{n}");
        // Interface names must fit IFNAMSIZ-1 = 15: "sm" + hex pid (<= 6) + hex n + suffix.
        let ifprefix = format!("sm{pid:x}{:x}", n % 0x100);
        let cg2 = cgroup::try_cgroup2_mount()?;
        let mut node = VirtualNode {
            daemon_cgroup: cg2.join(&prefix).join("daemon"),
            prefix,
            ifprefix,
            node_netns_name: None,
            netns_names: Vec::new(),
            cgroup_root: None,
            pods: Vec::new(),
            options,
            bridge: String::new(),
        };
        node.build(&cg2, pods)
            .with_context(|| format!("failed to build virtual node {}", node.prefix))?;
        Ok(node)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.netns_names.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn build(&mut self, cg2: &Path, pods: &[&str]) -> Result<()> {
        // cgroups first: cheap, and the root is what Drop keys everything on.
        let root = cg2.join(&self.prefix);
        std::fs::create_dir(&root).with_context(|| format!("failed to create cgroup {}", root.display()))?;
        self.cgroup_root = Some(root.clone());
        std::fs::create_dir(&self.daemon_cgroup)
            .with_context(|| format!("failed to create {}", self.daemon_cgroup.display()))?;

        let node_ns = format!("{}-node", self.prefix);
        self.add_netns(&node_ns)?;
        self.node_netns_name = Some(node_ns.clone());
        let bridge = format!("{}br", self.ifprefix);
        ip(&["-n", &node_ns, "link", "add", &bridge, "type", "bridge"])?;
        ip(&["-n", &node_ns, "link", "set", &bridge, "up"])?;
        self.bridge = bridge.clone();
        let opts = self.options;
        if opts.gateway {
            let gw = format!("{}/{POD_PREFIX_LEN}", opts.gateway_ip());
            ip(&["-n", &node_ns, "addr", "add", &gw, "dev", &bridge])?;
            if opts.ipv6 {
                let gw6 = format!("{}/{POD_PREFIX6_LEN}", opts.gateway_ip6());
                ip(&["-n", &node_ns, "addr", "add", &gw6, "dev", &bridge, "nodad"])?;
            }
        }

        for (i, name) in pods.iter().enumerate() {
            let netns_name = format!("{}-{name}", self.prefix);
            self.add_netns(&netns_name)?;
            let host_if = format!("{}h{i}", self.ifprefix);
            debug_assert!(host_if.len() <= 15, "{host_if}");
            // Both ends are created directly in their namespaces: nothing touches the host netns.
            ip(&[
                "-n",
                &node_ns,
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns_name,
            ])?;
            ip(&["-n", &node_ns, "link", "set", &host_if, "master", &bridge])?;
            ip(&["-n", &node_ns, "link", "set", &host_if, "up"])?;
            let ip4 = opts.pod_ip(FIRST_POD_HOST + i as u8);
            let cidr = format!("{ip4}/{POD_PREFIX_LEN}");
            ip(&["-n", &netns_name, "addr", "add", &cidr, "dev", "eth0"])?;
            let ip6 = opts.ipv6.then(|| opts.pod_ip6(FIRST_POD_HOST + i as u8));
            if let Some(ip6) = ip6 {
                // nodad: usable at once (no tentative state), and the test owns the link.
                let cidr6 = format!("{ip6}/{POD_PREFIX6_LEN}");
                ip(&["-n", &netns_name, "addr", "add", &cidr6, "dev", "eth0", "nodad"])?;
            }
            ip(&["-n", &netns_name, "link", "set", "eth0", "up"])?;
            if opts.gateway {
                let gw = opts.gateway_ip().to_string();
                ip(&["-n", &netns_name, "route", "add", "default", "via", &gw])?;
                if opts.ipv6 {
                    let gw6 = opts.gateway_ip6().to_string();
                    ip(&["-n", &netns_name, "-6", "route", "add", "default", "via", &gw6])?;
                }
            }

            let cg = root.join(format!("pod-{name}"));
            std::fs::create_dir(&cg).with_context(|| format!("failed to create cgroup {}", cg.display()))?;
            self.pods.push(Pod {
                name: (*name).to_owned(),
                netns: Path::new(NETNS_DIR).join(&netns_name),
                netns_name,
                cgroup: cg,
                ip: ip4,
                ip6,
            });
        }
        Ok(())
    }

    /// `sockmesh-test-<pid>-<n>`: the cgroup root's name and every netns name's prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The pod named `name`. Panics (naming the pods) when there is none: a test bug.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| {
            panic!(
                "no pod {name:?} in node {} (pods: {:?})",
                self.prefix,
                self.pods.iter().map(|p| &p.name).collect::<Vec<_>>()
            )
        })
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// How this node was built (index, IPv6, gateway).
    pub fn options(&self) -> NodeOptions {
        self.options
    }

    /// The bridge's interface name (in the node netns).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The node netns name (for `ip -n`).
    pub fn node_netns_name(&self) -> &str {
        self.node_netns_name.as_deref().unwrap_or_default()
    }

    /// `<cgroup2>/sockmesh-test-<pid>-<n>`: the attach point for the daemon's config.
    pub fn cgroup_root(&self) -> &Path {
        self.cgroup_root
            .as_deref()
            .expect("a built node always has a cgroup root")
    }

    /// `<cgroup root>/daemon`.
    pub fn daemon_cgroup(&self) -> &Path {
        &self.daemon_cgroup
    }

    /// `/run/netns/<prefix>-node` (holds the bridge).
    pub fn node_netns(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(self.node_netns_name.as_deref().unwrap_or_default())
    }

    /// Every netns path this node owns (node first).
    pub fn netns_paths(&self) -> Vec<PathBuf> {
        self.netns_names
            .iter()
            .map(|n| Path::new(NETNS_DIR).join(n))
            .collect()
    }

    /// Creates another cgroup `<root>/<name>` (for example for a process that must be inside the
    /// attach point but in no pod). Removed with the node.
    pub fn create_cgroup(&self, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            bail!("invalid cgroup name {name:?}");
        }
        let p = self.cgroup_root().join(name);
        std::fs::create_dir(&p).with_context(|| format!("failed to create {}", p.display()))?;
        Ok(p)
    }

    /// The cgroup root and netns names this node owns, for an out-of-band clean-up (a signal
    /// handler thread) with [`teardown_resources`].
    pub fn resources(&self) -> (Option<PathBuf>, Vec<String>) {
        (self.cgroup_root.clone(), self.netns_names.clone())
    }

    /// Tears everything down; returns the problems (also printed). Idempotent.
    pub fn teardown(&mut self) -> Vec<String> {
        let root = self.cgroup_root.take();
        let names = std::mem::take(&mut self.netns_names);
        let problems = teardown_resources(root.as_deref(), &names);
        for p in &problems {
            eprintln!("warning: teardown of node {}: {p}", self.prefix);
        }
        problems
    }
}

/// Kills every process in the cgroup subtree, removes it, and deletes the network namespaces
/// (last first). Returns the problems; never panics.
pub fn teardown_resources(cgroup_root: Option<&Path>, netns_names: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(root) = cgroup_root {
        if let Err(e) = cgroup::kill_subtree(root, KILL_TIMEOUT) {
            problems.push(format!("{e:#}"));
        }
        if let Err(e) = cgroup::remove_subtree(root, RMDIR_TIMEOUT) {
            problems.push(format!("{e:#}"));
        }
    }
    // Pods first, the node (bridge) last.
    for name in netns_names.iter().rev() {
        if let Err(e) = ip(&["netns", "del", name]) {
            let path = Path::new(NETNS_DIR).join(name);
            if path.exists() {
                if let Err(e2) = remove_netns_file(&path) {
                    problems.push(format!("{e:#}; fallback failed: {e2}"));
                }
            }
        }
    }
    problems
}

/// What `ip netns del` does: detach the namespace's bind mount at `path`, remove the file.
pub fn remove_netns_file(path: &Path) -> std::io::Result<()> {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: plain syscall with a valid NUL-terminated path.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
    std::fs::remove_file(path)
}

impl Drop for VirtualNode {
    fn drop(&mut self) {
        // Must never panic: teardown only collects and prints problems.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.teardown()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_validated() {
        assert!(validate_pod_names(&["frontend", "orders-v2", "a1"]).is_ok());
        assert!(validate_pod_names(&["Front"]).is_err());
        assert!(validate_pod_names(&["a/b"]).is_err());
        assert!(validate_pod_names(&[""]).is_err());
        assert!(validate_pod_names(&["a", "a"]).is_err());
        assert!(validate_pod_names(&["-x"]).is_err());
    }

    #[test]
    fn interface_names_fit_ifnamsiz() {
        let worst = format!("sm{:x}{:x}h{}", 4_194_304u32, 0xffu64, MAX_PODS - 1);
        assert!(worst.len() <= 15, "{worst}");
        let br = format!("sm{:x}{:x}br", 4_194_304u32, 0xffu64);
        assert!(br.len() <= 15, "{br}");
    }
}
