//! Kubernetes on a real containerd node (tests/src/k8s.rs): containerd's CRI, runc, the CNI
//! chain `bridge` + `host-local` + `sockmesh-cni` (chained by `sockmesh cni-install`, the
//! DaemonSet's init container), and sockmesh with `[kubernetes]` discovery. The test plays the
//! kubelet over the CRI; there is no API server, and images are imported, not pulled.
//!
//! One test, in the order a node lives through: a pod created while the daemon is down, the
//! daemon's start (that pod enrolled without a restart), an annotated pod with dots in its name
//! enrolled by the CNI plugin during ADD, whose app container starts right after
//! RunPodSandbox and whose very first connection is captured, inbound capture, an unlabelled
//! 63-character pod never captured, a labelled one enrolled (CRI discovery), a rolling update
//! (SIGTERM keeps state; a pod created meanwhile still starts and is enrolled by the next
//! daemon), the node's network agent rewriting the conflist without sockmesh-cni (chained back,
//! and the next pod enrolled at ADD), a deleted pod leaving nothing in the maps, and the
//! uninstall path leaving nothing.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};
use sockmesh_tests::{
    daemon::{prom_value, Daemon},
    eventually,
    k8s::{cni_bin, enrolled, log_field, missing_tools, KPod, KubeNode},
    require_privileged, run_host, sockmesh_bin,
};

/// As a label (CRI discovery) or as an annotation (also reaches sockmesh-cni at ADD).
const MESH: (&str, &str) = ("sockmesh.io/mesh", "enabled");

/// The conflist without sockmesh-cni, written the way a network agent does (rename).
fn rewrite_without_plugin(conflist: &Path) -> Result<()> {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(conflist)?)?;
    v["plugins"]
        .as_array_mut()
        .context("no plugins")?
        .retain(|p| p["type"] != "sockmesh-cni");
    let tmp = conflist.with_extension("agent-tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&v)?)?;
    std::fs::rename(&tmp, conflist)?;
    Ok(())
}

fn status_pod<'a>(st: &'a serde_json::Value, uid: &str) -> Option<&'a serde_json::Value> {
    st["pods"].as_array()?.iter().find(|p| p["name"] == uid)
}

fn connections(d: &Daemon, uid: &str) -> Result<u64> {
    let st = d.status()?;
    Ok(status_pod(&st, uid)
        .and_then(|p| p["connections_total"].as_u64())
        .unwrap_or(0))
}

/// Point the fixed admin socket path the CNI plugin uses at this daemon's socket.
fn link_admin(link: &Path, d: &Daemon) -> Result<()> {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(d.admin_socket(), &tmp)?;
    std::fs::rename(&tmp, link)?;
    Ok(())
}

fn sockmesh(args: &[&str]) -> Result<String> {
    let mut c = Command::new(sockmesh_bin());
    c.args(args);
    let o = run_host(c, Duration::from_secs(60))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    anyhow::ensure!(o.status.success(), "sockmesh {args:?} failed: {text}");
    Ok(text)
}

/// Entries of the pinned SM_PODS map (bpftool).
fn pods_map_entries(pin_dir: &Path) -> Result<usize> {
    let mut c = Command::new("bpftool");
    c.args(["-j", "map", "dump", "pinned"])
        .arg(pin_dir.join("maps/SM_PODS"));
    let o = run_host(c, Duration::from_secs(10))?;
    anyhow::ensure!(
        o.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    Ok(v.as_array().map(Vec::len).unwrap_or(0))
}

fn app(node: &mut KubeNode, pod: &KPod) -> Result<String> {
    node.start_container(pod, "app", &["/bin/busybox", "sleep", "1000"])
}

#[test]
fn kubernetes_node_end_to_end() {
    if !require_privileged() || !have_node_tools("kubernetes_node_end_to_end") {
        return;
    }
    let start = std::time::Instant::now();
    let mut node = KubeNode::start().expect("containerd node");
    let admin_link = node.dir.join("admin.sock");
    let cni_log = node.dir.join("cni.log");

    // The DaemonSet's init container: chain sockmesh-cni into the node's conflist.
    sockmesh(&[
        "cni-install",
        "--plugin",
        &cni_bin().display().to_string(),
        "--bin-dir",
        &node.cni_bin_dir.display().to_string(),
        "--conf-dir",
        &node.cni_conf_dir.display().to_string(),
        "--admin-socket",
        &admin_link.display().to_string(),
        "--log-file",
        &cni_log.display().to_string(),
        "--wait-secs",
        "0",
    ])
    .unwrap();
    let conflist = node.cni_conf_dir.join("10-test.conflist");
    assert!(std::fs::read_to_string(&conflist)
        .unwrap()
        .contains("sockmesh-cni"));

    // An unlabelled server, and a labelled pod created while no daemon runs: it still starts.
    let server = node.run_pod("default", "server", &[], &[]).unwrap();
    let server_c = node
        .start_container(
            &server,
            "httpd",
            &["/bin/busybox", "httpd", "-f", "-v", "-p", "8080", "-h", "/www"],
        )
        .unwrap();
    let pre = node.run_pod("default", "pre.existing", &[MESH], &[]).unwrap();
    app(&mut node, &pre).unwrap();
    let log = std::fs::read_to_string(&cni_log).unwrap_or_default();
    assert!(
        log.contains("daemon not told"),
        "the plugin should have logged the absent daemon:\n{log}"
    );

    // The daemon, inside the pods' kubepods root, discovering from this containerd and guarding
    // the node's conflist.
    let daemon_cg = node.kubepods.join("daemon");
    std::fs::create_dir_all(&daemon_cg).unwrap();
    let config = format!(
        "cgroup_root = {:?}\n[kubernetes]\ncri_socket = {:?}\nresync_secs = 2\ncni_conf_dir = {:?}\ncni_check_ms = 200\n",
        node.kubepods.display().to_string(),
        node.socket.display().to_string(),
        node.cni_conf_dir.display().to_string(),
    );
    let mut d = Daemon::start_in(&daemon_cg, &config).expect("sockmesh with [kubernetes]");
    link_admin(&admin_link, &d).unwrap();
    eventually(Duration::from_secs(10), || {
        anyhow::ensure!(
            enrolled(&d.status()?).contains(&pre.uid),
            "pre-existing pod not enrolled yet"
        );
        Ok(())
    })
    .expect("a pod created before the daemon is enrolled without a restart");
    let http = format!("http://{}:8080/", server.ip);

    // An opted-in pod with dots in its name (label and annotation, as a pod template would
    // carry both): the plugin gets the annotation at ADD and the daemon enrols the pod before
    // ADD returns. The app container starts right after RunPodSandbox, as a kubelet with the
    // image in place does, and its very first act is a connection.
    let web = node
        .run_pod(
            "default",
            "web.v1.default",
            &[MESH],
            &[MESH, ("sockmesh.io/inbound-ports", "8080")],
        )
        .unwrap();
    let first = format!("/bin/busybox httpd -p 8080 -h /www; /bin/busybox wget -q -O - {http}; echo first=$?; exec /bin/busybox sleep 1000");
    let web_c = node
        .start_container(&web, "app", &["/bin/sh", "-c", &first])
        .unwrap();
    let container_started_ms = web.created.elapsed().as_millis();
    eventually(Duration::from_secs(10), || {
        let l = node.container_log(&web, "app");
        anyhow::ensure!(l.contains("first="), "no first connection yet: {l}");
        anyhow::ensure!(
            l.contains("first=0") && l.contains("hello from a CRI pod"),
            "first connection failed: {l}"
        );
        Ok(())
    })
    .unwrap();
    // That first connection went through the proxy: the pod's own counter (status and
    // /metrics), before anything else has connected to or from the pod.
    assert!(
        connections(&d, &web.uid).unwrap() >= 1,
        "the opted-in pod's first connection was not captured (status: {})",
        d.status().unwrap()
    );
    let m = d.metrics().unwrap();
    // OpenMetrics text from the prometheus-client encoder: `# EOF` closes it.
    assert!(m.ends_with("# EOF\n"), "{m}");
    assert!(
        prom_value(&m, "sockmesh_connections_total", &[("pod", &web.uid)]).unwrap_or(0.0) >= 1.0,
        "no proxied connection of {} in /metrics:\n{m}",
        web.uid
    );
    assert!(
        prom_value(&m, "sockmesh_k8s_cni_add_total", &[("result", "enrolled")]).unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    // Enrolled by the plugin's ADD, not by discovery afterwards; the time from the
    // RunPodSandbox call to the enrolment, from the daemon's log line.
    let dlog = d.log();
    let at_ms = log_field(&dlog, &web.uid, "enrolled at CNI ADD", "unix_ms").unwrap_or_else(|| {
        panic!(
            "{} was not enrolled at CNI ADD:\n{dlog}\nplugin log:\n{}",
            web.uid,
            std::fs::read_to_string(&cni_log).unwrap_or_default()
        )
    });
    let enrol_ms = log_field(&dlog, &web.uid, "enrolled at CNI ADD", "enrol_ms").unwrap_or_default();
    eprintln!(
        "K8S-TIMING: RunPodSandbox called -> enrolled (during CNI ADD): {} ms (enrolment itself {enrol_ms} ms); RunPodSandbox called -> app container started: {container_started_ms} ms",
        at_ms.saturating_sub(web.created_unix_ms)
    );
    // The server saw the pod's own IP (the proxy connects from inside the pod's netns).
    let slog = node.container_log(&server, "httpd");
    assert!(
        slog.contains(&web.ip),
        "server log lacks the pod IP {}:\n{slog}",
        web.ip
    );

    // Inbound: from the server pod to the labelled pod's meshed port.
    let before = connections(&d, &web.uid).unwrap();
    let (rc, out) = node
        .exec(
            &server_c,
            &[
                "/bin/busybox",
                "wget",
                "-q",
                "-O",
                "-",
                &format!("http://{}:8080/", web.ip),
            ],
        )
        .unwrap();
    assert_eq!(rc, 0, "inbound request failed: {out}");
    eventually(Duration::from_secs(5), || {
        anyhow::ensure!(
            connections(&d, &web.uid)? > before,
            "inbound connection not captured"
        );
        Ok(())
    })
    .unwrap();

    // 63-character names: unlabelled is never captured, labelled is enrolled.
    let long_plain = node.run_pod("default", &"p".repeat(63), &[], &[]).unwrap();
    let plain_c = app(&mut node, &long_plain).unwrap();
    let long_mesh = node.run_pod("default", &"m".repeat(63), &[MESH], &[]).unwrap();
    app(&mut node, &long_mesh).unwrap();
    eventually(Duration::from_secs(10), || {
        anyhow::ensure!(
            enrolled(&d.status()?).contains(&long_mesh.uid),
            "63-character pod not enrolled"
        );
        Ok(())
    })
    .unwrap();
    let (rc, out) = node
        .exec(&plain_c, &["/bin/busybox", "wget", "-q", "-O", "-", &http])
        .unwrap();
    assert_eq!(rc, 0, "unlabelled pod's request failed: {out}");
    std::thread::sleep(Duration::from_secs(3)); // more than a resync
    let st = d.status().unwrap();
    assert!(
        !enrolled(&st).contains(&long_plain.uid),
        "an unlabelled pod was enrolled: {st}"
    );

    // Rolling update: SIGTERM keeps capture and state; a pod created meanwhile still starts.
    let status_code = d.stop();
    assert!(
        status_code.is_some_and(|s| s.success()),
        "SIGTERM exit: {status_code:?}"
    );
    let state = d.hand_over_state().unwrap();
    assert!(
        state.0.join("links").read_dir().unwrap().next().is_some(),
        "SIGTERM removed the pinned links"
    );
    let during = node.run_pod("default", "during.update", &[MESH], &[]).unwrap();
    app(&mut node, &during).unwrap();
    let d2 = Daemon::start_with_state(&daemon_cg, &config, Some(state)).expect("the next daemon pod");
    link_admin(&admin_link, &d2).unwrap();
    eventually(Duration::from_secs(10), || {
        let e = enrolled(&d2.status()?);
        for p in [&pre, &web, &long_mesh, &during] {
            anyhow::ensure!(
                e.contains(&p.uid),
                "{}/{} not enrolled after the update: {e:?}",
                p.namespace,
                p.name
            );
        }
        anyhow::ensure!(
            !e.contains(&long_plain.uid),
            "unlabelled pod enrolled after the update"
        );
        Ok(())
    })
    .unwrap();
    let (rc, out) = node
        .exec(&web_c, &["/bin/busybox", "wget", "-q", "-O", "-", &http])
        .unwrap();
    assert_eq!(rc, 0, "request after the update failed: {out}");
    assert!(
        connections(&d2, &web.uid).unwrap() >= 1,
        "capture lost across the rolling update"
    );

    // The node's network agent rewrites its conflist without sockmesh-cni: the agent chains it
    // back (bounded: cni_check_ms is 200 here), counts it, and the next pod is still enrolled
    // by the plugin during ADD.
    rewrite_without_plugin(&conflist).unwrap();
    // The file is rewritten before the counter and the log line: wait for all three.
    eventually(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&conflist)?;
        anyhow::ensure!(text.contains("sockmesh-cni"), "not chained back yet: {text}");
        let m = d2.metrics()?;
        anyhow::ensure!(
            prom_value(&m, "sockmesh_k8s_cni_rechained_total", &[]).unwrap_or(0.0) >= 1.0,
            "chained back but not counted: {m}"
        );
        anyhow::ensure!(
            d2.log().contains("chained it back"),
            "the re-chain was not logged"
        );
        Ok(())
    })
    .expect("sockmesh-cni chained back into the rewritten conflist, counted and logged");
    let after = node.run_pod("default", "after.rewrite", &[], &[MESH]).unwrap();
    assert!(
        enrolled(&d2.status().unwrap()).contains(&after.uid),
        "a pod created after the rewrite was not enrolled during its CNI ADD"
    );

    // A deleted pod is unenrolled and leaves nothing in the maps.
    node.remove_pod(&web).unwrap();
    eventually(Duration::from_secs(10), || {
        let e = enrolled(&d2.status()?);
        anyhow::ensure!(!e.contains(&web.uid), "deleted pod still enrolled");
        let entries = pods_map_entries(d2.pin_dir())?;
        anyhow::ensure!(
            entries == e.len(),
            "SM_PODS has {entries} entries for {} pods",
            e.len()
        );
        Ok(())
    })
    .unwrap();

    // Uninstall: the DaemonSet is gone (the daemon is told to stop by uninstall itself).
    let pin_dir = d2.pin_dir().to_path_buf();
    let out = sockmesh(&[
        "uninstall",
        "--cni-conf-dir",
        &node.cni_conf_dir.display().to_string(),
        "--cni-bin-dir",
        &node.cni_bin_dir.display().to_string(),
        "--pin-dir",
        &pin_dir.display().to_string(),
        "--state-file",
        &d2.state_file().display().to_string(),
        "--admin-socket",
        &d2.admin_socket().display().to_string(),
    ])
    .context("sockmesh uninstall")
    .unwrap();
    assert!(!pin_dir.exists(), "pins left after uninstall: {out}");
    assert!(
        !std::fs::read_to_string(&conflist)
            .unwrap()
            .contains("sockmesh-cni"),
        "{out}"
    );
    assert!(!node.cni_bin_dir.join("sockmesh-cni").exists(), "{out}");
    // Pods keep networking without sockmesh.
    let (rc, out) = node
        .exec(&plain_c, &["/bin/busybox", "wget", "-q", "-O", "-", &http])
        .unwrap();
    assert_eq!(rc, 0, "request after uninstall failed: {out}");
    eprintln!("K8S-E2E: {:.1}s", start.elapsed().as_secs_f64());
}

/// The rendered manifests (`kubectl kustomize deploy/kubernetes`) as JSON objects, through the
/// manifests checker's venv (PyYAML).
fn rendered() -> Result<Vec<serde_json::Value>> {
    let root = sockmesh_tests::workspace_root();
    let mut k = Command::new("kubectl");
    k.arg("kustomize").arg(root.join("deploy/kubernetes"));
    let o = run_host(k, Duration::from_secs(30))?;
    anyhow::ensure!(
        o.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let yaml = root.join("target/k8s-e2e/rendered.yaml");
    std::fs::create_dir_all(yaml.parent().expect("a dir"))?;
    std::fs::write(&yaml, &o.stdout)?;
    let mut p = Command::new(root.join("target/k8s-venv/bin/python"));
    p.arg("-c")
        .arg("import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))")
        .arg(&yaml);
    let o = run_host(p, Duration::from_secs(30))?;
    anyhow::ensure!(
        o.status.success(),
        "yaml to json: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(serde_json::from_slice(&o.stdout)?)
}

/// Removes the agent's pinned state and state file however the test ends.
struct UninstallOnDrop(Vec<String>);

impl Drop for UninstallOnDrop {
    fn drop(&mut self) {
        let mut c = Command::new(sockmesh_bin());
        c.arg("uninstall").args(&self.0);
        let _ = run_host(c, Duration::from_secs(60));
    }
}

/// The DaemonSet's own pod template runs the agent: its image (`cargo xtask image`), its init
/// container chaining the plugin, its command, capabilities and mounts, and a rolling update in
/// the surge order (the new pod takes over before the old one is deleted). Only node paths are
/// swapped for the test's (hostPath volumes, the plugin's admin socket path) and the ConfigMap
/// gets the test's cgroup root, pin dir and metrics port, as a kustomize overlay would.
#[test]
fn daemonset_pod_template_runs_the_agent() {
    if !require_privileged() {
        return;
    }
    let root = sockmesh_tests::workspace_root();
    let archive = std::env::var_os("SOCKMESH_IMAGE_ARCHIVE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target/image/sockmesh-image.tar"));
    let missing = missing_tools()
        .or_else(|| (!archive.exists()).then(|| format!("{} (`cargo xtask image`)", archive.display())))
        .or_else(|| {
            (!root.join("target/k8s-venv/bin/python").exists()).then(|| "target/k8s-venv".to_string())
        });
    if let Some(m) = missing {
        let msg = format!("SKIPPED (needs {m}): daemonset_pod_template_runs_the_agent");
        assert!(std::env::var_os("SOCKMESH_REQUIRE_PRIVILEGED").is_none(), "{msg}");
        eprintln!("\n{msg}\n");
        return;
    }
    let objects = rendered().unwrap();
    let ds = objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("a DaemonSet")
        .clone();
    let cm = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    let mut node = KubeNode::start().expect("containerd node");
    node.ctr(&["images", "import", &archive.display().to_string()])
        .unwrap();

    let run_dir = node.dir.join("run-sockmesh");
    std::fs::create_dir_all(&run_dir).unwrap();
    let host_admin = run_dir.join("admin.sock");
    let pin_dir = format!("/sys/fs/bpf/sockmesh-k8s-test-{}", std::process::id());
    let _cleanup = UninstallOnDrop(vec![
        "--pin-dir".into(),
        pin_dir.clone(),
        "--state-file".into(),
        run_dir.join("state.json").display().to_string(),
        "--admin-socket".into(),
        host_admin.display().to_string(),
    ]);
    // The ConfigMap with the test's node paths.
    let metrics_port = sockmesh_tests::util::free_tcp_port().unwrap();
    let toml: String = cm["data"]["sockmesh.toml"]
        .as_str()
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("cgroup_root") {
                format!("cgroup_root = {:?}", node.kubepods.display().to_string())
            } else if l.starts_with("pin_dir") {
                format!("pin_dir = {pin_dir:?}")
            } else if l.starts_with("metrics_addr") {
                format!("metrics_addr = \"127.0.0.1:{metrics_port}\"")
            } else if l.starts_with("resync_secs") {
                "resync_secs = 2".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let cm_dir = node.dir.join("configmap");
    std::fs::create_dir_all(&cm_dir).unwrap();
    std::fs::write(cm_dir.join("sockmesh.toml"), toml).unwrap();
    let mut template = ds["spec"]["template"].clone();
    // The plugin runs on the host: it dials the host side of the /run/sockmesh volume.
    for a in template["spec"]["initContainers"][0]["args"]
        .as_array_mut()
        .unwrap()
    {
        if a.as_str().is_some_and(|s| s.starts_with("--admin-socket=")) {
            *a = serde_json::json!(format!("--admin-socket={}", host_admin.display()));
        }
    }
    let (socket, bin, conf) = (
        node.socket.clone(),
        node.cni_bin_dir.clone(),
        node.cni_conf_dir.clone(),
    );
    let run = run_dir.clone();
    let host = move |p: &str| -> std::path::PathBuf {
        match p {
            "/run/sockmesh" => run.clone(),
            "/run/containerd/containerd.sock" => socket.clone(),
            "/opt/cni/bin" => bin.clone(),
            "/etc/cni/net.d" => conf.clone(),
            other => other.into(),
        }
    };
    let status = |admin: &Path| -> Result<serde_json::Value> {
        let out = sockmesh(&["status", "--json", "--admin-socket", &admin.display().to_string()])?;
        Ok(serde_json::from_str(out.trim())?)
    };

    let (agent, ids) = node
        .run_template("sockmesh-system", "sockmesh-abcde", &template, &host, &cm_dir)
        .expect("the DaemonSet's pod template");
    assert!(
        std::fs::read_to_string(node.cni_conf_dir.join("10-test.conflist"))
            .unwrap()
            .contains("sockmesh-cni")
    );
    eventually(Duration::from_secs(15), || {
        let r = sockmesh_tests::daemon::http_get(format!("127.0.0.1:{metrics_port}").parse()?, "/ready")?;
        anyhow::ensure!(r.contains("ready"), "not ready: {r}");
        Ok(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "agent not ready: {e:#}\n{}",
            node.container_log(&agent, "sockmesh")
        )
    });

    // It is the pod's process: its cgroup is the agent pod's.
    let st = status(&host_admin).unwrap();
    let own = st["kernel"]["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["check"] == "daemon cgroup"))
        .map(|c| c["result"].to_string())
        .unwrap_or_default();
    assert!(
        own.contains(&format!("pod{}", agent.uid)),
        "the agent runs in {own}, not in its pod"
    );

    // A labelled pod's first connection, captured by the agent pod.
    let server = node.run_pod("default", "server", &[], &[]).unwrap();
    node.start_container(
        &server,
        "httpd",
        &["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"],
    )
    .unwrap();
    let http = format!("http://{}:8080/", server.ip);
    // As above: opted in by annotation, enrolled during CNI ADD; the container starts at once.
    let web = node
        .run_pod("default", "web.from.template", &[MESH], &[MESH])
        .unwrap();
    let first = format!("/bin/busybox wget -q -O - {http}; echo first=$?; exec /bin/busybox sleep 1000");
    let web_c = node
        .start_container(&web, "app", &["/bin/sh", "-c", &first])
        .unwrap();
    eventually(Duration::from_secs(10), || {
        let l = node.container_log(&web, "app");
        anyhow::ensure!(l.contains("first=0"), "no first connection yet: {l}");
        Ok(())
    })
    .unwrap();
    let captured = |admin: &Path| -> u64 {
        status(admin)
            .ok()
            .and_then(|st| status_pod(&st, &web.uid).and_then(|p| p["connections_total"].as_u64()))
            .unwrap_or(0)
    };
    assert!(
        captured(&host_admin) >= 1,
        "first connection not captured by the agent pod: {}",
        status(&host_admin).unwrap()
    );

    // Rolling update, surge order (maxSurge 1, maxUnavailable 0): the new pod starts while the
    // old one runs, its agent takes the node over (`run --take-over`) and its readiness probe
    // (the template's own) passes; the old agent's fails, and the controller deletes its pod:
    // the kubelet's SIGTERM (grace period from the template).
    let ready: Vec<String> = template["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
        .as_array()
        .expect("an exec readiness probe")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let ready: Vec<&str> = ready.iter().map(String::as_str).collect();
    let (agent2, ids2) = node
        .run_template("sockmesh-system", "sockmesh-fghij", &template, &host, &cm_dir)
        .expect("the updated agent pod");
    eventually(Duration::from_secs(30), || {
        let (rc, out) = node.exec(&ids2["sockmesh"], &ready)?;
        anyhow::ensure!(rc == 0, "the new agent is not ready: {out}");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", node.container_log(&agent2, "sockmesh")));
    let (rc, out) = node.exec(&ids["sockmesh"], &ready).unwrap();
    assert!(
        rc != 0 && out.contains("handed over"),
        "the old agent's probe: {rc} {out}"
    );
    assert_eq!(status(&host_admin).unwrap()["generation"], 2);
    let grace = template["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap();
    node.stop_container(&ids["sockmesh"], grace).unwrap();
    assert_eq!(node.exit_code(&ids["sockmesh"]).unwrap(), 0);
    assert!(
        Path::new(&pin_dir)
            .join("links")
            .read_dir()
            .unwrap()
            .next()
            .is_some(),
        "SIGTERM removed the pins"
    );
    node.remove_pod(&agent).unwrap();
    eventually(Duration::from_secs(15), || {
        anyhow::ensure!(
            enrolled(&status(&host_admin)?).contains(&web.uid),
            "not re-adopted yet"
        );
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", node.container_log(&agent2, "sockmesh")));
    let (rc, out) = node
        .exec(&web_c, &["/bin/busybox", "wget", "-q", "-O", "-", &http])
        .unwrap();
    assert_eq!(rc, 0, "{out}");
    assert!(
        captured(&host_admin) >= 1,
        "capture lost across the rolling update"
    );

    // Uninstall: delete the DaemonSet (its pod), then the node's uninstall path.
    node.remove_pod(&agent2).unwrap();
    sockmesh(&[
        "uninstall",
        "--cni-conf-dir",
        &node.cni_conf_dir.display().to_string(),
        "--cni-bin-dir",
        &node.cni_bin_dir.display().to_string(),
        "--pin-dir",
        &pin_dir,
        "--state-file",
        &run_dir.join("state.json").display().to_string(),
        "--admin-socket",
        &host_admin.display().to_string(),
    ])
    .unwrap();
    assert!(!Path::new(&pin_dir).exists());
    assert!(
        !std::fs::read_to_string(node.cni_conf_dir.join("10-test.conflist"))
            .unwrap()
            .contains("sockmesh-cni")
    );
    assert!(!node.cni_bin_dir.join("sockmesh-cni").exists());
}

/// Whether containerd and friends are here; says loudly when not (and fails under
/// `SOCKMESH_REQUIRE_PRIVILEGED`, as in CI).
fn have_node_tools(test: &str) -> bool {
    match missing_tools() {
        None => true,
        Some(m) => {
            let msg = format!("SKIPPED (needs {m}; `cargo xtask bootstrap --for test`): {test}");
            assert!(std::env::var_os("SOCKMESH_REQUIRE_PRIVILEGED").is_none(), "{msg}");
            eprintln!("\n{msg}\n");
            false
        }
    }
}

/// The CFS quota the kernel holds for a container (cgroup v1 `cpu`, where runc put it with
/// the cgroupfs driver), or `None` when there is no such directory.
fn container_quota(node: &KubeNode, pod: &KPod, id: &str) -> Option<i64> {
    let dir = Path::new("/sys/fs/cgroup/cpu")
        .join(node.kubepods_rel.trim_start_matches('/'))
        .join(format!("besteffort/pod{}", pod.uid))
        .join(id);
    std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Dual links on a Kubernetes node: a pod's `sockmesh.io/links` annotation names which of its
/// containers run which link's app. The daemon finds the containers' cgroups from the CRI as
/// they start (no resync wait), gives each its link's resources now (keep-alive: a 1.5 % CPU
/// cap), and `sockmesh switch` moves the caps between the containers. A bad annotation is
/// refused and counted; the pod is still meshed.
#[test]
fn linked_containers_get_their_links_resources() {
    if !require_privileged() || !have_node_tools("linked_containers_get_their_links_resources") {
        return;
    }
    let mut node = KubeNode::start().expect("containerd node");
    let daemon_cg = node.kubepods.join("daemon");
    std::fs::create_dir_all(&daemon_cg).unwrap();
    // Top-level keys first (TOML), then the policy's tables, then [kubernetes]. A resync far
    // longer than the test: the containers are found by the links' own poll.
    let mut config = format!("cgroup_root = {:?}\n", node.kubepods.display().to_string());
    for (name, vip, initial) in [
        ("trade", "10.96.3.1:80", "active"),
        ("forest", "10.96.3.2:80", "keepalive"),
    ] {
        config.push_str(&format!(
            "[[services]]\nname = \"{name}\"\naddresses = [\"{vip}\"]\nendpoints = [{{ address = \"10.244.0.1:80\" }}]\n\
             [[links]]\nname = \"{name}\"\nservices = [\"{name}\"]\ninitial = \"{initial}\"\n\
             keepalive = {{ cpu_percent = 1.5, weight = 1 }}\n"
        ));
    }
    config.push_str(&format!(
        "[kubernetes]\ncri_socket = {:?}\nresync_secs = 600\n",
        node.socket.display().to_string(),
    ));
    // The pods exist before the daemon (no CNI plugin here: discovery's first pass enrols
    // them); their containers start after it, as a kubelet starts them after the sandbox.
    let pod = node
        .run_pod(
            "default",
            "dual.v1",
            &[MESH],
            &[("sockmesh.io/links", "trade=trade-app,forest=forest-app")],
        )
        .unwrap();
    let bad = node
        .run_pod("default", "bad.links", &[MESH], &[("sockmesh.io/links", "trade")])
        .unwrap();
    let d = Daemon::start_in(&daemon_cg, &config).expect("sockmesh with [kubernetes] and links");
    eventually(Duration::from_secs(10), || {
        let e = enrolled(&d.status()?);
        anyhow::ensure!(
            e.contains(&pod.uid) && e.contains(&bad.uid),
            "pods not enrolled: {e:?}"
        );
        Ok(())
    })
    .expect("the linked pods enrolled");
    let sleep = ["/bin/busybox", "sleep", "1000"];
    let trade = node.start_container(&pod, "trade-app", &sleep).unwrap();
    let forest = node.start_container(&pod, "forest-app", &sleep).unwrap();
    let started = std::time::Instant::now();
    eventually(Duration::from_secs(10), || {
        let q = container_quota(&node, &pod, &forest);
        anyhow::ensure!(
            q == Some(1500),
            "forest-app's quota is {q:?}, not the keep-alive 1500"
        );
        Ok(())
    })
    .expect("the keep-alive container capped");
    eprintln!(
        "K8S-LINKS: containers started -> keep-alive cap applied within {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(
        container_quota(&node, &pod, &trade),
        Some(-1),
        "the active container is unlimited"
    );
    let m = d.metrics().unwrap();
    assert_eq!(
        prom_value(
            &m,
            "sockmesh_link_cpu_limit_cpus",
            &[("link", "forest"), ("pod", &pod.uid)]
        ),
        Some(0.015),
        "{m}"
    );
    assert!(
        prom_value(&m, "sockmesh_k8s_link_cgroups_total", &[("result", "registered")]).unwrap_or(0.0) >= 1.0
    );

    // The switch moves the caps: forest's container unlimited first, then trade's capped.
    let out = d
        .cli(&["switch", "--to", "forest", "--over", "0"])
        .expect("switch");
    eventually(Duration::from_secs(5), || {
        anyhow::ensure!(
            container_quota(&node, &pod, &forest) == Some(-1),
            "forest still capped"
        );
        anyhow::ensure!(
            container_quota(&node, &pod, &trade) == Some(1500),
            "trade not capped"
        );
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", String::from_utf8_lossy(&out.stdout)));

    // The bad annotation: counted and logged; that pod is meshed without links.
    let m = d.metrics().unwrap();
    assert!(
        prom_value(&m, "sockmesh_k8s_link_cgroups_total", &[("result", "refused")]).unwrap_or(0.0) >= 1.0,
        "refusal not counted: {m}"
    );
    assert!(
        d.log().contains("is not link=container"),
        "the refusal was not logged"
    );
}
