//! Small checks the capture tests share (capture, cluster, dual-stack, coexistence): daemon
//! counters read and waited for, what a `peer get` (whoami) answered, a Python snippet's JSON,
//! and a `peer load` run that must answer every connection.

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::bail;
use serde_json::Value;

use crate::cluster::status_dump;
use crate::node::Pod;
use crate::process::{check_output, exec_in, pod_exec};
use crate::util::{ensure_eq, eventually, peer_bin, python};
use crate::Daemon;

/// How long a counter may take to reach what a test waits for.
pub const SETTLE: Duration = Duration::from_secs(10);

/// A process's stdout as text.
pub fn out_str(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `counters.<name>` from `status` (a panic naming it when missing).
pub fn counter(d: &Daemon, name: &str) -> u64 {
    d.counter(name)
        .unwrap_or_else(|e| panic!("reading counter {name}: {e:#}"))
}

/// Waits until `counters.<name>` equals `want` (counters may be summed lazily).
pub fn wait_counter_eq(d: &Daemon, name: &str, want: u64) {
    eventually(SETTLE, || ensure_eq(name, d.counter(name)?, want))
        .unwrap_or_else(|e| panic!("{e:#}\nstatus: {}", status_dump(d)));
}

/// Waits until `counters.<name>` is at least `want`; returns the value seen.
pub fn wait_counter_at_least(d: &Daemon, name: &str, want: u64) -> u64 {
    eventually(SETTLE, || {
        let v = d.counter(name)?;
        if v >= want {
            Ok(v)
        } else {
            bail!("{name} = {v}, want >= {want}")
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\nstatus: {}", status_dump(d)))
}

/// `peer get --connect <addr>` from `pod`: the whoami line the server answered.
pub fn whoami(pod: &Pod, addr: &str) -> String {
    let out = pod_exec(pod, peer_bin(), &["get", "--connect", addr]).expect("peer get");
    check_output(&format!("peer get {addr} from {}", pod.name), &out).unwrap();
    out_str(&out).trim().to_owned()
}

/// Runs a Python snippet (`python3 -c CODE args...`) in `pod`; its JSON output.
pub fn python_json(pod: &Pod, code: &str, args: &[&str]) -> Value {
    python_json_within(pod, code, args, Duration::from_secs(60))
}

/// [`python_json`] for a snippet that may run longer than a minute (killed after `limit`).
pub fn python_json_within(pod: &Pod, code: &str, args: &[&str], limit: Duration) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg("-c").arg(code).args(args);
    let out = exec_in(&pod.cgroup, Some(&pod.netns), cmd, limit).unwrap();
    check_output("python snippet", &out).unwrap();
    serde_json::from_str(out_str(&out).trim())
        .unwrap_or_else(|e| panic!("python printed non-JSON ({e}): {}", out_str(&out)))
}

/// `peer load` from `client` to `target`: `connections` echo connections of 1 B to 1 MiB
/// messages; asserts every one succeeded (`what` names the run in messages).
pub fn peer_load_all_ok(client: &Pod, target: &str, connections: u64, what: &str) -> Value {
    let mut cmd = Command::new(peer_bin());
    cmd.args([
        "load",
        "--connect",
        target,
        "--connections",
        &connections.to_string(),
        "--sizes",
        "1,1000,65536,1MiB",
        "--seconds-limit",
        "60",
    ]);
    let out = exec_in(&client.cgroup, Some(&client.netns), cmd, Duration::from_secs(75)).unwrap();
    eprintln!("{what}: {}", out_str(&out).trim());
    check_output(what, &out).unwrap();
    let summary: Value = serde_json::from_str(out_str(&out).trim()).unwrap();
    assert_eq!(summary["ok"], connections, "{what}: {summary}");
    assert_eq!(summary["failed"], 0, "{what}: {summary}");
    summary
}
