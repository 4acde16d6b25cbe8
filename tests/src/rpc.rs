//! The npm SOFA Bolt / Dubbo 2 peers in `tests/peers/npm` (installed by `cargo xtask bootstrap`):
//! `rpc_server.js` endpoints in pods, `rpc_load.js` clients from a pod (the real sofa-rpc-node
//! `RpcClient`, one connection per client process). Shared by the routing and upgrade tests.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::process::exec_in;
use crate::{last_json, peers_dir, Pod, Server, VirtualNode};

/// The servers' stats listener port (127.0.0.1 in each endpoint's netns).
pub const RPC_STATS: u16 = 9903;
/// Bound for one `rpc_load.js` run with a request count (the process is killed after it).
pub const RPC_LOAD_TIMEOUT: Duration = Duration::from_secs(60);

pub fn npm_dir() -> PathBuf {
    peers_dir().join("npm")
}

/// Why the npm peers cannot run (`None` when their packages are installed).
pub fn npm_peers_problem() -> Option<String> {
    let m = npm_dir().join("node_modules");
    let ok = ["sofa-rpc-node", "sofa-bolt-node", "dubbo-remoting"]
        .iter()
        .all(|p| m.join(p).join("package.json").is_file());
    (!ok).then(|| format!("the npm peers are not installed in {}", m.display()))
}

/// `node npm/<script> <args>` inside `pod`, waiting for `listening`.
pub fn node_server(pod: &Pod, script: &str, args: &[&str]) -> Server {
    let mut cmd = Command::new("node");
    cmd.current_dir(npm_dir()).arg(npm_dir().join(script)).args(args);
    Server::start(&pod.cgroup, Some(&pod.netns), cmd)
        .unwrap_or_else(|e| panic!("{script} in {}: {e:#}", pod.name))
}

/// `rpc_server.js` over `protocol` (`bolt`, `dubbo`) on `port` in the endpoint pods `v1` and
/// `v2`, each answering `whoami` with its pod's name; stats on [`RPC_STATS`].
pub fn rpc_servers(node: &VirtualNode, protocol: &str, port: u16) -> Vec<Server> {
    rpc_servers_in(&[node.pod("v1"), node.pod("v2")], protocol, port, &[])
}

/// `rpc_server.js` in each of `pods`, named after the pod, with `extra` arguments (e.g.
/// `--delay-ms`).
pub fn rpc_servers_in(pods: &[&Pod], protocol: &str, port: u16, extra: &[&str]) -> Vec<Server> {
    let port = port.to_string();
    let stats_port = RPC_STATS.to_string();
    pods.iter()
        .map(|pod| {
            let mut args = vec![
                "--protocol",
                protocol,
                "--name",
                &pod.name,
                "--port",
                &port,
                "--stats-port",
                &stats_port,
            ];
            args.extend_from_slice(extra);
            node_server(pod, "rpc_server.js", &args)
        })
        .collect()
}

/// `node npm/rpc_load.js --protocol PROTOCOL --connect TARGET` (more arguments to add).
pub fn rpc_load_command(protocol: &str, target: &str) -> Command {
    let mut cmd = Command::new("node");
    cmd.current_dir(npm_dir())
        .arg(npm_dir().join("rpc_load.js"))
        .args(["--protocol", protocol, "--connect", target]);
    cmd
}

/// `rpc_load.js` from `client` to `target` (`VIP:PORT`): `requests` calls of `whoami`, 32 in
/// flight; its JSON summary, asserting that every call was answered.
pub fn rpc_load(client: &Pod, target: &str, protocol: &str, requests: u64, header: Option<&str>) -> Value {
    rpc_load_with(client, target, protocol, requests, header, &[])
}

pub fn rpc_load_with(
    client: &Pod,
    target: &str,
    protocol: &str,
    requests: u64,
    header: Option<&str>,
    extra: &[&str],
) -> Value {
    let (out, v) = rpc_load_raw(client, target, protocol, requests, header, extra);
    assert!(
        out.status.success() && v["answered"].as_u64() == Some(requests) && v["errors"].as_u64() == Some(0),
        "{protocol}: not every call was answered: {v} stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

/// `rpc_load.js` whatever its outcome: the process output and its JSON summary.
pub fn rpc_load_raw(
    client: &Pod,
    target: &str,
    protocol: &str,
    requests: u64,
    header: Option<&str>,
    extra: &[&str],
) -> (Output, Value) {
    let mut cmd = rpc_load_command(protocol, target);
    cmd.args([
        "--requests",
        &requests.to_string(),
        "--concurrency",
        "32",
        "--seconds-limit",
        "50",
    ]);
    if let Some(h) = header {
        cmd.args(["--header", h]);
    }
    cmd.args(extra);
    let out = exec_in(&client.cgroup, Some(&client.netns), cmd, RPC_LOAD_TIMEOUT).expect("rpc_load.js run");
    let v = last_json("rpc_load.js", &out);
    (out, v)
}
