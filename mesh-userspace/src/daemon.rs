//! The node daemon: owns the kernel side and the per-pod proxies, reconciles enrolment into both,
//! and shuts down in two phases (stop capturing and accepting, drain with a deadline, detach).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use mesh_common::{
    inbound::{listener_slot, InboundKey, InboundTarget, ANY_PORT},
    pods::{pod_flags, PodInfo},
};
use serde_json::json;
use thiserror::Error;
use tracing::{info, warn};

use crate::{
    config::{self, Config, PodSpec},
    conn::{self, Direction, PodCtx, PodStats, Shared},
    ebpf::{Kernel, KernelError},
    proxy::{self, PodProxy},
    routing::Router,
    state,
    sys::{self, NetNs},
};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("pod `{0}` is already enrolled with a different spec (unenroll it first)")]
    AlreadyEnrolled(String),
    #[error("pod `{0}` is not enrolled")]
    NotEnrolled(String),
    #[error("invalid pod name: {0}")]
    BadName(String),
    #[error("pod `{name}`: {field}: {reason}")]
    BadPath {
        name: String,
        field: &'static str,
        reason: String,
    },
    #[error("cgroup {path} is already enrolled as pod `{other}`")]
    CgroupTaken { path: String, other: String },
    #[error("pod `{name}`: {source}")]
    Sys { name: String, source: sys::SysError },
    #[error("pod `{name}`: {source}")]
    Io { name: String, source: std::io::Error },
    #[error("pod `{name}`: {source}")]
    Kernel { name: String, source: KernelError },
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

impl DaemonError {
    /// The metric label for a refused admin request.
    fn reason(&self) -> &'static str {
        match self {
            DaemonError::AlreadyEnrolled(_) => "already_enrolled",
            DaemonError::NotEnrolled(_) => "not_enrolled",
            DaemonError::BadName(_) => "bad_name",
            DaemonError::BadPath { .. } => "bad_path",
            DaemonError::CgroupTaken { .. } => "cgroup_taken",
            DaemonError::Sys { .. } | DaemonError::Io { .. } => "system",
            DaemonError::Kernel {
                source: KernelError::Full { .. },
                ..
            } => "map_full",
            DaemonError::Kernel { .. } => "kernel",
            DaemonError::ShuttingDown => "shutting_down",
        }
    }
}

struct EnrolledPod {
    spec: PodSpec,
    pod_id: u32,
    cgroup_id: u64,
    netns_cookie: u64,
    stats: Arc<PodStats>,
    proxy: Option<PodProxy>,
    /// Pod address × meshed port entries this pod put in the inbound map.
    inbound_keys: Vec<InboundKey>,
    /// The pod's addresses when it was enrolled (in [`conn::MeshIps`]).
    addrs: Vec<std::net::IpAddr>,
}

fn inbound_key(a: std::net::IpAddr, port: u16) -> InboundKey {
    match a {
        std::net::IpAddr::V4(v4) => InboundKey::v4(u32::from_ne_bytes(v4.octets()), port),
        std::net::IpAddr::V6(_) => InboundKey::v6(mesh_common::flow::ip_to_words(a), port),
    }
}

/// How the short-circuit stands, for status.
#[derive(Debug, Clone)]
pub struct AccelState {
    pub enabled: bool,
    pub detail: String,
}

pub struct Daemon {
    cfg: Config,
    cgroup_root: PathBuf,
    kernel: Mutex<Kernel>,
    pods: Mutex<BTreeMap<String, EnrolledPod>>,
    shared: Arc<Shared>,
    accel: Mutex<AccelState>,
    checks: Vec<(String, String)>,
    admin_errors: Mutex<BTreeMap<&'static str, u64>>,
    shutting_down: std::sync::atomic::AtomicBool,
    started: Instant,
    enrolments: AtomicU64,
    /// Set by the admin `stop` request: `Some(keep_state)`.
    stop: tokio::sync::watch::Sender<Option<bool>>,
    /// The policy `routes apply` installed (kept in the state file for a successor); `None`
    /// while the config file's policy is in force.
    applied_routing: Mutex<Option<state::AppliedRouting>>,
    /// Dual links: states, pods' link cgroups, the switch engine.
    links: Arc<crate::links::LinkManager>,
    /// Endpoints marked down for the kernel-routed services (admin `kernel_endpoint`).
    kernel_down: Mutex<std::collections::BTreeSet<std::net::SocketAddr>>,
    /// Health checks of kernel-routed endpoints (`health_check_ms`).
    kernel_health: Mutex<crate::kroute::Health>,
    /// After an upgrade hand-off: the pods' own copies of their listening sockets, kept while
    /// this generation drains (see [`Daemon::drain_handed_off`]).
    paused: Mutex<Vec<PausedPod>>,
    /// Pods whose `net.ipv4.tcp_migrate_req` this generation turned on (see
    /// [`Daemon::close_extra_members`]).
    migrate_restore: Mutex<Vec<Arc<PodCtx>>>,
}

/// A pod's listeners while its generation drains after a hand-off: not accepted from, kept open.
type PausedPod = (String, Arc<PodCtx>, Vec<proxy::ListenerGroup>);

pub struct PodMetrics {
    pub name: String,
    pub connections_total: u64,
    pub connections_active: u64,
    pub bytes_upstream: u64,
    pub bytes_downstream: u64,
}

pub struct MetricsSnapshot {
    pub pods: Vec<PodMetrics>,
    pub kernel: Vec<(&'static str, u64)>,
    pub errors: Vec<(&'static str, u64)>,
    pub admin_errors: Vec<(&'static str, u64)>,
    pub propagation_available: bool,
    /// Connections accepted, per proxy worker.
    pub worker_connections: Vec<u64>,
}

/// The kernel counters of colour propagation, shown together in status.
const PROPAGATION_REASONS: [u32; 7] = {
    use mesh_common::stats::reason as r;
    [
        r::RECV_COLOURED,
        r::RECV_CLEARED,
        r::SEND_CLEARED,
        r::LEDGER_CREATED,
        r::LEDGER_RECORDED,
        r::LEDGER_MAP_FULL,
        r::LEDGER_MISSING,
    ]
};

impl Daemon {
    pub fn new(
        cfg: Config,
        cgroup_root: PathBuf,
        kernel: Kernel,
        accel: AccelState,
        checks: Vec<(String, String)>,
        workers: conn::Workers,
    ) -> Self {
        let router =
            Router::new(crate::routing::compile(cfg.routing.clone()).expect("validated by config::parse"));
        let colour = kernel.colour();
        let shared = Arc::new(
            Shared::new(Box::new(conn::KernelOrigDst), router)
                .with_colour(colour)
                .with_limits(cfg.limits.clone())
                .with_workers(workers.with_listener_groups(cfg.reuseport_listeners)),
        );
        tracing::info!(
            "per-pod connection cap: {} ([limits] max_connections_per_pod; 0: none)",
            shared.pod_cap.load(std::sync::atomic::Ordering::Relaxed)
        );
        let links = Arc::new(crate::links::LinkManager::new(
            crate::links::state_path(&cfg.state_file),
            shared.l7.links.clone(),
        ));
        Self {
            links,
            cfg,
            cgroup_root,
            kernel: Mutex::new(kernel),
            pods: Mutex::new(BTreeMap::new()),
            shared,
            accel: Mutex::new(accel),
            checks,
            admin_errors: Mutex::new(BTreeMap::new()),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            started: Instant::now(),
            enrolments: AtomicU64::new(0),
            stop: tokio::sync::watch::channel(None).0,
            applied_routing: Mutex::new(None),
            kernel_down: Mutex::new(Default::default()),
            kernel_health: Mutex::new(Default::default()),
            paused: Mutex::new(Vec::new()),
            migrate_restore: Mutex::new(Vec::new()),
        }
    }

    /// At start, once the policy in force is settled (after [`Daemon::resume_routing`]):
    /// write its kernel-routed services. A successor thus never routes in the kernel by the
    /// config's weights while a runtime policy is being resumed: until this call the previous
    /// daemon's tables keep routing.
    pub fn write_kernel_routes(&self) {
        if let Err(e) = self.sync_kernel_routes(&self.policy()) {
            warn!("kernel-routed services not written: {e}");
        }
    }

    /// Write `policy`'s kernel-routed services (with the endpoints marked down) into the
    /// kernel tables: a new generation, flipped service by service.
    fn sync_kernel_routes(&self, policy: &crate::routing::Policy) -> Result<crate::ebpf::TableWrite, String> {
        let tables = {
            let down = self.kernel_down_all();
            crate::kroute::tables(policy.kernel_plan(), &down)
        };
        let mut k = self.kernel.lock().expect("kernel lock");
        let w = k.services.write(&tables).map_err(|e| e.to_string())?;
        tracing::info!(
            generation = w.generation,
            services = w.services,
            write_us = w.write_us,
            "kernel service tables written"
        );
        Ok(w)
    }

    /// Mark an endpoint of the kernel-routed services down (it leaves the kernel's choice) or
    /// up again; returns the new table write.
    pub fn set_kernel_endpoint(
        &self,
        address: std::net::SocketAddr,
        up: bool,
    ) -> Result<crate::ebpf::TableWrite, String> {
        let address = crate::routing::policy::normalise(address);
        {
            let mut down = self.kernel_down.lock().expect("down lock");
            if up {
                down.remove(&address);
            } else {
                down.insert(address);
            }
        }
        self.sync_kernel_routes(&self.policy())
    }

    /// Endpoints out of the kernel's choice: marked down by an operator or by health checks.
    fn kernel_down_all(&self) -> std::collections::BTreeSet<std::net::SocketAddr> {
        let mut down = self.kernel_down.lock().expect("down lock").clone();
        down.extend(
            self.kernel_health
                .lock()
                .expect("health lock")
                .down
                .iter()
                .copied(),
        );
        down
    }

    /// The `kernel` part of `sockmesh routes`.
    pub fn kernel_routes(&self) -> serde_json::Value {
        let policy = self.policy();
        let down = self.kernel_down_all();
        let unhealthy: Vec<String> = self
            .kernel_health
            .lock()
            .expect("health lock")
            .down
            .iter()
            .map(|a| a.to_string())
            .collect();
        let k = self.kernel.lock().expect("kernel lock");
        let mut v = crate::kroute::view(policy.kernel_plan(), &k.services, &down);
        v["unhealthy"] = unhealthy.into();
        v
    }

    /// Probes the endpoints of kernel-routed services with `health_check_ms`, from inside an
    /// enrolled pod's netns, and rewrites the kernel tables when one goes down or comes back.
    /// Runs until shutdown.
    pub async fn kernel_health_loop(self: Arc<Self>) {
        loop {
            let Some((every, endpoints)) = crate::kroute::health_targets(self.policy().kernel_plan()) else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            tokio::time::sleep(every).await;
            if self.shutting_down.load(Relaxed) {
                return;
            }
            if crate::upgrade::is_draining() {
                // Handed over: the successor writes the tables (this generation may serve
                // again if it dies).
                continue;
            }
            let netns = self
                .pods
                .lock()
                .expect("pods lock")
                .values()
                .find(|p| p.spec.capture)
                .map(|p| p.spec.netns.clone());
            let Some(netns) = netns else { continue };
            let timeout = every.min(Duration::from_secs(1));
            let results = crate::kroute::probe(&netns, self.cfg.daemon_mark, &endpoints, timeout).await;
            let changed = self.kernel_health.lock().expect("health lock").record(&results);
            if changed {
                let down = self.kernel_health.lock().expect("health lock").down.clone();
                warn!(?down, "kernel-routed endpoints failing health checks changed");
                if let Err(e) = self.sync_kernel_routes(&self.policy()) {
                    warn!("kernel-routed services not written: {e}");
                }
            }
        }
    }

    /// After a restart: go on with the policy the previous daemon had applied at runtime, if
    /// the config file's policy is still the one it replaced. Returns whether it did.
    pub fn resume_routing(&self, r: state::AppliedRouting) -> bool {
        if r.base != self.cfg.routing {
            warn!("the config's routing policy changed since `routes apply`: using the config's");
            return false;
        }
        match crate::routing::compile(r.applied.clone()) {
            Ok(policy) => {
                self.l7().router.replace(policy);
                tracing::info!(
                    services = r.applied.services.len(),
                    "resumed the routing policy applied at runtime"
                );
                *self.applied_routing.lock().expect("routing lock") = Some(r);
                true
            }
            Err(e) => {
                warn!("the saved runtime routing policy is not valid ({e}): using the config's");
                false
            }
        }
    }

    /// The routing policy in force now.
    pub fn policy(&self) -> Arc<crate::routing::Policy> {
        self.l7().router.current()
    }

    /// A pod's colour id under the live policy (0: none), as `SM_PODS` carries it.
    fn colour_id(&self, spec: &PodSpec) -> u8 {
        spec.colour
            .as_deref()
            .and_then(|c| self.policy().colours().id(c))
            .unwrap_or(0)
    }

    /// After a policy change: colour ids may have moved; rewrite the coloured pods' entries.
    fn refresh_pod_colours(&self) {
        let pods = self.pods.lock().expect("pods lock");
        let mut k = self.kernel.lock().expect("kernel lock");
        for p in pods
            .values()
            .filter(|p| p.spec.capture && p.spec.colour.is_some())
        {
            let info = PodInfo::new(
                p.pod_id,
                pod_flags(p.spec.propagate, self.colour_id(&p.spec)),
                p.netns_cookie,
            );
            if let Err(e) = k.add_pod(p.cgroup_id, info) {
                warn!(pod = %p.spec.name, "failed to update the pod's colour in the kernel: {e}");
            }
        }
    }

    /// The routing policy, protocol errors and pools.
    pub fn l7(&self) -> &crate::l7::L7Shared {
        &self.shared.l7
    }

    /// `sockmesh routes`: the live policy with its counters.
    pub fn routes(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.l7().router.current().view()).unwrap_or_default();
        v["kernel"] = self.kernel_routes();
        v
    }

    /// `sockmesh routes apply`: validate and swap the whole policy; existing connections keep
    /// going and their next request uses it. Returns the new generation.
    pub fn apply_routes(&self, raw: crate::routing::RawPolicy) -> Result<u64, crate::routing::PolicyError> {
        let policy = crate::routing::compile(raw.clone())?;
        // A pod's colour must stay defined: its requests would silently turn base.
        for p in self.pods.lock().expect("pods lock").values() {
            if let Some(c) = &p.spec.colour {
                crate::config::check_pod_colour(c, &policy).map_err(|reason| {
                    crate::routing::PolicyError {
                        field: "colours".into(),
                        reason: format!("enrolled pod `{}` has colour `{c}`: {reason}", p.spec.name),
                    }
                })?;
            }
        }
        let services = policy.raw().services.len();
        // The kernel's tables first: a refusal there leaves the old policy serving everywhere.
        let write = self
            .sync_kernel_routes(&policy)
            .map_err(|e| crate::routing::PolicyError {
                field: "services".into(),
                reason: format!("the kernel service tables refused the policy: {e}"),
            })?;
        tracing::debug!(kernel_write_us = write.write_us, "kernel tables flipped");
        self.l7().router.replace(policy);
        self.refresh_pod_colours();
        let generation = self.l7().router.current().generation();
        tracing::info!(generation, services, "routing policy applied");
        *self.applied_routing.lock().expect("routing lock") = Some(state::AppliedRouting {
            base: self.cfg.routing.clone(),
            applied: raw,
        });
        self.persist(&self.pods.lock().expect("pods lock"));
        Ok(generation)
    }

    fn count_refusal(&self, e: &DaemonError) {
        *self
            .admin_errors
            .lock()
            .expect("lock")
            .entry(e.reason())
            .or_default() += 1;
    }

    /// Enrol a pod: open its listeners (unless an external proxy owns the port), then tell the
    /// kernel. The order matters: the hook captures only when the listener is there.
    /// Enrolling the same spec twice is a no-op.
    pub fn enroll(&self, spec: PodSpec) -> Result<(), DaemonError> {
        // Link cgroups first: a resource value the kernel refuses leaves nothing enrolled.
        let r = self
            .links
            .register_pod(&spec.name, &spec.links, &self.policy())
            .map_err(|reason| DaemonError::BadPath {
                name: spec.name.clone(),
                field: "links",
                reason,
            });
        let name = spec.name.clone();
        let r = match r {
            Ok(()) => self.enroll_inner(spec),
            Err(e) => Err(e),
        };
        if let Err(e) = &r {
            if !matches!(e, DaemonError::AlreadyEnrolled(_)) {
                self.links.forget_pod(&name);
            }
            self.count_refusal(e);
        }
        r
    }

    /// An enrolled pod's link cgroups found later (Kubernetes: its containers start after the
    /// pod is enrolled): each gets the resources of its link's state now. Refused (nothing
    /// kept) when a link is not in the policy or the kernel refuses a value.
    pub fn set_pod_links(&self, name: &str, links: &BTreeMap<String, Vec<PathBuf>>) -> Result<(), String> {
        if !self.pod_names().iter().any(|n| n == name) {
            return Err(format!("pod `{name}` is not enrolled"));
        }
        self.links.register_pod(name, links, &self.policy())
    }

    /// `sockmesh switch` (see [`crate::links::LinkManager`]); no action: the links' view.
    #[allow(clippy::too_many_arguments)]
    pub fn switch(
        &self,
        to: Option<String>,
        back: bool,
        abort: bool,
        pause: bool,
        resume: bool,
        over_ms: u64,
        steps: u32,
    ) -> Result<serde_json::Value, String> {
        let over = std::time::Duration::from_millis(over_ms);
        if abort {
            return self.links.abort();
        }
        if pause || resume {
            return self.links.set_paused(pause);
        }
        let to = match (to, back) {
            (Some(_), true) => return Err("--to and --back exclude each other".into()),
            (Some(t), false) => t,
            (None, true) => self
                .links
                .previous()
                .ok_or("no previous switch to go back from")?,
            (None, false) => return Ok(self.links.view(&self.policy())),
        };
        self.links.start(self.shared.clone(), &to, over, steps)
    }

    /// After a restart: go on with a switch the previous daemon left unfinished.
    pub fn resume_links(&self) {
        self.links.resume(self.shared.clone());
    }

    /// The links' metrics.
    pub fn link_metrics(&self) -> crate::links::LinkMetrics {
        self.links.metric_rows(&self.policy())
    }

    fn enroll_inner(&self, spec: PodSpec) -> Result<(), DaemonError> {
        if self.shutting_down.load(Relaxed) || crate::upgrade::is_draining() {
            return Err(DaemonError::ShuttingDown);
        }
        config::check_pod_name(&spec.name).map_err(DaemonError::BadName)?;
        let name = spec.name.clone();
        config::check_propagate(spec.propagate, spec.capture).map_err(|reason| DaemonError::BadPath {
            name: name.clone(),
            field: "propagate",
            reason,
        })?;
        config::check_pod_paths(&spec, &self.cgroup_root).map_err(|(field, reason)| {
            DaemonError::BadPath {
                name: name.clone(),
                field,
                reason,
            }
        })?;
        let cgroup_id = sys::cgroup_id(&spec.cgroup).map_err(|source| DaemonError::Io {
            name: name.clone(),
            source,
        })?;
        let mut pods = self.pods.lock().expect("pods lock");
        if let Some(p) = pods.get(&name) {
            if p.spec == spec {
                return Ok(());
            }
            return Err(DaemonError::AlreadyEnrolled(name));
        }
        if let Some(other) = pods.values().find(|p| p.cgroup_id == cgroup_id) {
            return Err(DaemonError::CgroupTaken {
                path: spec.cgroup.display().to_string(),
                other: other.spec.name.clone(),
            });
        }
        let netns = NetNs::open(&spec.netns).map_err(|source| DaemonError::Sys {
            name: name.clone(),
            source,
        })?;
        let netns_cookie = sys::netns_cookie_of(&netns).map_err(|source| DaemonError::Io {
            name: name.clone(),
            source,
        })?;
        let stats = Arc::new(PodStats::default());
        // The smallest free id: it also picks the pod's listener slots in the kernel.
        let pod_id = (1..=mesh_common::maps::PODS_MAX)
            .find(|id| !pods.values().any(|p| p.pod_id == *id))
            .ok_or(DaemonError::Kernel {
                name: name.clone(),
                source: KernelError::Full {
                    name: mesh_common::maps::PODS,
                    max: mesh_common::maps::PODS_MAX,
                },
            })?;
        let ctx = Arc::new(PodCtx {
            name: name.clone(),
            netns,
            stats: stats.clone(),
            outbound_port: self.cfg.outbound_port,
            inbound_port: mesh_common::DEFAULT_INBOUND_PORT,
            mark: self.cfg.daemon_mark,
            colour: spec.colour.clone(),
            propagate: spec.propagate,
            netns_cookie,
        });
        let io_err = |source| DaemonError::Io {
            name: name.clone(),
            source,
        };
        // The pod's addresses: its requests to other pods come from inside the mesh.
        let addrs = sys::local_addrs_in(&ctx.netns).map_err(io_err)?;
        let mut listeners = Vec::new();
        let members = self.shared.workers.group_size();
        if !spec.external_proxy {
            for l in proxy::outbound_listeners(&ctx, members).map_err(io_err)? {
                listeners.push((l, Direction::Outbound));
            }
        }
        // Inbound: listeners in the sockmap and the pod's addresses × ports in the inbound map
        // first, the sk_lookup link last, so the hook never sees half a setup.
        let mut inbound_keys = Vec::new();
        if !spec.inbound_ports.is_empty() || spec.inbound_all_ports {
            let ports: Vec<u16> = if spec.inbound_all_ports {
                vec![ANY_PORT]
            } else {
                spec.inbound_ports.clone()
            };
            let addrs = addrs.clone();
            let mut k = self.kernel.lock().expect("kernel lock");
            let r = (|| -> Result<(), DaemonError> {
                let kerr = |source| DaemonError::Kernel {
                    name: name.clone(),
                    source,
                };
                for v6 in [false, true] {
                    let fam: Vec<_> = addrs.iter().filter(|a| a.is_ipv6() == v6).collect();
                    if fam.is_empty() {
                        continue;
                    }
                    let l = proxy::inbound_listener(&ctx, ctx.inbound_port, v6, members).map_err(io_err)?;
                    let slot = listener_slot(pod_id, v6);
                    // Member 0: sk_lookup's assign of it selects within its reuseport group.
                    k.set_listener(slot, &l[0]).map_err(kerr)?;
                    listeners.push((l, Direction::Inbound));
                    for a in fam {
                        for port in &ports {
                            let key = inbound_key(*a, *port);
                            k.add_inbound(key, InboundTarget { slot, pod_id }).map_err(kerr)?;
                            inbound_keys.push(key);
                        }
                        for port in &spec.inbound_exclude_ports {
                            let key = inbound_key(*a, *port);
                            k.add_inbound_exclude(key).map_err(kerr)?;
                            inbound_keys.push(key);
                        }
                    }
                }
                k.attach_netns(&name, &spec.netns).map_err(kerr)
            })();
            if let Err(e) = r {
                for key in &inbound_keys {
                    k.remove_inbound(key);
                }
                k.clear_listener(listener_slot(pod_id, false));
                k.clear_listener(listener_slot(pod_id, true));
                return Err(e);
            }
        }
        let proxy = if listeners.is_empty() {
            None
        } else {
            Some(proxy::serve(ctx.clone(), self.shared.clone(), listeners).map_err(io_err)?)
        };
        if spec.capture {
            if let Err(source) = self.kernel.lock().expect("kernel lock").add_pod(
                cgroup_id,
                PodInfo::new(
                    pod_id,
                    pod_flags(spec.propagate, self.colour_id(&spec)),
                    netns_cookie,
                ),
            ) {
                self.undo_inbound(&name, pod_id, &inbound_keys);
                return Err(DaemonError::Kernel {
                    name: name.clone(),
                    source,
                });
            }
        }
        self.shared.mesh_ips.add(&addrs);
        if !spec.external_proxy {
            self.shared.mesh_ips.add_routed(&addrs);
        }
        info!(pod = %name, cgroup_id, netns_cookie, external_proxy = spec.external_proxy, "enrolled");
        self.enrolments.fetch_add(1, Relaxed);
        pods.insert(
            name,
            EnrolledPod {
                spec,
                pod_id,
                cgroup_id,
                netns_cookie,
                stats,
                proxy,
                inbound_keys,
                addrs,
            },
        );
        self.persist(&pods);
        Ok(())
    }

    /// Take a pod's inbound capture out of the kernel: the sk_lookup link first (no new
    /// captures), then its map entries and listener slots.
    fn undo_inbound(&self, name: &str, pod_id: u32, keys: &[InboundKey]) {
        let mut k = self.kernel.lock().expect("kernel lock");
        k.detach_netns(name);
        for key in keys {
            k.remove_inbound(key);
        }
        k.clear_listener(listener_slot(pod_id, false));
        k.clear_listener(listener_slot(pod_id, true));
    }

    /// The names of the enrolled pods (Kubernetes discovery).
    pub fn pod_names(&self) -> Vec<String> {
        self.pods.lock().expect("pods lock").keys().cloned().collect()
    }

    pub fn outbound_port(&self) -> u16 {
        self.cfg.outbound_port
    }

    /// Write the enrolment state for a successor daemon. A failure is logged, not fatal: the
    /// kernel state is pinned anyway, only names and paths would be missing after a restart.
    fn persist(&self, pods: &BTreeMap<String, EnrolledPod>) {
        let st = state::State {
            abi_version: mesh_common::ABI_VERSION,
            cgroup_root: self.cgroup_root.clone(),
            pods: pods.values().map(|p| state::PodState::from(&p.spec)).collect(),
            routing: self.applied_routing.lock().expect("routing lock").clone(),
        };
        if let Err(e) = state::save(&self.cfg.state_file, &st) {
            warn!(path = %self.cfg.state_file.display(), "failed to save enrolment state: {e}");
        }
    }

    /// After a restart: enrol `desired` (config pods and the previous daemon's state), then drop
    /// kernel entries nobody wants any more. Pods whose netns or cgroup vanished meanwhile are
    /// skipped with a warning.
    pub fn adopt(&self, desired: Vec<PodSpec>) -> Vec<String> {
        let mut skipped = Vec::new();
        for spec in desired {
            let name = spec.name.clone();
            if let Err(e) = self.enroll(spec) {
                warn!(pod = %name, "not re-adopted: {e}");
                skipped.push(format!("{name}: {e}"));
            }
        }
        let wanted: Vec<u64> = self
            .pods
            .lock()
            .expect("pods lock")
            .values()
            .filter(|p| p.spec.capture)
            .map(|p| p.cgroup_id)
            .collect();
        let wanted_keys: Vec<InboundKey> = self
            .pods
            .lock()
            .expect("pods lock")
            .values()
            .flat_map(|p| p.inbound_keys.clone())
            .collect();
        let mut k = self.kernel.lock().expect("kernel lock");
        for (key, _) in k.inbound_entries() {
            if !wanted_keys.contains(&key) {
                k.remove_inbound(&key);
            }
        }
        for (cg, _) in k.pod_entries() {
            if !wanted.contains(&cg) {
                info!(
                    cgroup_id = cg,
                    "removing a stale pod entry left by the previous daemon"
                );
                let _ = k.remove_pod(cg);
            }
        }
        skipped
    }

    /// Ask the daemon to stop (admin `stop`).
    pub fn request_stop(&self, keep_state: bool) {
        let _ = self.stop.send(Some(keep_state));
    }

    /// Resolves with `keep_state` when a stop was requested.
    pub async fn stop_requested(&self) -> bool {
        let mut rx = self.stop.subscribe();
        loop {
            if let Some(keep) = *rx.borrow_and_update() {
                return keep;
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Stop capturing the pod's new connections; connections already proxied run to their end.
    pub async fn unenroll(&self, name: &str) -> Result<(), DaemonError> {
        if crate::upgrade::is_draining() {
            // Handed over: the pod's kernel entries are the successor's to change.
            return Err(DaemonError::ShuttingDown);
        }
        let pod = {
            let mut pods = self.pods.lock().expect("pods lock");
            self.links.forget_pod(name);
            let Some(pod) = pods.remove(name) else {
                let e = DaemonError::NotEnrolled(name.to_string());
                drop(pods);
                self.count_refusal(&e);
                return Err(e);
            };
            if let Err(source) = self.kernel.lock().expect("kernel lock").remove_pod(pod.cgroup_id) {
                pods.insert(name.to_string(), pod);
                return Err(DaemonError::Kernel {
                    name: name.to_string(),
                    source,
                });
            }
            self.persist(&pods);
            pod
        };
        self.undo_inbound(name, pod.pod_id, &pod.inbound_keys);
        self.shared.mesh_ips.remove(&pod.addrs);
        if !pod.spec.external_proxy {
            self.shared.mesh_ips.remove_routed(&pod.addrs);
        }
        info!(pod = %name, "unenrolled");
        if let Some(p) = pod.proxy {
            p.stop().await;
        }
        Ok(())
    }

    pub fn status(&self) -> serde_json::Value {
        // Takes the pods and kernel locks itself: before this function holds them.
        let propagation = self.propagation_status();
        let kernel_routes = self.kernel_routes();
        let pods = self.pods.lock().expect("pods lock");
        let conns = self.shared.registry.snapshot();
        let pods_json: Vec<_> = pods
            .values()
            .map(|p| {
                json!({
                    "name": p.spec.name,
                    "pod_id": p.pod_id,
                    "netns": p.spec.netns,
                    "cgroup": p.spec.cgroup,
                    "cgroup_id": p.cgroup_id,
                    "netns_cookie": p.netns_cookie,
                    "external_proxy": p.spec.external_proxy,
                    "capture": p.spec.capture,
                    "inbound_ports": p.spec.inbound_ports,
                    "inbound_all_ports": p.spec.inbound_all_ports,
                    "inbound_exclude_ports": p.spec.inbound_exclude_ports,
                    "colour": p.spec.colour,
                    "colour_id": self.colour_id(&p.spec),
                    "propagate": p.spec.propagate,
                    "listeners": p.proxy.as_ref().map(|x| x.listeners.iter().map(|a| a.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
                    "listener_groups": p.proxy.as_ref().map(|x| x.groups.iter().map(|g| json!({
                        "address": g.addr.to_string(),
                        "direction": if g.dir == Direction::Inbound { "inbound" } else { "outbound" },
                        "members": g.members.len(),
                        "reuseport": g.reuseport(),
                    })).collect::<Vec<_>>()).unwrap_or_default(),
                    "connections_active": p.stats.connections_active.load(Relaxed),
                    "connections_total": p.stats.connections_total.load(Relaxed),
                    "connections_held": p.stats.held.load(Relaxed),
                    "bytes_upstream": p.stats.bytes_upstream.load(Relaxed),
                    "bytes_downstream": p.stats.bytes_downstream.load(Relaxed),
                })
            })
            .collect();
        let kernel = self.kernel.lock().expect("kernel lock");
        let counters: serde_json::Map<String, serde_json::Value> = kernel
            .counters()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        let errors: serde_json::Map<String, serde_json::Value> = self
            .shared
            .errors
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        let accel = self.accel.lock().expect("lock").clone();
        json!({
            "pods": pods_json,
            "connections": conns,
            "counters": counters,
            "proxy_errors": errors,
            "acceleration": { "enabled": accel.enabled, "detail": accel.detail },
            "propagation": propagation,
            "links": self.links.view(&self.policy()),
            "kernel_routes": kernel_routes,
            "kernel": {
                "release": sys::kernel_release(),
                "checks": self.checks.iter().map(|(k, v)| json!({"check": k, "result": v})).collect::<Vec<_>>(),
                "attached": kernel.attached,
            },
            "cgroup_root": self.cgroup_root,
            "open_files": {
                "open": sys::open_fds().ok(),
                "limit": sys::nofile_limit().ok().map(|l| l.0),
                "hard_limit": sys::nofile_limit().ok().map(|l| l.1),
                "per_pod_connection_cap": self.shared.pod_cap.load(Relaxed),
            },
            "uptime_s": self.started.elapsed().as_secs(),
            "generation": crate::upgrade::generation(),
            "upgrade": crate::upgrade::status_json(),
            "workers": self.shared.workers.count(),
            "worker_connections": self.shared.workers.accepted(),
        })
    }

    /// The proxy's handle on kernel colour propagation.
    pub fn colour(&self) -> crate::propagate::ColourKernel {
        self.shared.colour.clone()
    }

    /// `available` or `unavailable: why`, with map entry counts and the hooks' counters.
    fn propagation_status(&self) -> serde_json::Value {
        let colour = &self.shared.colour;
        let (state, available) = match colour.status() {
            Ok(()) => ("available".to_string(), true),
            Err(why) => (format!("unavailable: {why}"), false),
        };
        let (inbound, threads, ledgers) = colour.entry_counts().unwrap_or_default();
        let kernel = self.kernel.lock().expect("kernel lock");
        let counters: serde_json::Map<String, serde_json::Value> = PROPAGATION_REASONS
            .iter()
            .map(|r| {
                (
                    mesh_common::stats::REASON_NAMES[*r as usize].to_string(),
                    kernel.counter(*r).into(),
                )
            })
            .collect();
        json!({
            "available": available,
            "state": state,
            "pods": self.pods.lock().expect("pods lock").values().filter(|p| p.spec.propagate).map(|p| p.spec.name.clone()).collect::<Vec<_>>(),
            "inbound_entries": inbound,
            "thread_entries": threads,
            "ledgers": ledgers,
            "counters": counters,
        })
    }

    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        let pods = self
            .pods
            .lock()
            .expect("pods lock")
            .values()
            .map(|p| PodMetrics {
                name: p.spec.name.clone(),
                connections_total: p.stats.connections_total.load(Relaxed),
                connections_active: p.stats.connections_active.load(Relaxed),
                bytes_upstream: p.stats.bytes_upstream.load(Relaxed),
                bytes_downstream: p.stats.bytes_downstream.load(Relaxed),
            })
            .collect();
        MetricsSnapshot {
            pods,
            kernel: self.kernel.lock().expect("kernel lock").counters(),
            propagation_available: self.shared.colour.status().is_ok(),
            worker_connections: self.shared.workers.accepted(),
            errors: self.shared.errors.snapshot(),
            admin_errors: self
                .admin_errors
                .lock()
                .expect("lock")
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect(),
        }
    }

    /// Whether [`Daemon::shutdown`] has begun (the Kubernetes CNI config guard stops then).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Relaxed)
    }

    /// Phase one: new connects go direct, listeners stop after serving their queue.
    /// Phase two: wait for live connections up to the deadline. Then, unless `keep_state`,
    /// remove the pins and the state file (the links detach when the kernel handle drops).
    /// With `keep_state` the pinned links, maps and enrolment stay for the next daemon; until
    /// it comes, the hooks find no listener and every connect goes direct.
    pub async fn shutdown(&self, keep_state: bool) {
        self.shutting_down.store(true, Relaxed);
        let pods: Vec<EnrolledPod> = std::mem::take(&mut *self.pods.lock().expect("pods lock"))
            .into_values()
            .collect();
        if !keep_state {
            let mut k = self.kernel.lock().expect("kernel lock");
            if let Err(e) = k.disable() {
                warn!("failed to switch capture off before detaching: {e}");
            }
            for p in &pods {
                let _ = k.remove_pod(p.cgroup_id);
            }
        }
        for p in pods {
            if let Some(proxy) = p.proxy {
                proxy.stop().await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(self.cfg.drain_timeout_secs);
        while !self.shared.registry.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.shared.registry.len();
        if left > 0 {
            warn!(
                connections = left,
                "drain deadline passed; closing remaining connections"
            );
        }
        if keep_state {
            info!(pin_dir = %self.cfg.pin_dir.display(), "keeping pinned state for the next daemon");
            return;
        }
        match self.kernel.lock().expect("kernel lock").remove_pins() {
            Ok(removed) => info!(count = removed.len(), "removed pinned links and maps"),
            Err(e) => warn!("failed to remove pins under {}: {e}", self.cfg.pin_dir.display()),
        }
        if let Err(e) = state::remove(&self.cfg.state_file) {
            warn!("failed to remove {}: {e}", self.cfg.state_file.display());
        }
        // Link states go with the enrolment (the cgroups keep their last values).
        let _ = state::remove(&crate::links::state_path(&self.cfg.state_file));
    }

    /// After an upgrade hand-off (the successor accepts from the same listening sockets): stop
    /// accepting, but keep the pods, their kernel entries and this generation's own copies of
    /// the listeners, and wait for the live connections up to the drain deadline, and at least
    /// [`crate::upgrade::STANDBY_AFTER_HANDOFF`] (within the deadline). Returns true
    /// when the hand-off was taken back meanwhile (the successor died,
    /// [`crate::upgrade::taken_back`]): this generation then serves again (see
    /// [`Daemon::serve_again`]); false when the drain is over and it is to exit.
    ///
    /// Keeping the listeners is what makes the take-back work: a listening socket lives as
    /// long as one process holds it, so with the successor dead the accept queues, the
    /// `SM_LISTENERS` sockmap entries sk_lookup redirects to and the outbound listener
    /// connect4's liveness check (`bpf_sk_lookup_tcp`) looks for all stay: capture never falls
    /// back to direct, and connects queue until this generation accepts again.
    pub async fn drain_handed_off(&self) -> bool {
        let proxies: Vec<(String, PodProxy)> = self
            .pods
            .lock()
            .expect("pods lock")
            .iter_mut()
            .filter_map(|(n, p)| p.proxy.take().map(|x| (n.clone(), x)))
            .collect();
        // An older successor (hand-off protocol 2) took member 0 of each group only.
        let single = !crate::upgrade::peer_takes_groups();
        for (name, mut proxy) in proxies {
            let mut groups = std::mem::take(&mut proxy.groups);
            let pod = proxy.pod.clone();
            proxy.stop().await;
            if single {
                self.close_extra_members(&pod, &mut groups);
            }
            self.paused.lock().expect("paused lock").push((name, pod, groups));
        }
        let start = Instant::now();
        let deadline = start + self.drain_timeout();
        let standby = start + crate::upgrade::STANDBY_AFTER_HANDOFF;
        loop {
            if crate::upgrade::taken_back() {
                break;
            }
            let now = Instant::now();
            if (self.shared.registry.is_empty() && now >= standby) || now >= deadline {
                if crate::upgrade::drain_over() {
                    self.restore_migrate_req();
                    let left = self.shared.registry.len();
                    if left > 0 {
                        warn!(
                            connections = left,
                            "drain deadline passed; closing remaining connections"
                        );
                    }
                    return false;
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.restore_migrate_req();
        self.serve_again();
        true
    }

    /// After a hand-off to an older successor (it took member 0 of each listener group only):
    /// close the other members now that this generation stopped accepting on them, with the
    /// pod netns's `net.ipv4.tcp_migrate_req` on (Linux 5.14+), so that the connections in
    /// their accept queues, and handshakes under way, move to a member that stays (member 0,
    /// which the successor accepts on) instead of being reset (`inet_csk_listen_stop` →
    /// `reuseport_migrate_sock`). The setting goes back when this generation is done
    /// ([`Daemon::restore_migrate_req`]).
    fn close_extra_members(&self, pod: &Arc<PodCtx>, groups: &mut [proxy::ListenerGroup]) {
        let extra: usize = groups.iter().map(|g| g.members.len().saturating_sub(1)).sum();
        if extra == 0 {
            return;
        }
        match sys::set_migrate_req(&pod.netns, true) {
            Ok(true) => self
                .migrate_restore
                .lock()
                .expect("migrate lock")
                .push(pod.clone()),
            Ok(false) => {}
            Err(e) => {
                warn!(pod = %pod.name, "net.ipv4.tcp_migrate_req not set: connections queued on the closed listener members are reset: {e}")
            }
        }
        let mut queued = 0;
        for g in groups.iter_mut() {
            for m in g.members.drain(1..) {
                queued += sys::accept_queue_len(&m).unwrap_or(0);
            }
        }
        info!(
            pod = %pod.name,
            members = extra,
            queued,
            "closed the listener members the older successor does not take; their queued connections migrate to member 0"
        );
    }

    /// Set `net.ipv4.tcp_migrate_req` back to off in the pods where
    /// [`Daemon::close_extra_members`] turned it on.
    fn restore_migrate_req(&self) {
        for pod in std::mem::take(&mut *self.migrate_restore.lock().expect("migrate lock")) {
            if let Err(e) = sys::set_migrate_req(&pod.netns, false) {
                warn!(pod = %pod.name, "net.ipv4.tcp_migrate_req not set back: {e}");
            }
        }
    }

    /// Give every pod's listener groups at least `to` members (see [`PodProxy::grow`]); nothing
    /// with `reuseport_listeners = false`. Returns the members added.
    pub(crate) fn grow_listeners(&self, to: usize) -> usize {
        if self.shared.workers.group_size().is_none() {
            return 0;
        }
        let mut pods = self.pods.lock().expect("pods lock");
        pods.values_mut()
            .filter_map(|p| p.proxy.as_mut())
            .map(|x| x.grow(&self.shared, to))
            .sum()
    }

    /// The hand-off was taken back: accept again on the kept listeners, and write this
    /// generation's kernel state again over whatever the successor wrote (pod entries, listener
    /// slots, inbound entries, config, kernel-routed services), the enrolment state file too.
    fn serve_again(&self) {
        let paused = std::mem::take(&mut *self.paused.lock().expect("paused lock"));
        let mut pods = self.pods.lock().expect("pods lock");
        for (name, ctx, groups) in paused {
            let Some(p) = pods.get_mut(&name) else { continue };
            let mut listeners = Vec::new();
            for g in groups {
                let mut members = Vec::new();
                for fd in g.members {
                    let l = std::net::TcpListener::from(fd);
                    match l.set_nonblocking(true) {
                        Ok(()) => members.push(l),
                        Err(e) => warn!(pod = %name, addr = %g.addr, "listener not served again: {e}"),
                    }
                }
                if !members.is_empty() {
                    listeners.push((members, g.dir));
                }
            }
            match proxy::serve(ctx, self.shared.clone(), listeners) {
                Ok(mut x) => {
                    // After an older successor only member 0 of each group is left.
                    if let Some(n) = self.shared.workers.group_size() {
                        x.grow(&self.shared, n);
                    }
                    p.proxy = Some(x)
                }
                Err(e) => warn!(pod = %name, "not accepting again: {e}"),
            }
        }
        {
            let mut k = self.kernel.lock().expect("kernel lock");
            if let Err(e) = k.rewrite_config() {
                warn!("the kernel config was not written again: {e}");
            }
            let ours: Vec<u64> = pods
                .values()
                .filter(|p| p.spec.capture)
                .map(|p| p.cgroup_id)
                .collect();
            for (cg, _) in k.pod_entries() {
                if !ours.contains(&cg) {
                    let _ = k.remove_pod(cg);
                }
            }
            let keys: Vec<InboundKey> = pods.values().flat_map(|p| p.inbound_keys.clone()).collect();
            for (key, _) in k.inbound_entries() {
                if !keys.contains(&key) {
                    k.remove_inbound(&key);
                }
            }
            for p in pods.values() {
                if p.spec.capture {
                    let info = PodInfo::new(
                        p.pod_id,
                        pod_flags(p.spec.propagate, self.colour_id(&p.spec)),
                        p.netns_cookie,
                    );
                    if let Err(e) = k.add_pod(p.cgroup_id, info) {
                        warn!(pod = %p.spec.name, "pod entry not written again: {e}");
                    }
                }
                for g in p.proxy.iter().flat_map(|x| x.groups.iter()) {
                    let Some(m0) = g.members.first() else { continue };
                    if g.dir == Direction::Inbound {
                        let slot = listener_slot(p.pod_id, g.addr.is_ipv6());
                        if let Err(e) = k.set_listener(slot, m0) {
                            warn!(pod = %p.spec.name, addr = %g.addr, "listener slot not written again: {e}");
                        }
                    }
                }
                for key in &p.inbound_keys {
                    let port = key.port as u16;
                    let r = if p.spec.inbound_exclude_ports.contains(&port) {
                        k.add_inbound_exclude(*key)
                    } else {
                        let v6 = key.family == mesh_common::AF_INET6;
                        k.add_inbound(
                            *key,
                            InboundTarget {
                                slot: listener_slot(p.pod_id, v6),
                                pod_id: p.pod_id,
                            },
                        )
                    };
                    if let Err(e) = r {
                        warn!(pod = %p.spec.name, "inbound entry not written again: {e}");
                    }
                }
            }
        }
        self.persist(&pods);
        drop(pods);
        self.write_kernel_routes();
        // The hand-off's stop request is void: the next one (a signal, `stop`) counts.
        self.stop.send_replace(None);
        info!("serving again: the hand-off was taken back");
    }

    /// How long a stopping (or upgraded) daemon waits for its live connections.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.drain_timeout_secs)
    }

    /// Upgrade hand-off (`upgrade/`): each pod's listening sockets (duplicated) with their
    /// place in their group, to pass to the successor: every member (`all`), or member 0 of
    /// each address (an older successor takes one socket per address).
    pub(crate) fn listener_fds(
        &self,
        all: bool,
    ) -> Vec<(String, std::net::SocketAddr, Direction, u32, std::os::fd::OwnedFd)> {
        let pods = self.pods.lock().expect("pods lock");
        let mut out = Vec::new();
        for p in pods.values() {
            for g in p.proxy.iter().flat_map(|x| x.groups.iter()) {
                let n = if all { g.members.len() } else { 1 };
                for (j, fd) in g.members.iter().take(n).enumerate() {
                    match fd.try_clone() {
                        Ok(fd) => out.push((p.spec.name.clone(), g.addr, g.dir, j as u32, fd)),
                        Err(e) => warn!(pod = %p.spec.name, addr = %g.addr, "listener not handed over: {e}"),
                    }
                }
            }
        }
        out
    }

    /// Upgrade hand-off: a pod's proxy context, for a connection the previous generation
    /// handed over.
    pub(crate) fn pod_ctx(&self, name: &str) -> Option<Arc<PodCtx>> {
        let pods = self.pods.lock().expect("pods lock");
        pods.get(name)?.proxy.as_ref().map(|p| p.pod.clone())
    }

    /// Upgrade hand-off: the pods' counters (carried to the successor at the source).
    pub(crate) fn pod_stats(&self) -> Vec<(String, Arc<PodStats>)> {
        let pods = self.pods.lock().expect("pods lock");
        pods.values()
            .map(|p| (p.spec.name.clone(), p.stats.clone()))
            .collect()
    }

    pub(crate) fn proxy_shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn admin_error_counts(&self) -> Vec<(&'static str, u64)> {
        self.admin_errors
            .lock()
            .expect("lock")
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// Add a previous generation's refusals (names outside this binary's set are dropped).
    pub(crate) fn add_admin_errors(&self, name: &str, n: u64) {
        const REASONS: [&str; 9] = [
            "already_enrolled",
            "not_enrolled",
            "bad_name",
            "bad_path",
            "cgroup_taken",
            "system",
            "map_full",
            "kernel",
            "shutting_down",
        ];
        if let Some(r) = REASONS.iter().find(|r| **r == name) {
            if n > 0 {
                *self.admin_errors.lock().expect("lock").entry(r).or_default() += n;
            }
        }
    }

    /// Forward kernel-side log records every 100 ms (`bpf_log = true` only).
    pub async fn forward_bpf_logs(self: Arc<Self>) {
        if !self.cfg.bpf_log {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            self.kernel.lock().expect("kernel lock").flush_logs();
        }
    }

    pub fn admin_socket(&self) -> &Path {
        &self.cfg.admin_socket
    }
}
