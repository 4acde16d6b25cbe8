//! Kubernetes-shaped pod names enrol: dots (bpffs refuses them in pin names, so the pod's
//! `sk_lookup` link is pinned under a sanitised name) and 63 characters. The pod keeps its name
//! in status, and unenrolling removes its pin.

use std::time::Duration;

use sockmesh_tests::{daemon::basic_config, eventually, require_privileged, Daemon, VirtualNode};

fn links(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.pin_dir().join("links"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn dotted_and_63_character_pod_names_enrol_with_inbound_ports() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["a", "b"]).expect("node");
    let d = Daemon::start(&node, &basic_config(&node, "")).expect("daemon");
    let long = format!("{}.{}", "x".repeat(31), "y".repeat(31));
    assert_eq!(long.len(), 63);
    for (pod, name) in [(node.pod("a"), "default.web"), (node.pod("b"), long.as_str())] {
        let (netns, cgroup) = (pod.netns.display().to_string(), pod.cgroup.display().to_string());
        d.cli(&[
            "enroll",
            "--name",
            name,
            "--netns",
            &netns,
            "--cgroup",
            &cgroup,
            "--inbound-port",
            "8080",
        ])
        .unwrap_or_else(|e| panic!("enrol {name}: {e:#}"));
    }
    let st = d.status().unwrap();
    let names: Vec<&str> = st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        names.contains(&"default.web") && names.contains(&long.as_str()),
        "{names:?}"
    );
    let pins = links(&d);
    let lookups: Vec<&String> = pins.iter().filter(|l| l.starts_with("sk_lookup-")).collect();
    assert_eq!(lookups.len(), 2, "{pins:?}");
    assert!(lookups.iter().all(|l| !l.contains('.')), "{pins:?}");
    assert!(
        lookups.iter().any(|l| l.starts_with("sk_lookup-default_web-")),
        "{pins:?}"
    );
    d.unenroll("default.web").unwrap();
    eventually(Duration::from_secs(5), || {
        let n = links(&d)
            .iter()
            .filter(|l| l.starts_with("sk_lookup-default_web-"))
            .count();
        anyhow::ensure!(n == 0, "the unenrolled pod's pin is still there");
        Ok(())
    })
    .unwrap();
}
