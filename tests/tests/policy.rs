//! Bypass policy, and the daemon's control surfaces under bad input: bypassed ports and CIDRs are
//! never captured (and say why in the counters); the admin socket is private and survives
//! garbage; the metrics endpoint answers hostile requests with an error and keeps serving.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use sockmesh_tests::checks::whoami;
use sockmesh_tests::daemon::{basic_config, http_get, pods_toml, prom_value};
use sockmesh_tests::{require_privileged, Daemon, Server, VirtualNode};

#[test]
fn bypassed_ports_and_cidrs_are_never_captured_and_counted_by_reason() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["client", "server", "other"]).expect("node");
    let (client, server, other) = (node.pod("client"), node.pod("server"), node.pod("other"));
    let _s1 = Server::peer(server, 7000, "whoami").unwrap();
    let _s2 = Server::peer(server, 7001, "whoami").unwrap();
    let _s3 = Server::peer(other, 7001, "whoami").unwrap();
    let cfg = basic_config(
        &node,
        &format!(
            "[bypass]\nports = [7000]\ncidrs = [\"{}/32\"]\n{}",
            other.ip,
            pods_toml(&[client])
        ),
    );
    let d = Daemon::start(&node, &cfg).expect("daemon");
    let c = |n: &str| d.counter(n).unwrap();
    let (cap0, port0, cidr0) = (
        c("connect_captured"),
        c("connect_bypass_port"),
        c("connect_bypass_cidr"),
    );
    // Bypassed port: direct.
    let line = whoami(client, &server.addr(7000));
    assert!(line.starts_with(&format!("peer={}:", client.ip)), "{line}");
    assert_eq!(c("connect_bypass_port"), port0 + 1);
    // Bypassed CIDR: direct.
    let line = whoami(client, &other.addr(7001));
    assert!(line.starts_with(&format!("peer={}:", client.ip)), "{line}");
    assert_eq!(c("connect_bypass_cidr"), cidr0 + 1);
    assert_eq!(c("connect_captured"), cap0, "nothing bypassed was captured");
    // Anything else is captured.
    let line = whoami(client, &server.addr(7001));
    assert!(line.starts_with(&format!("peer={}:", client.ip)), "{line}");
    assert_eq!(c("connect_captured"), cap0 + 1);
}

#[test]
fn the_admin_socket_is_private_and_survives_garbage() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["a"]).expect("node");
    let d = Daemon::start(&node, &basic_config(&node, "")).expect("daemon");
    let mode = std::fs::metadata(d.admin_socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode {mode:o}");
    // Garbage, then a request too long to be one, then an unknown op: each answered or cut off,
    // none takes the daemon down.
    for junk in [
        b"{not json\n".to_vec(),
        vec![b'x'; 200_000],
        b"{\"op\":\"explode\"}\n".to_vec(),
    ] {
        let mut s = UnixStream::connect(d.admin_socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        assert!(!resp.contains("\"ok\":true"), "junk accepted: {resp}");
    }
    // A refused enrolment is an error with a reason, counted in metrics.
    let out = d
        .cli_raw(&[
            "enroll",
            "--name",
            "bad name!",
            "--netns",
            "/run/netns/x",
            "--cgroup",
            "/x",
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid pod name"),
        "{out:?}"
    );
    let m = d.metrics().unwrap();
    assert_eq!(
        prom_value(&m, "sockmesh_admin_errors_total", &[("reason", "bad_name")]),
        Some(1.0),
        "{m}"
    );
    d.status().expect("the daemon still answers");
}

#[test]
fn the_metrics_endpoint_rejects_hostile_requests_and_keeps_serving() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["a"]).expect("node");
    let d = Daemon::start(&node, &basic_config(&node, "")).expect("daemon");
    let addr = d.metrics_addr();
    // A header that never ends.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&vec![b'A'; 64 * 1024]);
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.0 400"), "{resp:.80}");
    // An unknown path.
    let err = http_get(addr, "/nope").expect_err("an unknown path is not 200");
    assert!(format!("{err:#}").contains("404"), "{err:#}");
    // Still serving.
    let m = d.metrics().unwrap();
    assert!(m.contains("sockmesh_kernel_events_total"), "{m:.300}");
}
