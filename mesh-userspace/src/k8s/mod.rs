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
//! Pod settings come from annotations: `sockmesh.io/inbound-ports: "8080,9090"`,
//! `sockmesh.io/colour: gray`, and `sockmesh.io/links: "trade=checkout,forest=game"`: the
//! named containers' cgroups are registered as those dual links' cgroups as the containers
//! appear (polled every [`LINKS_POLL`] while one is missing; see [`container_cgroups`]).
//!
//! Timing: CNI ADD runs inside `RunPodSandbox`, before the runtime lists the sandbox. A pod that
//! opts in by annotation (the selector's key and value, default `sockmesh.io/mesh: enabled`) is
//! enrolled during ADD itself ([`cni_add`]): containerd hands the plugin the pod's annotations
//! (capability `io.kubernetes.cri.pod-annotations`), the netns comes from CNI and the cgroup
//! from the pod UID under `cgroup_root` (the kubelet creates the pod cgroup before
//! `RunPodSandbox`), and the plugin returns only after the daemon answered, so the app's
//! containers, and their first connection, come after enrolment. Labels are not passed to CNI
//! plugins: a pod selected only by label is enrolled by discovery, which polls the runtime
//! every 5 ms (for at most 10 s) after the `cni_add` notice until the sandbox shows up; that
//! races the kubelet's container start.

pub mod cri;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    cni::{CniAdd, Notice},
    config::PodSpec,
    daemon::Daemon,
};

pub const DEFAULT_CRI_SOCKET: &str = "/run/containerd/containerd.sock";
pub const DEFAULT_SELECTOR: &str = "sockmesh.io/mesh=enabled";
pub const ANNOTATION_INBOUND_PORTS: &str = "sockmesh.io/inbound-ports";
pub const ANNOTATION_COLOUR: &str = "sockmesh.io/colour";
/// Dual links: which of the pod's containers run which link's app,
/// `"trade=checkout,forest=game"` (a link may name several containers: `forest=a,forest=b`).
pub const ANNOTATION_LINKS: &str = "sockmesh.io/links";
/// While a linked pod's containers are not all found, discovery looks again this often...
const LINKS_POLL: Duration = Duration::from_millis(250);
/// ...for at most this long after it decided to enrol the pod (then at every resync).
const LINKS_POLL_MAX: Duration = Duration::from_secs(120);
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
    /// The node's CNI config dir as the agent sees it: every `cni_check_ms` the agent makes
    /// sure the primary conflist still chains `sockmesh-cni` (a cluster network's agent may
    /// rewrite it without). `None`: no such guard.
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_check_ms: u64,
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

/// What CNI ADD needs of the running discovery's configuration (set by [`start`]).
struct AddCtx {
    selector: (String, String),
    root: PathBuf,
}
static ADD_CTX: OnceLock<AddCtx> = OnceLock::new();

/// Pods enrolled at CNI ADD whose sandbox the runtime has not listed ready yet, by UID:
/// discovery must not unenrol them as "gone" in between.
static PENDING: Mutex<BTreeMap<String, (String, Instant)>> = Mutex::new(BTreeMap::new());
/// A pending enrolment older than this is judged by discovery like any other (the runtime
/// failed the sandbox without a CNI DEL).
const PENDING_MAX: Duration = Duration::from_secs(120);

/// Counters of the Kubernetes integration (`/metrics`).
#[derive(Default)]
pub struct Stats {
    /// CNI ADD outcomes: enrolled during ADD, not opted in by annotation (left to
    /// discovery), or opted in but refused (discovery retries).
    pub add_enrolled: AtomicU64,
    pub add_not_selected: AtomicU64,
    pub add_failed: AtomicU64,
    /// The node's conflist lost the plugin's entry and the agent chained it back.
    pub cni_rechained: AtomicU64,
    /// The conflist could not be read, parsed or written back.
    pub cni_rechain_errors: AtomicU64,
    /// Linked pods' container cgroups registered (`sockmesh.io/links`), and refusals (a bad
    /// annotation, a link the policy lacks, a value the kernel refused).
    pub links_registered: AtomicU64,
    pub link_errors: AtomicU64,
}

pub static STATS: Stats = Stats {
    add_enrolled: AtomicU64::new(0),
    add_not_selected: AtomicU64::new(0),
    add_failed: AtomicU64::new(0),
    cni_rechained: AtomicU64::new(0),
    cni_rechain_errors: AtomicU64::new(0),
    links_registered: AtomicU64::new(0),
    link_errors: AtomicU64::new(0),
};

/// `sockmesh-cni` ADD (admin API): enrol the pod now when its annotations opt it in, then hand
/// the notice to discovery (which enrols label-selected pods once the runtime lists them).
/// Answers after the enrolment, so the plugin's ADD, and with it `RunPodSandbox`, return only
/// then. An error tells the plugin why the pod was not enrolled at ADD; discovery still tries.
pub async fn cni_add(daemon: &Arc<Daemon>, add: CniAdd) -> Result<(), String> {
    let ctx = ADD_CTX
        .get()
        .ok_or("kubernetes discovery is off (no [kubernetes] in the config)")?;
    let opted_in = opted_in_at_add(&ctx.selector, &add.annotations);
    let who = format!(
        "{}/{}",
        add.namespace.as_deref().unwrap_or("-"),
        add.name.as_deref().unwrap_or("-")
    );
    let result = if opted_in {
        let start = Instant::now();
        match enrol_at_add(daemon, ctx, &add) {
            Ok(uid) => {
                STATS.add_enrolled.fetch_add(1, Relaxed);
                info!(
                    pod = %who,
                    uid = %uid,
                    sandbox = %add.sandbox_id,
                    enrol_ms = start.elapsed().as_millis() as u64,
                    unix_ms = crate::sys::unix_ms(),
                    "enrolled at CNI ADD"
                );
                Ok(())
            }
            Err(e) => {
                STATS.add_failed.fetch_add(1, Relaxed);
                warn!(pod = %who, sandbox = %add.sandbox_id, "opted in but not enrolled at CNI ADD (discovery retries): {e}");
                Err(format!("not enrolled at ADD: {e}; discovery retries"))
            }
        }
    } else {
        STATS.add_not_selected.fetch_add(1, Relaxed);
        Ok(())
    };
    // Discovery records the netns and enrols label-selected pods once the runtime lists them;
    // a pod already enrolled here does not need it to be told.
    match (notify(Notice::CniAdd(add)), result) {
        (Err(e), Ok(())) if !opted_in => Err(e),
        (Err(e), Ok(())) => {
            warn!("discovery not told of an enrolled pod: {e}");
            Ok(())
        }
        (_, result) => result,
    }
}

/// Whether a pod's annotations (all CNI ADD sees of it) carry the selector's key and value.
fn opted_in_at_add(selector: &(String, String), annotations: &BTreeMap<String, String>) -> bool {
    annotations.get(&selector.0).is_some_and(|v| *v == selector.1)
}

/// The enrolment of an opted-in pod from what CNI ADD knows; returns its UID.
fn enrol_at_add(daemon: &Daemon, ctx: &AddCtx, add: &CniAdd) -> Result<String, String> {
    let uid = add
        .uid
        .as_deref()
        .filter(|u| is_pod_uid(u))
        .ok_or("CNI_ARGS carry no pod UID (K8S_POD_UID)")?;
    let cgroup = find_pod_cgroup(&ctx.root, uid).ok_or_else(|| {
        format!(
            "no cgroup of pod {uid} under {} (the kubelet creates it before RunPodSandbox)",
            ctx.root.display()
        )
    })?;
    let spec = spec_for(
        uid,
        netns_path(&add.netns),
        cgroup,
        &add.annotations,
        daemon.outbound_port(),
    )?;
    PENDING
        .lock()
        .expect("pending lock")
        .insert(uid.to_string(), (add.sandbox_id.clone(), Instant::now()));
    daemon.enroll(spec).map_err(|e| {
        PENDING.lock().expect("pending lock").remove(uid);
        e.to_string()
    })?;
    Ok(uid.to_string())
}

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
    spec_for(&sb.uid, netns_path(netns), cgroup, &sb.annotations, outbound_port)
}

/// A pod's enrolment under its UID, with the settings its annotations carry.
fn spec_for(
    uid: &str,
    netns: PathBuf,
    cgroup: PathBuf,
    annotations: &BTreeMap<String, String>,
    outbound_port: u16,
) -> Result<PodSpec, String> {
    let ports: Vec<u32> = match annotations.get(ANNOTATION_INBOUND_PORTS) {
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
        name: uid.to_string(),
        netns,
        cgroup,
        external_proxy: false,
        capture: true,
        inbound_ports,
        inbound_all_ports: false,
        inbound_exclude_ports: vec![],
        colour: annotations.get(ANNOTATION_COLOUR).cloned(),
        propagate: false,
        // Dual links' cgroups are the containers' (`sockmesh.io/links`): they do not exist
        // yet when a pod is enrolled; discovery registers them when the containers start.
        links: Default::default(),
    })
}

/// `sockmesh.io/links`: link → container names.
pub fn parse_links(s: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (link, container) = pair
            .split_once('=')
            .map(|(l, c)| (l.trim(), c.trim()))
            .filter(|(l, c)| !l.is_empty() && !c.is_empty())
            .ok_or_else(|| format!("{ANNOTATION_LINKS}: `{pair}` is not link=container"))?;
        let names = out.entry(link.to_owned()).or_default();
        if !names.iter().any(|n| n == container) {
            names.push(container.to_owned());
        }
    }
    if out.is_empty() {
        return Err(format!("{ANNOTATION_LINKS}: no link=container pair"));
    }
    Ok(out)
}

/// The cgroup v1 hierarchies that carry the `cpu` or `memory` controller, from
/// `/proc/self/mountinfo` (a hybrid node mounts them beside the v2 one; a pure v2 node has none).
pub fn cgroup_v1_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut post = post.split_whitespace();
            let (fstype, _source, opts) = (post.next()?, post.next()?, post.next()?);
            let point = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup" && opts.split(',').any(|o| o == "cpu" || o == "memory"))
                .then(|| PathBuf::from(point))
        })
        .collect()
}

/// The cgroup directories of container `id` under the pod's directories (one per hierarchy):
/// cgroupfs names it `<id>`, systemd `<prefix>-<id>.scope`. Only directories whose knobs the
/// link actuator can write: v1 `cpu`/`memory` ones, v2 ones with the `cpu` controller on.
pub fn container_cgroups(pod_dirs: &[PathBuf], id: &str) -> Vec<PathBuf> {
    use crate::links::actuator::{detect, Kind};
    let scope = format!("-{id}.scope");
    pod_dirs
        .iter()
        .flat_map(|pod| std::fs::read_dir(pod).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == id || n.ends_with(&scope))
        })
        .filter(|p| match detect(p) {
            Ok(Kind::V2) => p.join("cpu.max").exists(),
            Ok(_) => true,
            Err(_) => false,
        })
        .collect()
}

/// A linked pod's plan: its UID, link → container names, and its cgroup directory in every
/// hierarchy.
#[derive(Debug, Clone)]
struct LinkPlan {
    uid: String,
    containers: BTreeMap<String, Vec<String>>,
    pod_dirs: Vec<PathBuf>,
    since: Instant,
}

/// A selected pod's `sockmesh.io/links` plan (a bad annotation is logged and counted; the pod
/// is enrolled without links).
fn plan_links(
    sb: &cri::Sandbox,
    spec: &PodSpec,
    who: &str,
    mount: &Path,
    v1_mounts: &[PathBuf],
) -> Option<LinkPlan> {
    let a = sb.annotations.get(ANNOTATION_LINKS)?;
    let containers = match parse_links(a) {
        Ok(c) => c,
        Err(e) => {
            STATS.link_errors.fetch_add(1, Relaxed);
            warn!(pod = %who, uid = %sb.uid, "{e}: enrolled without link cgroups");
            return None;
        }
    };
    // The pod's directory in the v2 hierarchy is the enrolment's; in each v1 one, the same
    // path under that hierarchy's mount.
    let mut pod_dirs = vec![spec.cgroup.clone()];
    if let Ok(rel) = spec.cgroup.strip_prefix(mount) {
        pod_dirs.extend(v1_mounts.iter().map(|m| m.join(rel)));
    }
    Some(LinkPlan {
        uid: sb.uid.clone(),
        containers,
        pod_dirs,
        since: Instant::now(),
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
    /// Linked pods (`sockmesh.io/links`), by sandbox id.
    link_plans: BTreeMap<String, LinkPlan>,
    /// The link cgroups registered with the daemon, by pod UID.
    links_applied: BTreeMap<String, BTreeMap<String, Vec<PathBuf>>>,
    /// Some linked pod still misses a container: look again after [`LINKS_POLL`].
    links_incomplete: bool,
    /// cgroup v1 `cpu`/`memory` mounts (read once).
    v1_mounts: Vec<PathBuf>,
}

/// Start discovery on the daemon's runtime: the first reconcile runs before this returns, so
/// pods that existed before the daemon are enrolled before it reports ready.
pub async fn start(daemon: Arc<Daemon>, cfg: KubernetesConfig, mount: PathBuf, root: PathBuf) {
    let (tx, rx) = mpsc::channel(1024);
    if NOTICES.set(tx).is_err() {
        warn!("kubernetes discovery already started");
        return;
    }
    let _ = ADD_CTX.set(AddCtx {
        selector: cfg.selector.clone(),
        root: root.clone(),
    });
    let mut d = Discovery {
        daemon,
        cfg,
        mount,
        root,
        cri: None,
        decided: BTreeMap::new(),
        netns_hints: BTreeMap::new(),
        link_plans: BTreeMap::new(),
        links_applied: BTreeMap::new(),
        links_incomplete: false,
        v1_mounts: std::fs::read_to_string("/proc/self/mountinfo")
            .map(|m| cgroup_v1_mounts(&m))
            .unwrap_or_default(),
    };
    if let Err(e) = d.reconcile().await {
        warn!(cri = %d.cfg.cri_socket.display(), "first CRI discovery failed (retrying every {}s): {e:#}", d.cfg.resync_secs);
    }
    if let Some(dir) = d.cfg.cni_conf_dir.clone() {
        let every = Duration::from_millis(d.cfg.cni_check_ms);
        let daemon = d.daemon.clone();
        // Blocking file I/O, once a second: on its own thread, not a runtime worker.
        std::thread::Builder::new()
            .name("sockmesh-cni-guard".into())
            .spawn(move || guard_conflist(&dir, every, &daemon))
            .map(drop)
            .unwrap_or_else(|e| warn!("cannot start the CNI config guard: {e}"));
    }
    tokio::spawn(d.run(rx));
}

/// Keep `sockmesh-cni` chained in the node's conflist (see [`KubernetesConfig::cni_conf_dir`]).
/// Logs each change of state once, counts every re-chain and every failure. Ends when the
/// daemon stops (`sockmesh uninstall` unchains the plugin after that).
fn guard_conflist(dir: &Path, every: Duration, daemon: &Daemon) {
    use crate::cni_install::{ensure_chained, entry, Chained};
    let fallback = entry(Path::new(crate::cni::DEFAULT_ADMIN_SOCKET), None);
    let mut remembered = None;
    let mut last_err: Option<String> = None;
    while !daemon.is_shutting_down() {
        match ensure_chained(dir, &mut remembered, &fallback) {
            Ok(Chained::Present) => last_err = None,
            Ok(Chained::Rechained(path)) => {
                STATS.cni_rechained.fetch_add(1, Relaxed);
                warn!(conflist = %path.display(), "the node's CNI config lost sockmesh-cni: chained it back");
                last_err = None;
            }
            Err(e) => {
                STATS.cni_rechain_errors.fetch_add(1, Relaxed);
                let e = e.to_string();
                if last_err.as_ref() != Some(&e) {
                    warn!(dir = %dir.display(), "cannot check the node's CNI config: {e}");
                }
                last_err = Some(e);
            }
        }
        std::thread::sleep(every);
    }
}

impl Discovery {
    async fn run(mut self, mut rx: mpsc::Receiver<Notice>) {
        let resync = Duration::from_secs(self.cfg.resync_secs.max(1));
        loop {
            let wait = if self.links_incomplete { LINKS_POLL } else { resync };
            let notice = tokio::time::timeout(wait, rx.recv()).await;
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
            Notice::CniAdd(CniAdd {
                sandbox_id, netns, ..
            }) => {
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
            Notice::CniDel(crate::cni::CniDel { sandbox_id, uid }) => {
                self.netns_hints.remove(&sandbox_id);
                if let Some(u) = &uid {
                    PENDING.lock().expect("pending lock").remove(u);
                }
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
                            Ok(spec) => {
                                if let Some(plan) = plan_links(&sb, &spec, &who, &self.mount, &self.v1_mounts)
                                {
                                    self.link_plans.insert(sb.id.clone(), plan);
                                }
                                Decision::Enrol(Box::new(spec), who)
                            }
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
        self.link_plans.retain(|id, _| listed.contains(id));
        let enrolled: BTreeSet<String> = self.daemon.pod_names().into_iter().collect();
        // Enrolled at CNI ADD: kept until the runtime lists the sandbox ready (then judged here
        // like every pod) or for PENDING_MAX. Read after `enrolled`: an ADD puts its pod in the
        // pending set before enrolling it, so any pod in `enrolled` from an ADD is seen here.
        let ready: BTreeSet<&str> = items
            .iter()
            .filter(|i| i.state == cri::runtime::PodSandboxState::SandboxReady as i32)
            .map(|i| i.id.as_str())
            .collect();
        let pending: BTreeSet<String> = {
            let mut p = PENDING.lock().expect("pending lock");
            p.retain(|_, (sandbox, since)| {
                !ready.contains(sandbox.as_str()) && since.elapsed() < PENDING_MAX
            });
            p.keys().cloned().collect()
        };
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
            .filter(|n| is_pod_uid(n) && !wanted.contains_key(*n) && !pending.contains(*n))
        {
            match self.daemon.unenroll(uid).await {
                Ok(()) => info!(uid = %uid, "unenrolled: the pod is gone or no longer selected"),
                Err(e) => warn!(uid = %uid, "unenrol failed: {e}"),
            }
        }
        self.links_applied.retain(|uid, _| wanted.contains_key(uid));
        self.apply_links().await?;
        Ok(listed)
    }

    /// Register linked pods' container cgroups with the daemon as they appear (and again when
    /// a container is replaced).
    async fn apply_links(&mut self) -> anyhow::Result<()> {
        self.links_incomplete = false;
        if self.link_plans.is_empty() {
            return Ok(());
        }
        let cri = self.cri.as_mut().expect("connected by reconcile");
        let all = cri.containers().await?;
        let enrolled: BTreeSet<String> = self.daemon.pod_names().into_iter().collect();
        for (sandbox, plan) in &self.link_plans {
            if !enrolled.contains(&plan.uid) {
                continue;
            }
            let mut found: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
            let mut missing = Vec::new();
            for (link, names) in &plan.containers {
                for name in names {
                    let dirs: Vec<PathBuf> = all
                        .iter()
                        .filter(|(sb, n, _)| sb == sandbox && n == name)
                        .flat_map(|(_, _, id)| container_cgroups(&plan.pod_dirs, id))
                        .collect();
                    if dirs.is_empty() {
                        missing.push(name.as_str());
                    }
                    found.entry(link.clone()).or_default().extend(dirs);
                }
            }
            found.retain(|_, d| !d.is_empty());
            if !missing.is_empty() && plan.since.elapsed() < LINKS_POLL_MAX {
                self.links_incomplete = true;
            }
            if found.is_empty() || self.links_applied.get(&plan.uid) == Some(&found) {
                continue;
            }
            match self.daemon.set_pod_links(&plan.uid, &found) {
                Ok(()) => {
                    STATS.links_registered.fetch_add(1, Relaxed);
                    info!(uid = %plan.uid, links = ?found.keys().collect::<Vec<_>>(), missing = ?missing,
                        "link cgroups registered from the pod's containers");
                }
                Err(e) => {
                    STATS.link_errors.fetch_add(1, Relaxed);
                    warn!(uid = %plan.uid, "link cgroups refused: {e}");
                }
            }
            // Refused ones too: tried again only when the containers change.
            self.links_applied.insert(plan.uid.clone(), found);
        }
        Ok(())
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
    fn the_annotation_opts_in_at_cni_add_with_its_settings() {
        let sel = parse_selector(DEFAULT_SELECTOR).unwrap();
        let mut a = BTreeMap::new();
        assert!(!opted_in_at_add(&sel, &a));
        a.insert("sockmesh.io/mesh".to_string(), "disabled".to_string());
        assert!(!opted_in_at_add(&sel, &a));
        a.insert("sockmesh.io/mesh".to_string(), "enabled".to_string());
        assert!(opted_in_at_add(&sel, &a));
        assert!(opted_in_at_add(
            &parse_selector("team/mesh=on").unwrap(),
            &[("team/mesh".to_string(), "on".to_string())].into()
        ));
        a.insert(ANNOTATION_INBOUND_PORTS.into(), "8080".into());
        a.insert(ANNOTATION_COLOUR.into(), "gray".into());
        let uid = "11111111-2222-3333-4444-555555555555";
        let spec = spec_for(
            uid,
            "/run/netns/cni-1".into(),
            "/sys/fs/cgroup/kubepods/pod1".into(),
            &a,
            15001,
        )
        .unwrap();
        assert_eq!(
            (spec.name.as_str(), spec.inbound_ports.as_slice()),
            (uid, &[8080u16][..])
        );
        assert_eq!(spec.colour.as_deref(), Some("gray"));
        assert!(spec.capture);
        a.insert(ANNOTATION_INBOUND_PORTS.into(), "x".into());
        assert!(spec_for(uid, "/n".into(), "/c".into(), &a, 15001).is_err());
    }

    #[test]
    fn the_links_annotation_names_containers_per_link() {
        let l = parse_links(" trade=checkout, forest=game ,forest=game-cache,forest=game").unwrap();
        assert_eq!(l["trade"], vec!["checkout"]);
        assert_eq!(l["forest"], vec!["game", "game-cache"]);
        for bad in ["", "trade", "trade=", "=x", " , "] {
            let e = parse_links(bad).unwrap_err();
            assert!(e.starts_with(ANNOTATION_LINKS), "{bad:?}: {e}");
        }
    }

    #[test]
    fn v1_cpu_and_memory_hierarchies_come_from_mountinfo() {
        let mi = "\
25 20 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
29 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset
32 25 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
";
        assert_eq!(
            cgroup_v1_mounts(mi),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                PathBuf::from("/sys/fs/cgroup/memory")
            ]
        );
        assert!(cgroup_v1_mounts("26 25 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n").is_empty());
    }

    #[test]
    fn container_cgroups_are_found_in_both_layouts_and_only_where_knobs_are() {
        let base = std::env::temp_dir().join(format!("sockmesh-k8s-links-{}", std::process::id()));
        let (cpu, v2, v2_off) = (
            base.join("cpu/podX"),
            base.join("v2/podX"),
            base.join("v2off/podX"),
        );
        let id = "0123abcd";
        for (dir, file) in [
            (cpu.join(id), "cpu.cfs_quota_us"),
            (cpu.join("other"), "cpu.cfs_quota_us"),
            (v2.join(format!("cri-containerd-{id}.scope")), "cpu.max"),
            (v2_off.join(id), "cgroup.procs"),
        ] {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(file), "").unwrap();
            if file != "cpu.cfs_quota_us" {
                std::fs::write(dir.join("cgroup.controllers"), "").unwrap();
            }
        }
        let mut got = container_cgroups(
            &[cpu.clone(), v2.clone(), v2_off.clone(), base.join("absent")],
            id,
        );
        got.sort();
        let _ = std::fs::remove_dir_all(&base);
        // The v2 directory without the cpu controller on is skipped (its knobs cannot be set).
        assert_eq!(
            got,
            vec![cpu.join(id), v2.join(format!("cri-containerd-{id}.scope"))]
        );
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
