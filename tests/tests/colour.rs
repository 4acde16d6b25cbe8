//! Privileged end-to-end tests of traffic colours: a three-service chain entry → mid → leaf on a
//! virtual node, every service with a base and a gray endpoint and entry and mid with a stress
//! endpoint (the leaf has none: stress must never reach it). Each endpoint is a real
//! thread-per-request HTTP/1.1 server (`tests/peers/chain_app.py`) in its service's pod that
//! calls the next service's VIP over a pool of keep-alive connections and records the colour of
//! every request it served. The servers know nothing of sockmesh; the proxies route.
//!
//! ```sh
//! SOCKMESH_BIN=target/release/sockmesh cargo test -p sockmesh-tests --test colour -- --test-threads=1
//! ```

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sockmesh_tests::daemon::{basic_config, http_get, pod_toml, prom_value};
use sockmesh_tests::process::exec_in;
use sockmesh_tests::{last_json, peers_dir, python, require_privileged, Daemon, Pod, Server, VirtualNode};

/// Service VIPs (no interface holds them; the connect is captured first).
const ENTRY: &str = "10.96.1.1:80";
const MID: &str = "10.96.1.2:80";
const LEAF: &str = "10.96.1.3:80";
/// Endpoint ports inside each service's pod, by colour.
const PORTS: [(&str, u16); 3] = [("base", 8001), ("gray", 8002), ("stress", 8003)];
/// Ingress: this share of user keys (`x-user`) is gray.
const USER_PERCENT: f64 = 30.0;
const LOAD_LIMIT: Duration = Duration::from_secs(150);

fn node() -> VirtualNode {
    VirtualNode::new(&["client", "entry", "mid", "leaf", "outsider"]).expect("virtual node")
}

/// The policy: colours, the three services and the entry's ingress rules.
fn policy(node: &VirtualNode) -> String {
    let mut s = format!(
        r#"
[[colours]]
name = "gray"
id = 1
fallback = "base"

[[colours]]
name = "stress"
id = 2
fallback = "none"

[[ingress]]
service = "entry"
colour = "gray"
match = {{ headers = {{ x-group = "beta" }} }}

[[ingress]]
service = "entry"
colour = "gray"
percent = {USER_PERCENT}
hash_header = "x-user"
"#
    );
    for (name, vip, stress) in [("entry", ENTRY, true), ("mid", MID, true), ("leaf", LEAF, false)] {
        let pod = node.pod(name);
        let mut eps = Vec::new();
        for (colour, port) in PORTS {
            if colour == "stress" && !stress {
                continue;
            }
            let labels = if colour == "base" {
                String::new()
            } else {
                format!(", labels = {{ colour = \"{colour}\" }}")
            };
            eps.push(format!("  {{ address = \"{}\"{labels} }},", pod.addr(port)));
        }
        s.push_str(&format!(
            "\n[[services]]\nname = \"{name}\"\naddresses = [\"{vip}\"]\nprotocol = \"http1\"\ntimeout_ms = 10000\nendpoints = [\n{}\n]\n",
            eps.join("\n")
        ));
    }
    s
}

/// The chain's servers: every colour's endpoint of every service, each calling the next VIP.
/// The services in `forwarding` copy the colour header onto their downstream calls.
fn chain(node: &VirtualNode, forwarding: &[&str]) -> Vec<Server> {
    let mut servers = Vec::new();
    for (name, next, stress) in [
        ("entry", Some(MID), true),
        ("mid", Some(LEAF), true),
        ("leaf", None, false),
    ] {
        for (colour, port) in PORTS {
            if colour == "stress" && !stress {
                continue;
            }
            let mut cmd = Command::new(python());
            cmd.arg("-u").arg(peers_dir().join("chain_app.py")).args([
                "serve",
                "--port",
                &port.to_string(),
                "--name",
                name,
                "--colour",
                colour,
            ]);
            if let Some(n) = next {
                cmd.args(["--next", n]);
            }
            if forwarding.contains(&name) {
                cmd.arg("--forward");
            }
            let pod = node.pod(name);
            servers.push(Server::start(&pod.cgroup, Some(&pod.netns), cmd).expect("chain server"));
        }
    }
    servers
}

/// `chain_app.py load` from `pod`; its JSON summary.
fn load(pod: &Pod, target: &str, requests: u32, mix: &str) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg("-u").arg(peers_dir().join("chain_app.py")).args([
        "load",
        "--target",
        target,
        "--requests",
        &requests.to_string(),
        "--concurrency",
        "8",
        "--mix",
        mix,
        "--seconds-limit",
        &LOAD_LIMIT.as_secs().to_string(),
    ]);
    let out = exec_in(
        &pod.cgroup,
        Some(&pod.netns),
        cmd,
        LOAD_LIMIT + Duration::from_secs(30),
    )
    .expect("load");
    last_json("chain_app.py load", &out)
}

/// What each endpoint served, by the colour the request arrived with: (service, own colour) →
/// {received colour: n}. Read inside each pod (the stats port is the endpoint's own).
fn served(node: &VirtualNode) -> BTreeMap<(String, String), BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for name in ["entry", "mid", "leaf"] {
        let pod = node.pod(name);
        for (colour, port) in PORTS {
            if colour == "stress" && name == "leaf" {
                continue;
            }
            let mut cmd = Command::new("curl");
            cmd.args([
                "-sS",
                "--max-time",
                "5",
                &format!("http://{}/__stats", pod.addr(port)),
            ]);
            // Not enrolled traffic: the stats call goes to the pod's own address (never captured).
            let o = exec_in(&pod.cgroup, Some(&pod.netns), cmd, Duration::from_secs(10)).expect("stats");
            let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
                panic!(
                    "{name}/{colour} stats: {e}: {}",
                    String::from_utf8_lossy(&o.stdout)
                )
            });
            let m = v["served"]
                .as_object()
                .expect("served")
                .iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect();
            out.insert((name.to_owned(), colour.to_owned()), m);
        }
    }
    out
}

/// The answers of one kind of request: {"<status> <body>": n}.
fn answers<'a>(v: &'a Value, kind: &str) -> BTreeMap<&'a str, u64> {
    v["by_kind"][kind]
        .as_object()
        .unwrap_or_else(|| panic!("no `{kind}` requests in {v}"))
        .iter()
        .map(|(k, n)| (k.as_str(), n.as_u64().unwrap_or(0)))
        .collect()
}

fn chain_of(colour: &str) -> String {
    format!("200 entry/{colour} mid/{colour} leaf/{colour}")
}

fn metric(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    prom_value(&d.metrics().expect("metrics"), name, labels).unwrap_or(0.0)
}

/// 10,000 requests mixed base / gray (header) / stress / hashed user key / header-matched ingress
/// / garbage colour: every coloured request stays in its colour through all three services, base
/// never reaches a coloured endpoint, stress never reaches the leaf and gets the clear error.
#[test]
fn colours_stay_in_their_group_along_a_three_service_chain() {
    if !require_privileged() {
        return;
    }
    let node = node();
    let mut cfg = policy(&node);
    for p in ["client", "entry", "mid", "leaf"] {
        cfg.push_str(&pod_toml(node.pod(p), ""));
    }
    let d = Daemon::start(&node, &basic_config(&node, &cfg)).expect("daemon");
    let _servers = chain(&node, &["entry", "mid"]);
    let mix = "base,gray,stress,user,beta,junk,base,gray,user,base";
    let v = load(node.pod("client"), ENTRY, 10_000, mix);
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["sent"], 10_000, "{v}");

    // What the clients saw.
    let only = |kind: &str, want: &str| {
        let a = answers(&v, kind);
        assert_eq!(a.len(), 1, "{kind}: {a:?}");
        assert!(a.contains_key(want), "{kind}: {a:?}");
    };
    only("base", &chain_of("base"));
    only("gray", &chain_of("gray"));
    only("beta", &chain_of("gray"));
    // Garbage in the header: ignored (counted), the request is base.
    only("junk", &chain_of("base"));
    let stress = answers(&v, "stress");
    let stress_n: u64 = stress.values().sum();
    assert!(
        stress.len() == 1
            && stress
                .keys()
                .all(|k| k.starts_with("503 entry/stress mid/stress") && k.contains("stress")),
        "stress answers: {stress:?}"
    );
    let users = answers(&v, "user");
    let user_n: u64 = users.values().sum();
    let gray_users = users.get(chain_of("gray").as_str()).copied().unwrap_or(0);
    let base_users = users.get(chain_of("base").as_str()).copied().unwrap_or(0);
    assert_eq!(gray_users + base_users, user_n, "user answers: {users:?}");
    let share = 100.0 * gray_users as f64 / user_n as f64;
    assert!(
        (USER_PERCENT - 6.0..=USER_PERCENT + 6.0).contains(&share),
        "gray user share {share:.1}%"
    );

    // What the servers saw: each endpoint only its own colour (base: no header at all).
    let seen = served(&node);
    let mut total_entry = 0;
    for ((svc, colour), got) in &seen {
        let own = if colour == "base" { "none" } else { colour.as_str() };
        for (c, n) in got {
            assert!(
                c == own || *n == 0,
                "{svc}/{colour} served {n} `{c}` requests: {got:?}"
            );
        }
        if svc == "entry" {
            total_entry += got.values().sum::<u64>();
        }
    }
    assert_eq!(total_entry, 10_000, "{seen:?}");
    assert_eq!(seen[&("leaf".into(), "base".into())].get("stress"), None);
    let stress_mid = seen[&("mid".to_owned(), "stress".to_owned())]
        .get("stress")
        .copied();
    assert_eq!(stress_mid, Some(stress_n), "{seen:?}");

    // The daemon's counters agree.
    let unavailable = metric(
        &d,
        "sockmesh_colour_unavailable_total",
        &[("service", "leaf"), ("colour", "stress")],
    );
    assert_eq!(unavailable as u64, stress_n);
    let junk: u64 = answers(&v, "junk").values().sum();
    assert!(metric(&d, "sockmesh_colour_invalid_total", &[]) as u64 >= junk);
    let ingress = metric(&d, "sockmesh_colour_source_total", &[("source", "ingress")]) as u64;
    let beta: u64 = answers(&v, "beta").values().sum();
    assert_eq!(ingress, beta + gray_users, "ingress-coloured requests");
    let routes = d.cli(&["routes"]).expect("routes");
    let text = String::from_utf8_lossy(&routes.stdout);
    assert!(text.contains("gray") && text.contains("stress"), "{text}");
    eprintln!(
        "chain: {} requests in {} ms; stress {stress_n} refused at the leaf; users gray {share:.1}%",
        v["sent"], v["elapsed_ms"]
    );
}

/// A colour header from a client outside the mesh does not colour its request (stripped at the
/// entry pod's inbound side, counted); the same header from an enrolled pod does. A pod with a
/// colour makes all its requests that colour.
#[test]
fn outside_colours_are_stripped_and_pod_colours_apply() {
    if !require_privileged() {
        return;
    }
    let node = node();
    let mut cfg = policy(&node);
    cfg.push_str(&pod_toml(node.pod("client"), "colour = \"gray\""));
    cfg.push_str(&pod_toml(node.pod("entry"), "inbound_ports = [8001]"));
    cfg.push_str(&pod_toml(node.pod("mid"), ""));
    cfg.push_str(&pod_toml(node.pod("leaf"), ""));
    let d = Daemon::start(&node, &basic_config(&node, &cfg)).expect("daemon");
    let _servers = chain(&node, &["entry", "mid"]);
    let entry_base = node.pod("entry").addr(8001);

    // The outsider (not enrolled) calls the entry's base endpoint directly with a gray header.
    let v = load(node.pod("outsider"), &entry_base, 200, "gray");
    assert_eq!(v["errors"], 0, "{v}");
    let a = answers(&v, "gray");
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        [&chain_of("base")],
        "outsider: {a:?}"
    );
    assert!(metric(&d, "sockmesh_colour_stripped_total", &[]) >= 200.0);

    // The gray pod: plain requests, no header, all gray.
    let v = load(node.pod("client"), ENTRY, 300, "base");
    assert_eq!(v["errors"], 0, "{v}");
    let a = answers(&v, "base");
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        [&chain_of("gray")],
        "gray pod: {a:?}"
    );
    assert!(metric(&d, "sockmesh_colour_source_total", &[("source", "pod")]) >= 300.0);
    // Its header still wins over its pod colour.
    let v = load(node.pod("client"), ENTRY, 100, "stress");
    let a = answers(&v, "stress");
    assert!(
        a.keys().all(|k| k.starts_with("503 entry/stress mid/stress")),
        "{a:?}"
    );

    // An enrolled pod's header is believed on the entry's inbound side: the base endpoint
    // receives the colour and forwards it, so the rest of the chain is gray.
    let v = load(node.pod("client"), &entry_base, 100, "gray");
    let a = answers(&v, "gray");
    assert_eq!(
        a.keys().copied().collect::<Vec<_>>(),
        ["200 entry/base mid/gray leaf/gray"],
        "{a:?}"
    );
    let st = d.status().expect("status");
    assert_eq!(
        st["pods"]
            .as_array()
            .map(|p| p.iter().any(|p| p["colour"] == "gray")),
        Some(true),
        "{st}"
    );
    let metrics_text = http_get(d.metrics_addr(), "/metrics").expect("metrics");
    assert!(metrics_text.contains("sockmesh_colour_requests_total{service=\"mid\",colour=\"gray\"}"));
}

/// Bad colour policies are refused naming the field (config and `routes apply`); an unknown pod
/// colour is refused at enrolment; the running policy is untouched.
#[test]
fn bad_colour_input_is_refused_clearly() {
    if !require_privileged() {
        return;
    }
    let node = node();
    let cfg = policy(&node);
    let d = Daemon::start(&node, &basic_config(&node, &cfg)).expect("daemon");
    let dir = sockmesh_tests::TempDir::new("colour-policy").expect("tmp");
    for (bad, field) in [
        (cfg.replace("percent = 30", "percent = 130"), "ingress[1].percent"),
        (
            cfg.replace("colour = \"gray\" }", "colour = \"grey\" }"),
            "labels.colour",
        ),
        (cfg.replace("id = 2", "id = 1"), "colours[1].id"),
    ] {
        let path = dir.join("p.toml");
        std::fs::write(&path, &bad).unwrap();
        let out = d
            .cli_raw(&["routes", "apply", &path.to_string_lossy()])
            .expect("cli");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(field), "{field}: {err}");
    }
    let gen = d.cli(&["routes", "--json"]).expect("routes");
    let v: Value = serde_json::from_slice(&gen.stdout).expect("json");
    assert_eq!(
        v["generation"], 0,
        "a refused policy must not replace the live one"
    );
    let client = node.pod("client");
    let out = d
        .cli_raw(&[
            "enroll",
            "--name",
            "client",
            "--netns",
            &client.netns.to_string_lossy(),
            "--cgroup",
            &client.cgroup.to_string_lossy(),
            "--colour",
            "purple",
        ])
        .expect("cli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown colour `purple`"),
        "{err}"
    );
    // The config file: exit 64 naming the field.
    let bad = basic_config(&node, &cfg.replace("percent = 30", "percent = 130"));
    let path = dir.join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    let out = Command::new(sockmesh_tests::sockmesh_bin())
        .args(["run", "--config", &path.to_string_lossy()])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ingress[1].percent"));
}

/// The middle service forwards no header and calls the leaf over a pool of keep-alive
/// connections shared by its threads. With kernel propagation on (mid enrolled with
/// `propagate = true` and its endpoints captured inbound), every coloured request still reaches
/// the leaf of its colour, and stress is still refused there; with it off, the colour is lost at
/// mid: the gray leaf is never reached and stress escapes to the base leaf. This proves the
/// kernel mechanism, not the header.
#[test]
fn kernel_propagation_carries_colours_through_an_app_that_forwards_nothing() {
    if !require_privileged() {
        return;
    }
    const N: u32 = 1500;
    for propagate in [true, false] {
        let node = node();
        let mut cfg = policy(&node);
        cfg.push_str(&pod_toml(node.pod("client"), ""));
        cfg.push_str(&pod_toml(node.pod("entry"), ""));
        cfg.push_str(&pod_toml(
            node.pod("mid"),
            &format!("inbound_ports = [8001, 8002, 8003]\npropagate = {propagate}"),
        ));
        cfg.push_str(&pod_toml(node.pod("leaf"), ""));
        let d = Daemon::start(&node, &basic_config(&node, &cfg)).expect("daemon");
        let st = d.status().expect("status");
        assert!(
            st.to_string().contains("propagation"),
            "status shows the propagation state: {st}"
        );
        let _servers = chain(&node, &["entry"]);
        let v = load(node.pod("client"), ENTRY, N, "base,gray,stress");
        assert_eq!(v["errors"], 0, "{v}");
        let gray = answers(&v, "gray");
        let stress = answers(&v, "stress");
        let base = answers(&v, "base");
        let total = |m: &BTreeMap<&str, u64>| m.values().sum::<u64>();
        assert_eq!(
            base.keys().copied().collect::<Vec<_>>(),
            [chain_of("base").as_str()],
            "{base:?}"
        );
        let seen = served(&node);
        let leaf_gray: u64 = seen[&("leaf".to_owned(), "gray".to_owned())].values().sum();
        if propagate {
            let right = gray.get(chain_of("gray").as_str()).copied().unwrap_or(0);
            let refused = stress
                .iter()
                .filter(|(k, _)| k.starts_with("503 entry/stress mid/stress") && k.contains("stress"))
                .map(|(_, n)| *n)
                .sum::<u64>();
            eprintln!(
                "propagation on: gray {right}/{} end to end, stress refused at the leaf {refused}/{}",
                total(&gray),
                total(&stress)
            );
            assert_eq!(right, total(&gray), "gray answers: {gray:?}");
            assert_eq!(refused, total(&stress), "stress answers: {stress:?}");
            // The leaf saw gray only on its gray endpoint, and it came from the kernel at mid.
            assert_eq!(leaf_gray, total(&gray), "{seen:?}");
            let kernel = metric(&d, "sockmesh_colour_source_total", &[("source", "kernel")]) as u64;
            assert!(
                kernel >= total(&gray) + total(&stress),
                "kernel-sourced colours: {kernel}"
            );
        } else {
            eprintln!("propagation off: gray answers {gray:?}, stress answers {stress:?}");
            assert_eq!(
                leaf_gray, 0,
                "without propagation the gray leaf must not be reached: {seen:?}"
            );
            assert_eq!(
                gray.keys().copied().collect::<Vec<_>>(),
                ["200 entry/gray mid/gray leaf/base"],
                "{gray:?}"
            );
        }
        // Every endpoint still served only its own colour or none (mid's apps get the colour
        // as a header from their inbound side; the leaf's base endpoint never sees one).
        for ((svc, colour), got) in &seen {
            let own = if colour == "base" { "none" } else { colour.as_str() };
            for (c, n) in got {
                assert!(
                    c == own || c == "none" || *n == 0,
                    "{svc}/{colour} served {n} `{c}`: {got:?}"
                );
            }
        }
    }
}
