//! Kernel colour propagation with real sockets and a real thread-per-request app, no proxy
//! integration: the test plays the inbound proxy (it colours each inbound connection through the
//! daemon's admin API, i.e. `ColourKernel::set_inbound`, before sending the request) and reads
//! the ledger back through the admin API (`ColourKernel::ledger_colour`), as the outbound proxy
//! will when it parses a request at a stream offset.
//!
//! Pods: `front` (the test's client threads enter its netns; not enrolled), `mid` (enrolled with
//! `--propagate`; `peers/colour_app.py mid`, which calls `down` over a pool of 2 keep-alive
//! connections shared by its threads and forwards nothing), `plain` (the same app, enrolled
//! without propagation), `down` (`colour_app.py down`, not enrolled). No routing policy claims
//! `down`, so the daemon relays mid's pooled connections as opaque TCP.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use sockmesh_tests::daemon::{basic_config, pods_toml, prom_value};
use sockmesh_tests::process::run_host;
use sockmesh_tests::util::ensure_eq;
use sockmesh_tests::{
    eventually, peers_dir, python, require_privileged, sockmesh_bin, Daemon, Pod, Server, VirtualNode,
};

const MID_PORT: u16 = 8080;
const DOWN_PORT: u16 = 9000;
const CALLERS: usize = 8;
const REQUESTS_PER_CALLER: usize = 30;
/// A caller opens a new inbound connection after this many requests (keep-alive in between).
const REQUESTS_PER_CONNECTION: usize = 10;
const POOL: usize = 2;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// What one request saw.
#[derive(Debug, Clone)]
struct Outcome {
    id: String,
    colour: u32,
    down_local: SocketAddr,
    offset: u64,
    down_at: u64,
    tid: u64,
    /// `ColourKernel::ledger_colour` at `offset`, read right after the response.
    ledger: Option<u32>,
    /// The ledger's JSON, for the failure message.
    ledger_json: Value,
}

fn colour_app(pod: &Pod, args: &[&str]) -> Result<Server> {
    let mut cmd = Command::new(python());
    cmd.arg("-u").arg(peers_dir().join("colour_app.py")).args(args);
    Server::start(&pod.cgroup, Some(&pod.netns), cmd)
}

/// The colour the test gives request `i` of caller `c`: 0, 1 and 2 mixed, changing from one
/// request to the next on a connection.
fn colour_for(c: usize, i: usize) -> u32 {
    ((c * 7 + i * 5) % 3) as u32
}

/// One keep-alive HTTP/1.1 exchange; returns the JSON body.
fn exchange(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>, path: &str) -> Result<Value> {
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: mid\r\n\r\n").as_bytes())?;
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("{path}: status line {status:?}");
    }
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("{path}: EOF in the head");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.trim().parse::<usize>()?);
            }
        }
    }
    let mut body = vec![0; length.ok_or_else(|| anyhow!("{path}: no content-length"))?];
    reader.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// `callers` threads in `front`'s netns, each sending `per_caller` requests to `app` (a
/// `colour_app.py mid` in a pod with netns cookie `cookie`), colouring each inbound connection
/// first and reading the ledger of the downstream request right after the answer.
fn run_callers(
    daemon: &Daemon,
    front: &Pod,
    app: SocketAddr,
    cookie: u64,
    outbound_listener: SocketAddr,
    callers: usize,
    per_caller: usize,
) -> Result<Vec<Outcome>> {
    let deadline = Instant::now() + RUN_DEADLINE;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..callers)
            .map(|c| {
                scope.spawn(move || -> Result<Vec<Outcome>> {
                    front.enter_netns_this_thread()?;
                    let mut out = Vec::new();
                    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
                    let clear = |s: &TcpStream| -> Result<()> {
                        daemon
                            .admin(&json!({"op": "colour_clear", "local": s.peer_addr()?, "remote": s.local_addr()?}))
                            .map(drop)
                    };
                    for i in 0..per_caller {
                        if Instant::now() > deadline {
                            bail!("caller {c}: run deadline passed after {i} requests");
                        }
                        if i % REQUESTS_PER_CONNECTION == 0 {
                            if let Some((s, _)) = conn.take() {
                                clear(&s)?;
                            }
                        }
                        if conn.is_none() {
                            let s = TcpStream::connect_timeout(&app, IO_TIMEOUT)?;
                            s.set_read_timeout(Some(IO_TIMEOUT))?;
                            s.set_write_timeout(Some(IO_TIMEOUT))?;
                            let r = BufReader::new(s.try_clone()?);
                            conn = Some((s, r));
                        }
                        let (s, r) = conn.as_mut().expect("set above");
                        // The app's accepted socket: local = the app's address, remote = us.
                        let colour = colour_for(c, i);
                        daemon.admin(&json!({
                            "op": "colour_inbound",
                            "local": s.peer_addr()?,
                            "remote": s.local_addr()?,
                            "colour": colour,
                        }))?;
                        let id = format!("{c}-{i}");
                        let v = exchange(s, r, &format!("/req?id={id}"))
                            .with_context(|| format!("request {id}"))?;
                        let down_local: SocketAddr = v["down_local"]
                            .as_str()
                            .ok_or_else(|| anyhow!("request {id}: {v}"))?
                            .parse()?;
                        let offset = v["offset"].as_u64().ok_or_else(|| anyhow!("{v}"))?;
                        let l = daemon.admin(&json!({
                            "op": "colour_ledger",
                            "netns_cookie": cookie,
                            "local": down_local,
                            "remote": outbound_listener,
                            "offset": offset,
                        }))?;
                        out.push(Outcome {
                            id,
                            colour,
                            down_local,
                            offset,
                            down_at: v["down_at"].as_u64().ok_or_else(|| anyhow!("{v}"))?,
                            tid: v["tid"].as_u64().unwrap_or(0),
                            ledger: l["colour"].as_u64().map(|c| c as u32),
                            ledger_json: l["ledger"].clone(),
                        });
                    }
                    if let Some((s, _)) = conn.take() {
                        clear(&s)?;
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().map_err(|_| anyhow!("a caller thread panicked"))??);
        }
        Ok(all)
    })
}

fn pod_cookie(status: &Value, name: &str) -> Result<u64> {
    status["pods"]
        .as_array()
        .and_then(|pods| pods.iter().find(|p| p["name"] == name))
        .and_then(|p| p["netns_cookie"].as_u64())
        .ok_or_else(|| anyhow!("no netns_cookie for pod {name} in status"))
}

/// `6.3` from `6.18.44-...`.
fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let ma: u32 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let mi: u32 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    (ma, mi) >= (major, minor)
}

#[test]
fn colour_follows_the_thread_onto_a_pooled_outbound_connection() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["front", "mid", "plain", "down"]).unwrap();
    let (front, mid, plain, down) = (
        node.pod("front"),
        node.pod("mid"),
        node.pod("plain"),
        node.pod("down"),
    );
    let daemon = Daemon::start(&node, &basic_config(&node, "")).unwrap();
    let st = daemon.status().unwrap();
    let release = st["kernel"]["release"].as_str().unwrap_or("").to_string();
    let state = st["propagation"]["state"].as_str().unwrap_or("").to_string();
    if !kernel_at_least(&release, 6, 3) {
        // No sock_recv_length/sock_send_length tracepoints: the daemon must run on without it.
        assert!(
            state.starts_with("unavailable: "),
            "kernel {release}: propagation state {state:?}"
        );
        eprintln!("colour propagation unavailable on kernel {release} as expected: {state}");
        return;
    }
    assert_eq!(state, "available", "kernel {release}: {}", st["propagation"]);
    let text = daemon.status_text().unwrap();
    assert!(text.contains("colour propagation: available"), "{text}");
    let metrics = daemon.metrics().unwrap();
    assert_eq!(
        prom_value(&metrics, "sockmesh_propagation_available", &[]),
        Some(1.0)
    );

    daemon.enroll_args(mid, &["--propagate"]).unwrap();
    daemon.enroll(plain).unwrap();
    let st = daemon.status().unwrap();
    assert_eq!(st["propagation"]["pods"], json!(["mid"]), "{}", st["propagation"]);
    let (mid_cookie, plain_cookie) = (pod_cookie(&st, "mid").unwrap(), pod_cookie(&st, "plain").unwrap());
    let created_before = daemon.counter("ledger_created").unwrap();

    let down_addr = down.addr(DOWN_PORT);
    let pool = POOL.to_string();
    let _down = colour_app(down, &["down", "--port", &DOWN_PORT.to_string()]).unwrap();
    let mid_args = [
        "mid",
        "--port",
        &MID_PORT.to_string(),
        "--downstream",
        &down_addr,
        "--pool",
        &pool,
    ];
    let _mid = colour_app(mid, &mid_args).unwrap();
    let _plain = colour_app(plain, &mid_args).unwrap();
    // What the app's pooled sockets are connected to after the connect rewrite.
    let listener: SocketAddr = format!("127.0.0.1:{}", mesh_outbound_port()).parse().unwrap();

    let started = Instant::now();
    let outcomes = run_callers(
        &daemon,
        front,
        format!("{}:{MID_PORT}", mid.ip).parse().unwrap(),
        mid_cookie,
        listener,
        CALLERS,
        REQUESTS_PER_CALLER,
    )
    .unwrap();
    let elapsed = started.elapsed();
    let total = outcomes.len();
    assert_eq!(total, CALLERS * REQUESTS_PER_CALLER);

    // The relay carries the stream unchanged: the app's offsets are the downstream's.
    for o in &outcomes {
        assert_eq!(
            o.offset, o.down_at,
            "request {}: app offset vs downstream offset",
            o.id
        );
    }
    let conns: BTreeSet<SocketAddr> = outcomes.iter().map(|o| o.down_local).collect();
    assert!(
        !conns.is_empty() && conns.len() <= POOL,
        "mid used {} downstream connections: {conns:?}",
        conns.len()
    );
    let threads: BTreeSet<u64> = outcomes.iter().map(|o| o.tid).collect();
    let mut by_colour: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    let mut wrong = Vec::new();
    let mut unknown = 0;
    for o in &outcomes {
        let e = by_colour.entry(o.colour).or_default();
        e.0 += 1;
        match o.ledger {
            Some(c) if c == o.colour => e.1 += 1,
            None => {
                unknown += 1;
                wrong.push(o.clone());
            }
            Some(_) => wrong.push(o.clone()),
        }
    }
    let correct = total - wrong.len();
    eprintln!(
        "colour propagation: {correct}/{total} downstream requests carry their inbound request's colour \
         ({unknown} not in the ledger); per colour (sent, correct): {by_colour:?}; {} app threads, \
         {} pooled connections, {:.1} s",
        threads.len(),
        conns.len(),
        elapsed.as_secs_f64()
    );
    for c in 0..3u32 {
        assert!(
            by_colour.get(&c).map(|e| e.0).unwrap_or(0) >= total / 4,
            "colour {c} under-represented: {by_colour:?}"
        );
    }
    assert!(
        threads.len() >= CALLERS,
        "the app served {} threads for {CALLERS} concurrent callers",
        threads.len()
    );
    assert!(
        wrong.is_empty(),
        "{} of {total} wrong; first ones: {:#?}",
        wrong.len(),
        wrong.iter().take(5).collect::<Vec<_>>()
    );

    // Every pooled socket of `mid` got a ledger, and nothing else did.
    let created = daemon.counter("ledger_created").unwrap() - created_before;
    assert_eq!(created as usize, conns.len(), "ledgers created");
    assert!(daemon.counter("ledger_recorded").unwrap() > 0);
    assert!(daemon.counter("recv_coloured").unwrap() > 0);
    assert!(daemon.counter("send_cleared").unwrap() > 0);
    // Scopes ended: every app thread wrote its response, which cleared its colour; the test
    // cleared every inbound connection it coloured.
    eventually(Duration::from_secs(10), || {
        let p = daemon.status()?["propagation"].clone();
        ensure_eq("coloured threads", p["thread_entries"].as_u64(), Some(0))?;
        ensure_eq("inbound colour entries", p["inbound_entries"].as_u64(), Some(0))
    })
    .unwrap();

    // A pod without propagation: the same app and traffic, no ledger for its sockets.
    let plain_out = run_callers(
        &daemon,
        front,
        format!("{}:{MID_PORT}", plain.ip).parse().unwrap(),
        plain_cookie,
        listener,
        2,
        REQUESTS_PER_CONNECTION * 2,
    )
    .unwrap();
    assert_eq!(plain_out.len(), 2 * REQUESTS_PER_CONNECTION * 2);
    for o in &plain_out {
        assert!(
            o.ledger.is_none() && o.ledger_json.is_null(),
            "pod without propagate has a ledger: {o:?}"
        );
    }
    assert_eq!(
        daemon.counter("ledger_created").unwrap() - created_before,
        created,
        "no ledger for the plain pod's sockets"
    );
    let p = daemon.status().unwrap()["propagation"].clone();
    assert_eq!(p["ledgers"].as_u64(), Some(conns.len() as u64), "{p}");

    // The tracepoints run for every task of the host but act only under cgroup_root: this test
    // process (outside it) reads a coloured socket, keyed exactly as above, and stays uncoloured.
    let before = daemon.counter("recv_coloured").unwrap();
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            front.enter_netns_this_thread()?;
            let l = std::net::TcpListener::bind((front.ip, 0))?;
            let c = TcpStream::connect(l.local_addr()?)?;
            let (mut a, peer) = l.accept()?;
            a.set_read_timeout(Some(IO_TIMEOUT))?;
            let key = json!({"local": a.local_addr()?, "remote": peer});
            let mut req = key.clone();
            req["op"] = json!("colour_inbound");
            req["colour"] = json!(2);
            daemon.admin(&req)?;
            (&c).write_all(b"x")?;
            let mut b = [0u8; 1];
            a.read_exact(&mut b)?;
            let mut req = key;
            req["op"] = json!("colour_clear");
            daemon.admin(&req).map(drop)
        })
        .join()
        .map_err(|_| anyhow!("thread panicked"))
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        daemon.counter("recv_coloured").unwrap(),
        before,
        "a task outside cgroup_root was coloured"
    );
}

/// The program id behind a pinned bpf link (`bpftool link show pinned`).
fn pinned_link_prog(pin: &std::path::Path) -> Result<u64> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "link", "show", "pinned"]).arg(pin);
    let out = run_host(cmd, Duration::from_secs(30))?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool link show pinned {}", pin.display()))?;
    v["prog_id"]
        .as_u64()
        .ok_or_else(|| anyhow!("no prog_id for {}: {v}", pin.display()))
}

fn prog_exists(id: u64) -> bool {
    let mut cmd = Command::new("bpftool");
    cmd.args(["prog", "show", "id", &id.to_string()]);
    run_host(cmd, Duration::from_secs(30))
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn tracepoint_links_are_pinned_adopted_on_restart_and_removed_by_uninstall() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["front", "mid", "down"]).unwrap();
    let (front, mid, down) = (node.pod("front"), node.pod("mid"), node.pod("down"));
    // `propagate` from the config file this time; the successor gets it from config + state.
    let cfg = basic_config(&node, &format!("{}propagate = true\n", pods_toml(&[mid])));
    let mut first = Daemon::start(&node, &cfg).unwrap();
    let st = first.status().unwrap();
    let release = st["kernel"]["release"].as_str().unwrap_or("").to_string();
    if !kernel_at_least(&release, 6, 3) {
        eprintln!("kernel {release}: no colour tracepoints, nothing to pin");
        return;
    }
    assert_eq!(st["propagation"]["state"], "available", "{}", st["propagation"]);
    let links = first.pin_dir().join("links");
    let pins = [links.join("sm_recv_colour"), links.join("sm_send_colour")];
    let ids: Vec<u64> = pins.iter().map(|p| pinned_link_prog(p).unwrap()).collect();
    assert!(ids.iter().all(|id| prog_exists(*id)));

    let state = first.stop_keep_state().unwrap();
    let pin_dir = state.0.clone();
    for p in &pins {
        assert!(p.exists(), "{} kept for the successor", p.display());
    }
    let second = Daemon::start_with_state(node.daemon_cgroup(), &cfg, Some(state)).unwrap();
    let st = second.status().unwrap();
    assert_eq!(st["propagation"]["state"], "available", "{}", st["propagation"]);
    let attached: Vec<String> = st["kernel"]["attached"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    for want in [
        "sm_recv_colour -> tp_btf/sock_recv_length (adopted)",
        "sm_send_colour -> tp_btf/sock_send_length (adopted)",
    ] {
        assert!(attached.iter().any(|a| a == want), "{want} not in {attached:?}");
    }
    let adopted: Vec<u64> = pins.iter().map(|p| pinned_link_prog(p).unwrap()).collect();
    assert_eq!(adopted, ids, "the same programs stay attached");
    let mid_status = st["pods"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "mid").cloned())
        .unwrap();
    assert_eq!(mid_status["propagate"], true, "{mid_status}");

    // The adopted hooks and the successor's map handles work together. The app listens
    // dual-stack this time: its IPv4 clients arrive on AF_INET6 sockets with IPv4-mapped
    // addresses, which the recv hook must name like IPv4 ones.
    let _down = colour_app(down, &["down", "--port", &DOWN_PORT.to_string()]).unwrap();
    let down_addr = down.addr(DOWN_PORT);
    let _mid = colour_app(
        mid,
        &[
            "mid",
            "--port",
            &MID_PORT.to_string(),
            "--downstream",
            &down_addr,
            "--pool",
            "1",
            "--bind",
            "::",
        ],
    )
    .unwrap();
    let out = run_callers(
        &second,
        front,
        format!("{}:{MID_PORT}", mid.ip).parse().unwrap(),
        pod_cookie(&st, "mid").unwrap(),
        format!("127.0.0.1:{}", mesh_outbound_port()).parse().unwrap(),
        2,
        REQUESTS_PER_CONNECTION * 2,
    )
    .unwrap();
    let correct = out.iter().filter(|o| o.ledger == Some(o.colour)).count();
    eprintln!("after the restart: {correct}/{} correct", out.len());
    assert_eq!(correct, out.len(), "{out:#?}");

    let uninstall = Command::new(sockmesh_bin())
        .arg("uninstall")
        .arg("--pin-dir")
        .arg(second.pin_dir())
        .arg("--state-file")
        .arg(second.state_file())
        .arg("--admin-socket")
        .arg(second.admin_socket())
        .output()
        .unwrap();
    assert!(
        uninstall.status.success(),
        "{}",
        String::from_utf8_lossy(&uninstall.stderr)
    );
    assert!(!pin_dir.exists(), "{} removed", pin_dir.display());
    eventually(Duration::from_secs(10), || {
        for id in &ids {
            anyhow::ensure!(!prog_exists(*id), "program {id} is still loaded");
        }
        Ok(())
    })
    .unwrap();
    drop(first);
}

/// The outbound listener port the daemon uses (the config leaves the default).
fn mesh_outbound_port() -> u16 {
    15001
}

#[test]
fn kernel_release_parsing() {
    assert!(kernel_at_least("6.18.44-firecracker", 6, 3));
    assert!(kernel_at_least("6.3.0", 6, 3));
    assert!(!kernel_at_least("6.1.0-28-amd64", 6, 3));
    assert!(!kernel_at_least("5.15.0", 6, 3));
    assert!(kernel_at_least("7.0", 6, 3));
}
