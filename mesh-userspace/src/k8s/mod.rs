//! Kubernetes discovery: the node's pods from the CRI, enrolled by pod UID.
//!
//! At start, on every `sockmesh-cni` notice and every `resync_secs`, discovery lists the
//! runtime's sandboxes, reads each new one's labels, annotations, netns and cgroup (verbose
//! `PodSandboxStatus`), enrols the ready pods that match the selector (default label
//! `sockmesh.io/mesh=enabled`) and unenrols the pods it enrolled that are gone or stopped.
//! Pods that existed before the daemon are enrolled the same way, without a restart.
//!
//! A pod is enrolled under its UID (Kubernetes names hold dots and may be 253 characters; the
//! UID is what stays unique), and discovery owns exactly the enrolled pods whose name is a UID.
//! Pod settings come from annotations: `sockmesh.io/inbound-ports: "8080,9090"` and
//! `sockmesh.io/colour: gray`.
//!
//! Timing: CNI ADD runs inside `RunPodSandbox`, before the runtime lists the sandbox, so a
//! `cni_add` notice makes discovery poll the runtime every 20 ms (for at most 10 s) until the
//! sandbox shows up, and enrol it then: before the kubelet has created the app's containers.

pub mod cri;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{cni::Notice, config::PodSpec, daemon::Daemon};

pub const DEFAULT_CRI_SOCKET: &str = "/run/containerd/containerd.sock";
pub const DEFAULT_SELECTOR: &str = "sockmesh.io/mesh=enabled";
pub const ANNOTATION_INBOUND_PORTS: &str = "sockmesh.io/inbound-ports";
pub const ANNOTATION_COLOUR: &str = "sockmesh.io/colour";
/// How long a `cni_add` makes discovery wait for the runtime to list the new sandbox.
const NEW_SANDBOX_WAIT: Duration = Duration::from_secs(10);
const NEW_SANDBOX_POLL: Duration = Duration::from_millis(5);

/// `[kubernetes]` in the node config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    pub cri_socket: PathBuf,
    /// `key=value`: a pod is meshed when its label `key` (or, failing that, its annotation)
    /// equals `value`.
    pub selector: (String, String),
    pub resync_secs: u64,
    /// SIGTERM (a rolling update) keeps capture and state for the next pod, like
    /// `sockmesh stop --keep-state`; only `sockmesh uninstall` removes them.
    pub sigterm_keeps_state: bool,
}

pub fn parse_selector(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not key=value"))?;
    let ok = |x: &str| {
        !x.is_empty()
            && x.len() <= 253
            && x.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    };
    if !ok(k) || !(v.is_empty() || ok(v)) {
        return Err(format!("`{s}` is not a Kubernetes label key=value"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// The notice channel of the running discovery, for the admin API.
static NOTICES: OnceLock<mpsc::Sender<Notice>> = OnceLock::new();

/// Hand a `sockmesh-cni` notice to discovery (admin API). Never blocks.
pub fn notify(n: Notice) -> Result<(), String> {
    let tx = NOTICES
        .get()
        .ok_or("kubernetes discovery is off (no [kubernetes] in the config)")?;
    tx.try_send(n).map_err(|e| format!("discovery is busy: {e}"))
}

/// A pod UID as Kubernetes writes it (UUID) or a static pod's hash: the names discovery owns.
pub fn is_pod_uid(s: &str) -> bool {
    let uuid = s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    let hash = s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    uuid || hash
}

/// Whether the selector picks this pod: its label, or its annotation when it has no such label.
pub fn selected(sel: &(String, String), sb: &cri::Sandbox) -> bool {
    match sb.labels.get(&sel.0).or_else(|| sb.annotations.get(&sel.0)) {
        Some(v) => *v == sel.1,
        None => false,
    }
}

/// The cgroup v2 directory of a pod from the CRI's `cgroup_parent`: a cgroupfs path
/// (`/kubepods/besteffort/pod<uid>`) as is, a systemd slice (`kubepods-besteffort-pod<u_i_d>.slice`)
/// expanded the way systemd nests slices (`kubepods.slice/kubepods-besteffort.slice/...`).
pub fn cgroup_dir(mount: &Path, parent: &str) -> PathBuf {
    let rel = parent.trim_start_matches('/');
    if rel.contains('/') || !rel.ends_with(".slice") {
        return mount.join(rel);
    }
    let unit = rel.trim_end_matches(".slice");
    let mut path = mount.to_path_buf();
    let mut prefix = String::new();
    for part in unit.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    path
}

/// Look for a pod's cgroup under the attach root when the runtime did not say: cgroupfs
/// `pod<uid>` and systemd `kubepods-<qos>-pod<u_i_d>.slice`, at most two levels down.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let names = [format!("pod{uid}"), format!("pod{}.slice", uid.replace('-', "_"))];
    let matches = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| names.iter().any(|x| n == x || n.ends_with(&format!("-{x}"))))
    };
    let mut level = vec![root.to_path_buf()];
    for _ in 0..3 {
        let mut next = Vec::new();
        for dir in &level {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if matches(&p) {
                    return Some(p);
                }
                next.push(p);
            }
        }
        level = next;
    }
    None
}

/// The runtime's netns path as this process can open it (a scratch image has no `/var/run`).
fn netns_path(p: &str) -> PathBuf {
    match p.strip_prefix("/var/run/") {
        Some(rest) if !Path::new("/var/run").exists() => Path::new("/run").join(rest),
        _ => PathBuf::from(p),
    }
}

/// The enrolment a selected sandbox asks for, or why it cannot be enrolled.
pub fn pod_spec(
    sb: &cri::Sandbox,
    mount: &Path,
    root: &Path,
    outbound_port: u16,
    netns_hint: Option<&str>,
) -> Result<PodSpec, String> {
    if !is_pod_uid(&sb.uid) {
        return Err(format!("pod UID `{}` is not a UID", sb.uid));
    }
    let netns = netns_hint
        .or(sb.netns.as_deref())
        .ok_or("the runtime reports no network namespace (hostNetwork pod?)")?;
    let cgroup = match &sb.cgroup_parent {
        Some(p) => cgroup_dir(mount, p),
        None => find_pod_cgroup(root, &sb.uid).ok_or("no cgroup found for the pod")?,
    };
    let ports: Vec<u32> = match sb.annotations.get(ANNOTATION_INBOUND_PORTS) {
        None => vec![],
        Some(s) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<u32>()
                    .map_err(|_| format!("{ANNOTATION_INBOUND_PORTS}: `{p}` is not a port"))
            })
            .collect::<Result<_, _>>()?,
    };
    let inbound_ports = crate::config::check_inbound_ports(&ports, outbound_port)
        .map_err(|e| format!("{ANNOTATION_INBOUND_PORTS}: {e}"))?;
    Ok(PodSpec {
        name: sb.uid.clone(),
        netns: netns_path(netns),
        cgroup,
        external_proxy: false,
        capture: true,
        inbound_ports,
        inbound_all_ports: false,
        inbound_exclude_ports: vec![],
        colour: sb.annotations.get(ANNOTATION_COLOUR).cloned(),
        propagate: false,
        // Dual links' cgroups are not discovered from the CRI (yet): enrol them by hand.
        links: Default::default(),
    })
}

/// What discovery decided about one sandbox (sandboxes never change labels or annotations).
#[derive(Debug, Clone)]
enum Decision {
    /// Not selected, host network, or refused: leave it alone.
    Skip,
    Enrol(Box<PodSpec>, String),
}

struct Discovery {
    daemon: Arc<Daemon>,
    cfg: KubernetesConfig,
    mount: PathBuf,
    root: PathBuf,
    cri: Option<cri::Cri>,
    decided: BTreeMap<String, Decision>,
    /// netns paths the CNI plugin reported, by sandbox id.
    netns_hints: BTreeMap<String, String>,
}

/// Start discovery on the daemon's runtime: the first reconcile runs before this returns, so
/// pods that existed before the daemon are enrolled before it reports ready.
pub async fn start(daemon: Arc<Daemon>, cfg: KubernetesConfig, mount: PathBuf, root: PathBuf) {
    let (tx, rx) = mpsc::channel(1024);
    if NOTICES.set(tx).is_err() {
        warn!("kubernetes discovery already started");
        return;
    }
    let mut d = Discovery {
        daemon,
        cfg,
        mount,
        root,
        cri: None,
        decided: BTreeMap::new(),
        netns_hints: BTreeMap::new(),
    };
    if let Err(e) = d.reconcile().await {
        warn!(cri = %d.cfg.cri_socket.display(), "first CRI discovery failed (retrying every {}s): {e:#}", d.cfg.resync_secs);
    }
    tokio::spawn(d.run(rx));
}

impl Discovery {
    async fn run(mut self, mut rx: mpsc::Receiver<Notice>) {
        let resync = Duration::from_secs(self.cfg.resync_secs.max(1));
        loop {
            let notice = tokio::time::timeout(resync, rx.recv()).await;
            let r = match notice {
                Ok(None) => return,
                Ok(Some(n)) => self.on_notice(n).await,
                Err(_) => self.reconcile().await.map(|_| ()),
            };
            if let Err(e) = r {
                warn!("CRI discovery: {e:#}");
                // Reconnect on the next pass.
                self.cri = None;
            }
        }
    }

    async fn on_notice(&mut self, n: Notice) -> anyhow::Result<()> {
        match n {
            Notice::CniAdd {
                sandbox_id, netns, ..
            } => {
                self.netns_hints.insert(sandbox_id.clone(), netns);
                let deadline = Instant::now() + NEW_SANDBOX_WAIT;
                loop {
                    if self.reconcile().await?.contains(&sandbox_id) {
                        return Ok(());
                    }
                    if Instant::now() >= deadline {
                        warn!(sandbox = %sandbox_id, "the runtime did not list the new sandbox within 10s; the next resync will");
                        return Ok(());
                    }
                    tokio::time::sleep(NEW_SANDBOX_POLL).await;
                }
            }
            Notice::CniDel { sandbox_id, uid } => {
                self.netns_hints.remove(&sandbox_id);
                if let Some(uid) = uid.filter(|u| is_pod_uid(u)) {
                    if self.daemon.pod_names().contains(&uid) {
                        match self.daemon.unenroll(&uid).await {
                            Ok(()) => info!(uid = %uid, sandbox = %sandbox_id, "unenrolled (CNI DEL)"),
                            Err(e) => warn!(uid = %uid, "unenrol on CNI DEL failed: {e}"),
                        }
                    }
                }
                self.reconcile().await.map(|_| ())
            }
        }
    }

    /// One pass; returns the ids of the sandboxes the runtime listed.
    async fn reconcile(&mut self) -> anyhow::Result<BTreeSet<String>> {
        if self.cri.is_none() {
            self.cri = Some(cri::Cri::connect(&self.cfg.cri_socket).await?);
        }
        let cri = self.cri.as_mut().expect("connected above");
        let items = cri.list().await?;
        let listed: BTreeSet<String> = items.iter().map(|s| s.id.clone()).collect();
        let mut wanted: BTreeMap<String, (PodSpec, String, i64)> = BTreeMap::new();
        for item in &items {
            let ready = item.state == cri::runtime::PodSandboxState::SandboxReady as i32;
            if !ready {
                continue;
            }
            if !self.decided.contains_key(&item.id) {
                let decision = match cri.status(&item.id).await? {
                    None => continue,
                    Some(sb) if !selected(&self.cfg.selector, &sb) => Decision::Skip,
                    Some(sb) => {
                        let who = format!("{}/{}", sb.namespace, sb.name);
                        let hint = self.netns_hints.get(&sb.id).map(String::as_str);
                        match pod_spec(&sb, &self.mount, &self.root, self.daemon.outbound_port(), hint) {
                            Ok(spec) => Decision::Enrol(Box::new(spec), who),
                            Err(e) => {
                                warn!(pod = %who, uid = %sb.uid, "selected but not enrolled: {e}");
                                Decision::Skip
                            }
                        }
                    }
                };
                self.decided.insert(item.id.clone(), decision);
            }
            if let Some(Decision::Enrol(spec, who)) = self.decided.get(&item.id) {
                wanted.insert(
                    spec.name.clone(),
                    ((**spec).clone(), who.clone(), item.created_at),
                );
            }
        }
        self.decided.retain(|id, _| listed.contains(id));
        self.netns_hints.retain(|id, _| listed.contains(id));
        let enrolled: BTreeSet<String> = self.daemon.pod_names().into_iter().collect();
        for (uid, (spec, who, created_at)) in wanted.iter() {
            if enrolled.contains(uid) {
                continue;
            }
            match self.daemon.enroll(spec.clone()) {
                Ok(()) => {
                    let since_ms = since_created_ms(*created_at);
                    info!(pod = %who, uid = %uid, ms_since_sandbox_created = since_ms, "enrolled from the CRI");
                }
                Err(e) => warn!(pod = %who, uid = %uid, "enrolment refused: {e}"),
            }
        }
        for uid in enrolled
            .iter()
            .filter(|n| is_pod_uid(n) && !wanted.contains_key(*n))
        {
            match self.daemon.unenroll(uid).await {
                Ok(()) => info!(uid = %uid, "unenrolled: the pod is gone or no longer selected"),
                Err(e) => warn!(uid = %uid, "unenrol failed: {e}"),
            }
        }
        Ok(listed)
    }
}

fn since_created_ms(created_ns: i64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default();
    (now - created_ns) / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_for_both_drivers() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(
            cgroup_dir(m, "/kubepods/besteffort/pod1111"),
            Path::new("/sys/fs/cgroup/kubepods/besteffort/pod1111")
        );
        assert_eq!(
            cgroup_dir(m, "kubepods-besteffort-pod11_22.slice"),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod11_22.slice"
            )
        );
        assert_eq!(
            cgroup_dir(m, "kubepods-pod11_22.slice"),
            Path::new("/sys/fs/cgroup/kubepods.slice/kubepods-pod11_22.slice")
        );
    }

    #[test]
    fn find_pod_cgroup_in_both_layouts() {
        let dir = std::env::temp_dir().join(format!("sockmesh-k8s-test-{}", std::process::id()));
        let uid = "11111111-2222-3333-4444-555555555555";
        let fs = dir.join("kubepods/burstable").join(format!("pod{uid}"));
        std::fs::create_dir_all(&fs).unwrap();
        assert_eq!(find_pod_cgroup(&dir.join("kubepods"), uid), Some(fs.clone()));
        let sd = dir.join("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod11111111_2222_3333_4444_555555555555.slice");
        std::fs::create_dir_all(&sd).unwrap();
        assert_eq!(find_pod_cgroup(&dir.join("kubepods.slice"), uid), Some(sd));
        assert_eq!(
            find_pod_cgroup(&dir, "99999999-2222-3333-4444-555555555555"),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn sandbox() -> cri::Sandbox {
        cri::Sandbox {
            id: "abc".into(),
            uid: "11111111-2222-3333-4444-555555555555".into(),
            namespace: "default".into(),
            name: "web.v1".into(),
            ready: true,
            netns: Some("/var/run/netns/cni-1".into()),
            cgroup_parent: Some("/kubepods/besteffort/pod11111111-2222-3333-4444-555555555555".into()),
            ..Default::default()
        }
    }

    #[test]
    fn selection_by_label_then_annotation() {
        let sel = parse_selector(DEFAULT_SELECTOR).unwrap();
        let mut sb = sandbox();
        assert!(!selected(&sel, &sb));
        sb.annotations.insert("sockmesh.io/mesh".into(), "enabled".into());
        assert!(selected(&sel, &sb));
        // A label wins over an annotation.
        sb.labels.insert("sockmesh.io/mesh".into(), "disabled".into());
        assert!(!selected(&sel, &sb));
        sb.labels.insert("sockmesh.io/mesh".into(), "enabled".into());
        assert!(selected(&sel, &sb));
        assert!(parse_selector("novalue").is_err());
        assert!(parse_selector("a b=c").is_err());
    }

    #[test]
    fn pod_spec_is_keyed_by_uid_with_annotations() {
        let mut sb = sandbox();
        sb.annotations
            .insert(ANNOTATION_INBOUND_PORTS.into(), "8080, 9090".into());
        sb.annotations.insert(ANNOTATION_COLOUR.into(), "gray".into());
        let m = Path::new("/sys/fs/cgroup/unified");
        let spec = pod_spec(&sb, m, m, 15001, Some("/run/netns/cni-2")).unwrap();
        assert_eq!(spec.name, sb.uid);
        assert_eq!(spec.netns, Path::new("/run/netns/cni-2"));
        assert_eq!(
            spec.cgroup,
            Path::new("/sys/fs/cgroup/unified/kubepods/besteffort/pod11111111-2222-3333-4444-555555555555")
        );
        assert_eq!(spec.inbound_ports, [8080, 9090]);
        assert_eq!(spec.colour.as_deref(), Some("gray"));
        assert!(crate::config::check_pod_name(&spec.name).is_ok());
        sb.annotations
            .insert(ANNOTATION_INBOUND_PORTS.into(), "http".into());
        assert!(pod_spec(&sb, m, m, 15001, None).is_err());
        sb.annotations
            .insert(ANNOTATION_INBOUND_PORTS.into(), "15001".into());
        assert!(pod_spec(&sb, m, m, 15001, None).is_err());
        sb.annotations.clear();
        sb.netns = None;
        assert!(pod_spec(&sb, m, m, 15001, None).is_err());
    }

    #[test]
    fn discovery_owns_only_uid_names() {
        assert!(is_pod_uid("11111111-2222-3333-4444-555555555555"));
        assert!(is_pod_uid("0123456789abcdef0123456789abcdef"));
        assert!(!is_pod_uid("web"));
        assert!(!is_pod_uid("default.web"));
        assert!(!is_pod_uid("11111111x2222-3333-4444-555555555555"));
    }
}
