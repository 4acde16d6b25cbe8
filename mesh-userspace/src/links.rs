//! Dual links on this node: the cgroup actuator and the switch engine (`sockmesh switch`).
//!
//! - [`actuator`]: a link's CPU/memory knobs on cgroup v2 (`cpu.max`, `cpu.weight`,
//!   `memory.high`) and v1 (`cpu.cfs_quota_us`/`cpu.cfs_period_us`, `cpu.shares`,
//!   `memory.soft_limit_in_bytes`), detected per cgroup directory; written, read back, and
//!   rolled back when the kernel refuses a value.
//! - [`LinkManager`]: each link's state (`active`, `keepalive`, `switching`) and local share,
//!   the pods' link cgroups, and the switch: raise the target's resources and wait until the
//!   kernel shows them → move traffic in steps → lower the former active to keep-alive. The
//!   state is written to `<state_file>.links.json` before every step, so a daemon restarted
//!   (even after `kill -9`) resumes a switch where it was.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::routing::{
    link::{LinkRuntime, LinkState, RawResources, FULL},
    Policy,
};

pub mod actuator {
    //! cgroup file formats. Every function takes the cgroup directory, so tests can use a
    //! scratch directory with the same file names.
    use std::path::{Path, PathBuf};

    use crate::routing::link::RawResources;

    /// The CFS period used for every cap (100 ms, the kernel's default).
    pub const PERIOD_US: u64 = 100_000;

    /// What a cgroup directory is, from the files it has.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        /// cgroup v2 (has `cgroup.controllers`); knobs present only where the controller is on.
        V2,
        /// A v1 `cpu` hierarchy directory.
        V1Cpu,
        /// A v1 `memory` hierarchy directory.
        V1Memory,
    }

    pub fn detect(dir: &Path) -> Result<Kind, String> {
        if !dir.is_dir() {
            return Err(format!("{}: not a directory", dir.display()));
        }
        if dir.join("cgroup.controllers").exists() {
            Ok(Kind::V2)
        } else if dir.join("cpu.cfs_quota_us").exists() {
            Ok(Kind::V1Cpu)
        } else if dir.join("memory.soft_limit_in_bytes").exists() {
            Ok(Kind::V1Memory)
        } else {
            Err(format!(
                "{}: neither a cgroup v2 directory nor a v1 cpu or memory one",
                dir.display()
            ))
        }
    }

    /// CPU percent of one CPU → quota in µs per [`PERIOD_US`].
    pub fn quota_us(cpu_percent: f64) -> u64 {
        (cpu_percent / 100.0 * PERIOD_US as f64).round() as u64
    }

    /// cgroup v2 weight (1..=10000, default 100) → v1 `cpu.shares` (default 1024), linearly as
    /// systemd does (`CPUWeight=` on a v1 host).
    pub fn shares(weight: u32) -> u64 {
        (u64::from(weight) * 1024 / 100).clamp(2, 262_144)
    }

    /// The files to write, in order, for `r` on a directory of `kind`. Knobs the directory does
    /// not have are an error when a value is asked for, and skipped when it is not.
    pub fn plan(dir: &Path, kind: Kind, r: &RawResources) -> Result<Vec<(PathBuf, String)>, String> {
        let mut out = Vec::new();
        let mut add = |file: &str, value: String, asked: bool| -> Result<(), String> {
            let p = dir.join(file);
            if p.exists() {
                out.push((p, value));
                Ok(())
            } else if asked {
                Err(format!(
                    "{}: no {file} (controller not enabled there?)",
                    dir.display()
                ))
            } else {
                Ok(())
            }
        };
        match kind {
            Kind::V2 => {
                let cpu = match r.cpu_percent {
                    Some(c) => format!("{} {PERIOD_US}", quota_us(c)),
                    None => format!("max {PERIOD_US}"),
                };
                add("cpu.max", cpu, r.cpu_percent.is_some())?;
                add(
                    "cpu.weight",
                    r.weight.unwrap_or(100).to_string(),
                    r.weight.is_some(),
                )?;
                let mem = r.memory_high.map_or("max".to_owned(), |m| m.to_string());
                add("memory.high", mem, r.memory_high.is_some())?;
            }
            Kind::V1Cpu => {
                add("cpu.cfs_period_us", PERIOD_US.to_string(), false)?;
                let q = r.cpu_percent.map_or("-1".to_owned(), |c| quota_us(c).to_string());
                add("cpu.cfs_quota_us", q, r.cpu_percent.is_some())?;
                add(
                    "cpu.shares",
                    shares(r.weight.unwrap_or(100)).to_string(),
                    r.weight.is_some(),
                )?;
            }
            Kind::V1Memory => {
                let m = r.memory_high.map_or("-1".to_owned(), |m| m.to_string());
                add("memory.soft_limit_in_bytes", m, r.memory_high.is_some())?;
            }
        }
        Ok(out)
    }

    /// Does the value read back from `file` show `wanted` applied? Memory is rounded down to
    /// pages by the kernel; v1's "no limit" reads back as a huge number.
    pub fn shows(file: &Path, wanted: &str, got: &str) -> bool {
        let got = got.trim();
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("memory.") {
            let huge = |s: &str| s == "max" || s == "-1" || s.parse::<u64>().is_ok_and(|v| v >= 1 << 62);
            if huge(wanted) || huge(got) {
                return huge(wanted) && huge(got);
            }
            return match (wanted.parse::<u64>(), got.parse::<u64>()) {
                (Ok(w), Ok(g)) => g == w / 4096 * 4096 || g == w,
                _ => false,
            };
        }
        got == wanted
    }

    /// Write the plan; on a refusal, restore what was written (in reverse) and say which file
    /// and value the kernel refused.
    pub fn write_all(plan: &[(PathBuf, String)]) -> Result<(), String> {
        let mut done: Vec<(PathBuf, String)> = Vec::new();
        for (p, v) in plan {
            let before = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            if let Err(e) = std::fs::write(p, v) {
                for (q, old) in done.iter().rev() {
                    let _ = std::fs::write(q, restore_form(q, old));
                }
                return Err(format!("the kernel refused {} = {v}: {e}", p.display()));
            }
            done.push((p.clone(), before));
        }
        Ok(())
    }

    /// What to write to put back a value read from `file`.
    fn restore_form(file: &Path, read: &str) -> String {
        let read = read.trim();
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == "memory.soft_limit_in_bytes" && read.parse::<u64>().is_ok_and(|v| v >= 1 << 62) {
            return "-1".into();
        }
        read.to_owned()
    }

    /// The knobs' current values (only the ones the directory has).
    pub fn read(dir: &Path) -> Vec<(String, String)> {
        [
            "cpu.max",
            "cpu.weight",
            "memory.high",
            "cpu.cfs_quota_us",
            "cpu.cfs_period_us",
            "cpu.shares",
            "memory.soft_limit_in_bytes",
        ]
        .iter()
        .filter_map(|f| {
            std::fs::read_to_string(dir.join(f))
                .ok()
                .map(|v| ((*f).to_owned(), v.trim().to_owned()))
        })
        .collect()
    }
}

/// How long a switch resumed by a restarted daemon lets traffic refill its pools before it
/// pre-connects and takes its next step.
pub const RESUME_SETTLE: Duration = Duration::from_millis(500);

/// The longest a switch waits for its pre-connects before traffic moves anyway.
pub const PRECONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// One pool of a switch's pre-connect: the pod, the endpoint, how many connections, and the
/// endpoints whose traffic moves there (how it is spread over the workers).
type Preconnect = (
    Arc<crate::conn::PodCtx>,
    std::net::SocketAddr,
    usize,
    Vec<std::net::SocketAddr>,
);

/// A switch in progress (persisted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchRec {
    pub from: String,
    pub to: String,
    pub steps: u32,
    /// Traffic steps done (0 = resources raised, nothing moved yet).
    pub done: u32,
    pub over_ms: u64,
    pub started_unix_ms: u64,
    /// `--pause`: no further step until `--resume` (or `--abort`); kept across restarts.
    #[serde(default)]
    pub paused: bool,
}

/// What is written to `<state_file>.links.json` before every step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    /// Link → (state, local share in ppm). Links not listed rest in their `initial` state.
    pub links: BTreeMap<String, (LinkState, u32)>,
    pub switch: Option<SwitchRec>,
    /// The link that was active before the last completed switch (`--back`).
    pub previous: Option<String>,
    #[serde(default)]
    pub switches_total: u64,
    #[serde(default)]
    pub last_duration_ms: Option<u64>,
}

impl Persisted {
    /// A link's state and local share (a link not listed rests in its `initial` state).
    fn state_share(&self, l: &crate::routing::link::Link) -> (LinkState, u32) {
        self.links
            .get(&*l.name)
            .copied()
            .unwrap_or((l.initial, l.resting_share(l.initial)))
    }
}

pub struct LinkManager {
    path: PathBuf,
    rt: Arc<LinkRuntime>,
    st: Mutex<Persisted>,
    /// Pod → link → its cgroup directories.
    pods: Mutex<BTreeMap<String, BTreeMap<String, Vec<PathBuf>>>>,
    log: Mutex<VecDeque<String>>,
    abort: AtomicBool,
    errors: Mutex<u64>,
    /// What the last switch pre-connected (`preconnect` in the links view).
    preconnected: Mutex<Option<serde_json::Value>>,
}

/// `<state_file>.links.json`.
pub fn state_path(state_file: &Path) -> PathBuf {
    let mut s = state_file.as_os_str().to_owned();
    s.push(".links.json");
    PathBuf::from(s)
}

impl LinkManager {
    /// Load the saved link states (a missing or unreadable file: every link in its `initial`).
    pub fn new(path: PathBuf, rt: Arc<LinkRuntime>) -> Self {
        let st: Persisted = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for (l, (_, share)) in &st.links {
            rt.set_share(l, *share);
        }
        Self {
            path,
            rt,
            st: Mutex::new(st),
            pods: Mutex::new(BTreeMap::new()),
            log: Mutex::new(VecDeque::new()),
            abort: AtomicBool::new(false),
            errors: Mutex::new(0),
            preconnected: Mutex::new(None),
        }
    }

    fn save(&self, st: &Persisted) {
        let tmp = self.path.with_extension("tmp");
        let r = serde_json::to_vec_pretty(st)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = r {
            warn!("cannot save the link state to {}: {e}", self.path.display());
        }
    }

    fn note(&self, msg: String) {
        info!(target: "sockmesh::links", "{msg}");
        let mut l = self.log.lock().expect("link log");
        if l.len() >= 50 {
            l.pop_front();
        }
        l.push_back(format!("{} {msg}", crate::sys::unix_ms()));
    }

    fn error(&self, msg: String) {
        warn!(target: "sockmesh::links", "{msg}");
        *self.errors.lock().expect("link errors") += 1;
        self.note(format!("error: {msg}"));
    }

    /// A link's state now.
    pub fn state_of(&self, policy: &Policy, link: &str) -> Option<LinkState> {
        let l = policy.links().iter().find(|l| &*l.name == link)?;
        Some(
            self.st
                .lock()
                .expect("link state")
                .links
                .get(link)
                .map_or(l.initial, |e| e.0),
        )
    }

    /// The resources a link's cgroups should have in `state` (switching: active).
    fn resources(policy: &Policy, link: &str, state: LinkState) -> Option<RawResources> {
        let l = policy.links().iter().find(|l| &*l.name == link)?;
        Some(match state {
            LinkState::Keepalive => l.keepalive,
            _ => l.active,
        })
    }

    /// Apply `r` to every cgroup of `link` in the given pods' map (all or nothing), then wait
    /// (up to 2 s) until the kernel shows every value.
    fn apply(dirs: &[PathBuf], r: &RawResources) -> Result<(), String> {
        let mut plans = Vec::new();
        for d in dirs {
            let kind = actuator::detect(d)?;
            plans.extend(actuator::plan(d, kind, r)?);
        }
        // All or nothing across directories: remember everything first.
        let before: Vec<(PathBuf, String)> = plans
            .iter()
            .map(|(p, _)| (p.clone(), std::fs::read_to_string(p).unwrap_or_default()))
            .collect();
        if let Err(e) = actuator::write_all(&plans) {
            // write_all restored its own writes; directories before the failing one too.
            for (p, old) in before.iter().rev() {
                let old = old.trim();
                let v = if p.ends_with("memory.soft_limit_in_bytes")
                    && old.parse::<u64>().is_ok_and(|v| v >= 1 << 62)
                {
                    "-1"
                } else {
                    old
                };
                let _ = std::fs::write(p, v);
            }
            return Err(e);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let pending: Vec<String> = plans
                .iter()
                .filter(|(p, v)| {
                    let got = std::fs::read_to_string(p).unwrap_or_default();
                    !actuator::shows(p, v, &got)
                })
                .map(|(p, v)| format!("{} = {v}", p.display()))
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("the kernel does not show {}", pending.join(", ")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn dirs_of(&self, link: &str) -> Vec<PathBuf> {
        self.pods
            .lock()
            .expect("link pods")
            .values()
            .filter_map(|m| m.get(link))
            .flatten()
            .cloned()
            .collect()
    }

    /// A pod's link cgroups at enrolment: every link must exist in the policy; each gets the
    /// resources of the link's state now. Nothing is kept when the kernel refuses a value.
    pub fn register_pod(
        &self,
        pod: &str,
        links: &BTreeMap<String, Vec<PathBuf>>,
        policy: &Policy,
    ) -> Result<(), String> {
        for (link, dirs) in links {
            let Some(state) = self.state_of(policy, link) else {
                return Err(format!("link `{link}`: the policy has no such link"));
            };
            let r = Self::resources(policy, link, state).expect("link exists");
            Self::apply(dirs, &r).map_err(|e| format!("link `{link}`: {e}"))?;
        }
        if !links.is_empty() {
            self.note(format!(
                "pod {pod}: link cgroups {:?}",
                links.keys().collect::<Vec<_>>()
            ));
        }
        self.pods
            .lock()
            .expect("link pods")
            .insert(pod.to_owned(), links.clone());
        Ok(())
    }

    pub fn forget_pod(&self, pod: &str) {
        self.pods.lock().expect("link pods").remove(pod);
    }

    /// `sockmesh switch --to LINK`: checks, raises the target's resources (refused: nothing
    /// changed), then runs the traffic steps in a task.
    pub fn start(
        self: &Arc<Self>,
        shared: Arc<crate::conn::Shared>,
        to: &str,
        over: Duration,
        steps: u32,
    ) -> Result<serde_json::Value, String> {
        let policy = shared.l7.router.current();
        if policy.links().is_empty() {
            return Err("the policy defines no [[links]]".into());
        }
        let names: Vec<String> = policy.links().iter().map(|l| l.name.to_string()).collect();
        let Some(state) = self.state_of(&policy, to) else {
            return Err(format!("unknown link `{to}` (links: {})", names.join(", ")));
        };
        if !(1..=1000).contains(&steps) {
            return Err("steps must be 1 to 1000".into());
        }
        if over > Duration::from_secs(3600) {
            return Err("--over is at most 1h".into());
        }
        let rec = {
            let mut st = self.st.lock().expect("link state");
            if let Some(s) = &st.switch {
                return Err(format!(
                    "a switch from `{}` to `{}` is in progress ({}/{} steps): wait, or --abort it",
                    s.from, s.to, s.done, s.steps
                ));
            }
            if state == LinkState::Active {
                return Err(format!("link `{to}` is already active"));
            }
            let from = names
                .iter()
                .find(|n| {
                    let l = policy
                        .links()
                        .iter()
                        .find(|l| &*l.name == n.as_str())
                        .expect("listed");
                    st.links.get(*n).map_or(l.initial, |e| e.0) == LinkState::Active
                })
                .cloned()
                .ok_or("no link is active on this node")?;
            // 1. Raise the target's resources and wait until the kernel shows them.
            let r = Self::resources(&policy, to, LinkState::Active).expect("link exists");
            Self::apply(&self.dirs_of(to), &r).map_err(|e| format!("link `{to}`: {e}; nothing changed"))?;
            let rec = SwitchRec {
                from: from.clone(),
                to: to.to_owned(),
                steps,
                done: 0,
                over_ms: over.as_millis() as u64,
                started_unix_ms: crate::sys::unix_ms(),
                paused: false,
            };
            for l in [&from, &to.to_owned()] {
                let share = self.rt.share(l).unwrap_or_else(|| {
                    let x = policy
                        .links()
                        .iter()
                        .find(|x| &*x.name == l.as_str())
                        .expect("link");
                    x.resting_share(x.initial)
                });
                st.links.insert(l.clone(), (LinkState::Switching, share));
            }
            st.switch = Some(rec.clone());
            self.save(&st);
            rec
        };
        self.abort.store(false, Relaxed);
        self.note(format!(
            "switch {} -> {}: resources of {} raised ({}); {} steps over {} ms",
            rec.from,
            rec.to,
            rec.to,
            describe(&Self::resources(&policy, to, LinkState::Active).expect("link")),
            rec.steps,
            rec.over_ms
        ));
        let me = self.clone();
        tokio::spawn(async move { me.run(shared, false).await });
        Ok(json!({ "from": rec.from, "to": rec.to, "steps": rec.steps, "over_ms": rec.over_ms }))
    }

    /// After a restart: go on with a saved switch (raising the target again is harmless).
    pub fn resume(self: &Arc<Self>, shared: Arc<crate::conn::Shared>) {
        let Some(rec) = self.st.lock().expect("link state").switch.clone() else {
            return;
        };
        let policy = shared.l7.router.current();
        if self.state_of(&policy, &rec.to).is_none() || self.state_of(&policy, &rec.from).is_none() {
            warn!("the saved switch names links the policy no longer has: dropped");
            self.st.lock().expect("link state").switch = None;
            return;
        }
        if let Some(r) = Self::resources(&policy, &rec.to, LinkState::Active) {
            if let Err(e) = Self::apply(&self.dirs_of(&rec.to), &r) {
                self.error(format!("resume: raising {}: {e}", rec.to));
            }
        }
        self.note(format!(
            "resuming switch {} -> {} at step {}/{}",
            rec.from, rec.to, rec.done, rec.steps
        ));
        let me = self.clone();
        tokio::spawn(async move { me.run(shared, true).await });
    }

    /// Steps 2 and 3: move traffic, then lower the former active. `resumed`: this process
    /// took the switch over from a previous daemon (its pools are empty, whatever step).
    async fn run(self: Arc<Self>, shared: Arc<crate::conn::Shared>, resumed: bool) {
        let Some(rec) = self.st.lock().expect("link state").switch.clone() else {
            return;
        };
        let policy = shared.l7.router.current();
        let link = |n: &str| policy.links().iter().find(|l| &*l.name == n);
        let (Some(from), Some(to)) = (link(&rec.from), link(&rec.to)) else {
            return;
        };
        let (from_low, to_low) = (from.trickle_ppm, to.trickle_ppm);
        let pause = Duration::from_millis(rec.over_ms / u64::from(rec.steps.max(1)));
        let mut first_pause = pause;
        if resumed {
            // A successor's pools are empty: let the traffic of the step already taken come
            // back through this process, so the pre-connect is sized from it rather than the
            // next steps' requests opening connections one by one. Waits (polling) until the
            // pools show connections, at most until the next step is due (or RESUME_SETTLE).
            let started = tokio::time::Instant::now();
            let limit = pause.max(RESUME_SETTLE);
            while self.preconnect_plan(&shared, &policy, &rec).is_empty() && started.elapsed() < limit {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            first_pause = pause.saturating_sub(started.elapsed());
        }
        if rec.done == 0 || resumed {
            // Resources are raised; before any (more) traffic moves, open the upstream
            // connections the new shares need.
            self.preconnect(&shared, &policy, &rec).await;
        }
        for i in rec.done + 1..=rec.steps {
            if i > 1 || rec.done > 0 {
                let p = if i == rec.done + 1 { first_pause } else { pause };
                tokio::time::sleep(p).await;
            }
            // Paused: wait for --resume or --abort (an operator's decision, so no time limit).
            while !self.abort.load(Relaxed) && self.is_paused() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if self.abort.load(Relaxed) {
                return self.finish_abort(&policy, &rec);
            }
            let i64_ = u64::from(i);
            let n = u64::from(rec.steps);
            let to_share = to_low + ((u64::from(FULL - to_low) * i64_) / n) as u32;
            let from_share = FULL - ((u64::from(FULL - from_low) * i64_) / n) as u32;
            {
                let mut st = self.st.lock().expect("link state");
                // Written before the step takes effect: a successor redoes it at worst.
                st.links
                    .insert(rec.from.clone(), (LinkState::Switching, from_share));
                st.links.insert(rec.to.clone(), (LinkState::Switching, to_share));
                if let Some(s) = st.switch.as_mut() {
                    s.done = i;
                }
                self.save(&st);
            }
            self.rt.set_share(&rec.to, to_share);
            self.rt.set_share(&rec.from, from_share);
            self.note(format!(
                "switch {} -> {}: step {i}/{}: local share {} {:.2} %, {} {:.2} %",
                rec.from,
                rec.to,
                rec.steps,
                rec.to,
                f64::from(to_share) / 1e4,
                rec.from,
                f64::from(from_share) / 1e4
            ));
        }
        if self.abort.load(Relaxed) {
            return self.finish_abort(&policy, &rec);
        }
        // 3. Lower the former active link to keep-alive.
        if let Err(e) = Self::apply(&self.dirs_of(&rec.from), &from.keepalive) {
            self.error(format!("lowering {} to keep-alive: {e}", rec.from));
        }
        let took = crate::sys::unix_ms().saturating_sub(rec.started_unix_ms);
        {
            let mut st = self.st.lock().expect("link state");
            st.links
                .insert(rec.from.clone(), (LinkState::Keepalive, from_low));
            st.links.insert(rec.to.clone(), (LinkState::Active, FULL));
            st.switch = None;
            st.previous = Some(rec.from.clone());
            st.switches_total += 1;
            st.last_duration_ms = Some(took);
            self.save(&st);
        }
        self.rt.set_share(&rec.from, from_low);
        self.rt.set_share(&rec.to, FULL);
        self.note(format!(
            "switch {} -> {} done in {took} ms: {} keep-alive ({})",
            rec.from,
            rec.to,
            rec.from,
            describe(&from.keepalive)
        ));
    }

    /// Open, before traffic moves, the upstream HTTP/1.1 connections the switch's new shares
    /// will need, sized from the demand now (the pools are per (pod, endpoint); the demand is
    /// the larger of the connections held and the app connections sending there, each of
    /// which may send at once, [`crate::l7::http::HttpPools::h1_demand`]):
    ///
    /// - the target link: each pod that delivers to a local endpoint of its services (the
    ///   trickle keeps such a pool open) or has such an endpoint on one of its own addresses
    ///   gets as many connections to it as the pod has to all the service's endpoints (the
    ///   moved traffic's connections will be needed locally);
    /// - the former active link: each pod that delivers locally gets, to each endpoint
    ///   elsewhere, its share of the connections it has to the service now;
    /// - both plus half again, for app connections that open after the count;
    /// - spread over the workers as the demand is ([`crate::l7::http::HttpPools::preconnect_h1`]).
    ///
    /// At most the link's `preconnect` per (pod, endpoint), concurrently, bounded by
    /// [`PRECONNECT_TIMEOUT`]; failures are counted and logged, never fatal (a request then
    /// opens its own connection as before).
    async fn preconnect(&self, shared: &Arc<crate::conn::Shared>, policy: &Policy, rec: &SwitchRec) {
        let started = std::time::Instant::now();
        let plan = self.preconnect_plan(shared, policy, rec);
        if plan.is_empty() {
            self.note(format!(
                "switch {} -> {}: nothing to pre-connect (no pooled connection to size from)",
                rec.from, rec.to
            ));
            return;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (pod, ep, want, size_from) in plan {
            let shared = shared.clone();
            tasks.spawn(async move {
                let r = shared
                    .l7
                    .http
                    .preconnect_h1(&shared, &pod, ep, want, &size_from, PRECONNECT_TIMEOUT)
                    .await;
                (pod.name.clone(), ep, want, r)
            });
        }
        let (mut opened, mut failed) = (0usize, 0usize);
        let mut per = Vec::new();
        let deadline = tokio::time::Instant::now() + PRECONNECT_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(Ok((pod, ep, want, r)))) => {
                    let n = match r {
                        Ok(n) => n,
                        Err(e) => {
                            failed += 1;
                            warn!(target: "sockmesh::links", "pre-connect {pod} -> {ep}: {e}");
                            0
                        }
                    };
                    opened += n;
                    per.push(json!({ "pod": pod, "endpoint": ep.to_string(), "pooled_at_least": want, "opened": n }));
                }
                Ok(Some(Err(_))) => failed += 1,
                Ok(None) => break,
                Err(_) => {
                    failed += tasks.len();
                    tasks.abort_all();
                    break;
                }
            }
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        self.note(format!(
            "switch {} -> {}: {opened} upstream connection(s) pre-connected in {ms:.1} ms ({failed} failed) before traffic moves",
            rec.from, rec.to
        ));
        *self.preconnected.lock().expect("preconnect") = Some(json!({
            "from": rec.from, "to": rec.to, "opened": opened, "failed": failed,
            "ms": (ms * 10.0).round() / 10.0, "pools": per,
        }));
    }

    /// The (pod, endpoint, connections, endpoints sized from) the switch's pre-connect opens (see [`Self::preconnect`]).
    fn preconnect_plan(
        &self,
        shared: &Arc<crate::conn::Shared>,
        policy: &Policy,
        rec: &SwitchRec,
    ) -> Vec<Preconnect> {
        let mut plan: Vec<Preconnect> = Vec::new();
        for (name, target) in [(&rec.to, true), (&rec.from, false)] {
            let Some(l) = policy.links().iter().find(|l| &*l.name == name.as_str()) else {
                continue;
            };
            let max = l.preconnect as usize;
            if max == 0 {
                continue;
            }
            for (k, &si) in l.services.iter().enumerate() {
                let all = policy.service_endpoints(si);
                let is_local = |a: &std::net::SocketAddr| shared.mesh_ips.contains(a.ip());
                let remote: Vec<_> = l.elsewhere(k).iter().filter(|a| !is_local(a)).copied().collect();
                let mut known = all.clone();
                known.extend(remote.iter().copied().filter(|a| !all.contains(a)));
                let counts = shared.l7.http.h1_demand(&known);
                // Per pod: its connections to the service, and the local endpoints it delivers to.
                let mut pods: BTreeMap<String, (Arc<crate::conn::PodCtx>, usize, Vec<std::net::SocketAddr>)> =
                    BTreeMap::new();
                for (pod, ep, n) in counts {
                    let e = pods
                        .entry(pod.name.clone())
                        .or_insert_with(|| (pod.clone(), 0, Vec::new()));
                    e.1 += n;
                    if is_local(&ep) {
                        e.2.push(ep);
                    }
                }
                for (pod, total, mut locals) in pods.into_values() {
                    if target && total > 0 {
                        // The service's endpoints in this pod itself: where its inbound
                        // requests will be delivered, even when no trickle kept a pool open
                        // (trickle 0, or idle longer than the pools keep connections).
                        let own = crate::sys::local_addrs_in(&pod.netns).unwrap_or_default();
                        for ep in &all {
                            if own.contains(&ep.ip()) && !locals.contains(ep) {
                                locals.push(*ep);
                            }
                        }
                    }
                    if locals.is_empty() || total == 0 {
                        continue;
                    }
                    // Half again for app connections that open after the count.
                    let total = total + total.div_ceil(2);
                    if target {
                        for ep in locals {
                            plan.push((pod.clone(), ep, total.min(max), known.clone()));
                        }
                    } else if !remote.is_empty() {
                        let each = total.div_ceil(remote.len()).min(max);
                        for ep in &remote {
                            plan.push((pod.clone(), *ep, each, known.clone()));
                        }
                    }
                }
            }
        }
        plan
    }

    fn finish_abort(&self, policy: &Policy, rec: &SwitchRec) {
        let low = |n: &str| {
            policy
                .links()
                .iter()
                .find(|l| &*l.name == n)
                .map_or(0, |l| l.trickle_ppm)
        };
        self.rt.set_share(&rec.from, FULL);
        self.rt.set_share(&rec.to, low(&rec.to));
        if let Some(r) = Self::resources(policy, &rec.to, LinkState::Keepalive) {
            if let Err(e) = Self::apply(&self.dirs_of(&rec.to), &r) {
                self.error(format!("abort: lowering {} again: {e}", rec.to));
            }
        }
        let mut st = self.st.lock().expect("link state");
        st.links.insert(rec.from.clone(), (LinkState::Active, FULL));
        st.links
            .insert(rec.to.clone(), (LinkState::Keepalive, low(&rec.to)));
        st.switch = None;
        self.save(&st);
        drop(st);
        self.note(format!(
            "switch {} -> {} aborted: {} active again",
            rec.from, rec.to, rec.from
        ));
    }

    /// `--abort`: stop at the next step and go back to the state before the switch.
    pub fn abort(&self) -> Result<serde_json::Value, String> {
        let st = self.st.lock().expect("link state");
        let Some(s) = &st.switch else {
            return Err("no switch in progress".into());
        };
        self.abort.store(true, Relaxed);
        Ok(json!({ "aborting": format!("{} -> {}", s.from, s.to) }))
    }

    fn is_paused(&self) -> bool {
        self.st
            .lock()
            .expect("link state")
            .switch
            .as_ref()
            .is_some_and(|s| s.paused)
    }

    /// `--pause` (true) / `--resume` (false) the switch in progress between two steps.
    pub fn set_paused(&self, paused: bool) -> Result<serde_json::Value, String> {
        let mut st = self.st.lock().expect("link state");
        let Some(s) = st.switch.as_mut() else {
            return Err("no switch in progress".into());
        };
        if s.paused == paused {
            return Err(format!(
                "the switch is already {}",
                if paused { "paused" } else { "running" }
            ));
        }
        s.paused = paused;
        let what = format!(
            "switch {} -> {} {} at step {}/{}",
            s.from,
            s.to,
            if paused { "paused" } else { "resumed" },
            s.done,
            s.steps
        );
        self.save(&st);
        drop(st);
        self.note(what.clone());
        Ok(json!({ "done": what }))
    }

    /// The link `--back` switches to.
    pub fn previous(&self) -> Option<String> {
        self.st.lock().expect("link state").previous.clone()
    }

    /// Links, switch progress, applied limits (read back now), counters and the step log.
    pub fn view(&self, policy: &Policy) -> serde_json::Value {
        let st = self.st.lock().expect("link state").clone();
        let pods = self.pods.lock().expect("link pods").clone();
        let links: Vec<_> = policy
            .links()
            .iter()
            .map(|l| {
                let (state, share) = st.state_share(l);
                let cgroups: Vec<_> = pods
                    .iter()
                    .flat_map(|(pod, m)| {
                        m.get(&*l.name).into_iter().flatten().map(move |d| {
                            // v1's "no limit" is a page-rounded i64::MAX: shown as "max".
                            let knobs: serde_json::Map<_, _> = actuator::read(d)
                                .into_iter()
                                .map(|(k, v)| {
                                    let huge = k.starts_with("memory.")
                                        && v.parse::<u64>().is_ok_and(|n| n >= 1 << 62);
                                    (k, serde_json::Value::from(if huge { "max".into() } else { v }))
                                })
                                .collect();
                            json!({ "pod": pod, "path": d, "applied": knobs })
                        })
                    })
                    .collect();
                json!({
                    "name": &*l.name,
                    "state": state.label(),
                    "local_share_percent": f64::from(share) / 1e4,
                    "trickle_percent": f64::from(l.trickle_ppm) / 1e4,
                    "trickle_per_second": l.trickle_rate,
                    "keepalive": l.keepalive,
                    "active": l.active,
                    "cgroups": cgroups,
                })
            })
            .collect();
        let switch = st.switch.as_ref().map(|s| {
            json!({
                "from": s.from, "to": s.to, "steps": s.steps, "done": s.done,
                "over_ms": s.over_ms,
                "paused": s.paused,
                "elapsed_ms": crate::sys::unix_ms().saturating_sub(s.started_unix_ms),
            })
        });
        json!({
            "links": links,
            "switch": switch,
            "previous": st.previous,
            "switches_total": st.switches_total,
            "last_switch_ms": st.last_duration_ms,
            "errors_total": *self.errors.lock().expect("link errors"),
            "preconnect": self.preconnected.lock().expect("preconnect").clone(),
            "requests": policy.link_counts(),
            "log": self.log.lock().expect("link log").iter().cloned().collect::<Vec<_>>(),
        })
    }

    /// What `/metrics` shows of the links (encoded by `metrics.rs`); empty when the policy
    /// defines no links.
    pub fn metric_rows(&self, policy: &Policy) -> LinkMetrics {
        if policy.links().is_empty() {
            return LinkMetrics::default();
        }
        let st = self.st.lock().expect("link state").clone();
        let pods = self.pods.lock().expect("link pods").clone();
        let links = policy
            .links()
            .iter()
            .map(|l| {
                let (state, share) = st.state_share(l);
                let applied = pods
                    .iter()
                    .flat_map(|(pod, m)| {
                        m.get(&*l.name)
                            .into_iter()
                            .flatten()
                            .map(move |d| (pod.clone(), AppliedLimits::parse(&actuator::read(d))))
                    })
                    .collect();
                LinkRow {
                    name: l.name.to_string(),
                    state,
                    local_share: f64::from(share) / f64::from(FULL),
                    trickle_share: f64::from(l.trickle_ppm) / f64::from(FULL),
                    trickle_per_second: l.trickle_rate,
                    applied,
                }
            })
            .collect();
        LinkMetrics {
            links,
            requests: policy.link_counts(),
            progress: st
                .switch
                .as_ref()
                .map(|s| f64::from(s.done) / f64::from(s.steps.max(1))),
            switches_total: st.switches_total,
            last_switch_seconds: st.last_duration_ms.map(|ms| ms as f64 / 1000.0),
            errors_total: *self.errors.lock().expect("link errors"),
        }
    }
}

/// The links' metrics at one scrape ([`LinkManager::metric_rows`]).
#[derive(Debug, Default, Clone)]
pub struct LinkMetrics {
    pub links: Vec<LinkRow>,
    pub requests: Vec<crate::routing::link::LinkCount>,
    /// Steps done / steps of the switch in progress.
    pub progress: Option<f64>,
    pub switches_total: u64,
    pub last_switch_seconds: Option<f64>,
    pub errors_total: u64,
}

#[derive(Debug, Clone)]
pub struct LinkRow {
    pub name: String,
    pub state: LinkState,
    pub local_share: f64,
    /// The keep-alive share setting (0 with a rate trickle).
    pub trickle_share: f64,
    pub trickle_per_second: Option<f64>,
    /// Per pod cgroup of the link: the limits read back from the kernel now.
    pub applied: Vec<(String, AppliedLimits)>,
}

/// A link cgroup's limits as the kernel shows them (v2 or v1 files); `None`: unlimited, or
/// the file is absent.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AppliedLimits {
    /// CPU cap in CPUs (`cpu.max` quota / period; v1 `cfs_quota_us` / `cfs_period_us`).
    pub cpus: Option<f64>,
    /// `cpu.weight` (v2) or `cpu.shares` (v1), as the kernel reports it.
    pub weight: Option<u64>,
    /// `memory.high` (v2) or `memory.soft_limit_in_bytes` (v1), bytes.
    pub memory_high: Option<u64>,
}

impl AppliedLimits {
    /// From [`actuator::read`]'s (file, value) pairs.
    pub fn parse(knobs: &[(String, String)]) -> Self {
        let get = |f: &str| knobs.iter().find(|(k, _)| k == f).map(|(_, v)| v.as_str());
        let num = |f: &str| get(f).and_then(|v| v.parse::<u64>().ok());
        let cpus = match get("cpu.max") {
            Some(v) => v.split_once(' ').and_then(|(q, p)| {
                Some(q.parse::<f64>().ok()? / p.parse::<f64>().ok().filter(|p| *p > 0.0)?)
            }),
            None => get("cpu.cfs_quota_us")
                .and_then(|q| q.parse::<f64>().ok())
                .filter(|q| *q >= 0.0)
                .zip(num("cpu.cfs_period_us").filter(|p| *p > 0))
                .map(|(q, p)| q / p as f64),
        };
        Self {
            cpus,
            weight: num("cpu.weight").or_else(|| num("cpu.shares")),
            // v1's "unlimited" is a page-rounded i64::MAX.
            memory_high: num("memory.high")
                .or_else(|| num("memory.soft_limit_in_bytes"))
                .filter(|m| *m < 1 << 62),
        }
    }
}

fn describe(r: &RawResources) -> String {
    format!(
        "cpu {}, weight {}, memory.high {}",
        r.cpu_percent.map_or("max".into(), |c| format!("{c} %")),
        r.weight.map_or("default".into(), |w| w.to_string()),
        r.memory_high.map_or("max".into(), |m| m.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::actuator::*;
    use super::*;

    fn scratch(files: &[(&str, &str)]) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "sockmesh-links-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for (f, v) in files {
            std::fs::write(d.join(f), v).unwrap();
        }
        d
    }

    const KEEP: RawResources = RawResources {
        cpu_percent: Some(1.0),
        weight: Some(1),
        memory_high: Some(64 << 20),
    };

    #[test]
    fn v2_and_v1_files_get_the_right_values() {
        let v2 = scratch(&[
            ("cgroup.controllers", "cpu memory"),
            ("cpu.max", "max 100000"),
            ("cpu.weight", "100"),
            ("memory.high", "max"),
        ]);
        assert_eq!(detect(&v2).unwrap(), Kind::V2);
        let plan = plan(&v2, Kind::V2, &KEEP).unwrap();
        let vals: Vec<_> = plan
            .iter()
            .map(|(p, v)| (p.file_name().unwrap().to_str().unwrap(), v.as_str()))
            .collect();
        assert_eq!(
            vals,
            [
                ("cpu.max", "1000 100000"),
                ("cpu.weight", "1"),
                ("memory.high", "67108864")
            ]
        );
        let cpu = scratch(&[
            ("cpu.cfs_quota_us", "-1"),
            ("cpu.cfs_period_us", "100000"),
            ("cpu.shares", "1024"),
        ]);
        assert_eq!(detect(&cpu).unwrap(), Kind::V1Cpu);
        let p = super::actuator::plan(&cpu, Kind::V1Cpu, &KEEP).unwrap();
        let vals: Vec<_> = p
            .iter()
            .map(|(p, v)| (p.file_name().unwrap().to_str().unwrap(), v.as_str()))
            .collect();
        assert_eq!(
            vals,
            [
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "1000"),
                ("cpu.shares", "10")
            ]
        );
        // Unlimited: -1 and the default shares.
        let p = super::actuator::plan(&cpu, Kind::V1Cpu, &RawResources::default()).unwrap();
        assert_eq!(p[1].1, "-1");
        assert_eq!(p[2].1, "1024");
        let mem = scratch(&[("memory.soft_limit_in_bytes", "9223372036854771712")]);
        assert_eq!(detect(&mem).unwrap(), Kind::V1Memory);
        assert_eq!(
            super::actuator::plan(&mem, Kind::V1Memory, &KEEP).unwrap()[0].1,
            "67108864"
        );
        // A v2 directory without the cpu controller cannot take a cap.
        let bare = scratch(&[("cgroup.controllers", "hugetlb")]);
        let e = super::actuator::plan(&bare, Kind::V2, &KEEP).unwrap_err();
        assert!(e.contains("no cpu.max"), "{e}");
        assert!(super::actuator::plan(&bare, Kind::V2, &RawResources::default())
            .unwrap()
            .is_empty());
        assert!(detect(&scratch(&[])).is_err());
        for d in [v2, cpu, mem, bare] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn read_back_rounds_memory_and_knows_unlimited() {
        let f = Path::new("/x/memory.high");
        assert!(shows(f, "67108865", "67108864"));
        assert!(shows(f, "max", "max\n"));
        let s = Path::new("/x/memory.soft_limit_in_bytes");
        assert!(shows(s, "-1", "9223372036854771712"));
        assert!(!shows(s, "-1", "4096"));
        assert!(shows(Path::new("/x/cpu.max"), "1000 100000", "1000 100000\n"));
        assert!(!shows(Path::new("/x/cpu.cfs_quota_us"), "1000", "-1"));
        assert_eq!(shares(100), 1024);
        assert_eq!(shares(10_000), 102_400);
        assert_eq!(shares(1), 10);
        assert_eq!(quota_us(1.0), 1000);
        assert_eq!(quota_us(0.5), 500);
    }

    #[test]
    fn a_refused_write_restores_what_was_written() {
        let d = scratch(&[("cpu.cfs_period_us", "100000"), ("cpu.shares", "1024")]);
        // A read-only kernel file stands in for a knob that refuses the value (EACCES even
        // for root).
        std::os::unix::fs::symlink("/proc/sys/kernel/osrelease", d.join("cpu.cfs_quota_us")).unwrap();
        let plan = vec![
            (d.join("cpu.shares"), "10".to_owned()),
            (d.join("cpu.cfs_quota_us"), "1000".to_owned()),
        ];
        let e = write_all(&plan).unwrap_err();
        assert!(e.contains("cpu.cfs_quota_us = 1000"), "{e}");
        assert_eq!(std::fs::read_to_string(d.join("cpu.shares")).unwrap(), "1024");
        std::fs::remove_dir_all(d).unwrap();
    }

    const CONFIG: &str = r#"
        cgroup_root = "/sys/fs/cgroup/x"
        [[services]]
        name = "checkout"
        addresses = ["10.96.0.1:80"]
        endpoints = [{ address = "10.0.0.1:8001" }]
        [[links]]
        name = "trade"
        services = ["checkout"]
        initial = "active"
        [[pods]]
        name = "a"
        netns = "/run/netns/a"
        cgroup = "/sys/fs/cgroup/x/a"
        links = { trade = ["/sys/fs/cgroup/cpu/a/trade", "/sys/fs/cgroup/memory/a/trade"] }
    "#;

    #[test]
    fn config_takes_links_and_pod_link_cgroups() {
        let c = crate::config::parse(CONFIG).unwrap();
        assert_eq!(c.routing.links.len(), 1);
        assert_eq!(
            c.routing.links[0].trickle_percent, None,
            "the default share applies"
        );
        assert_eq!(c.routing.links[0].keepalive.cpu_percent, Some(1.0));
        assert_eq!(c.pods[0].links["trade"].len(), 2);
        let field = |text: String| crate::config::parse(&text).unwrap_err().field;
        assert_eq!(
            field(CONFIG.replace("links = { trade", "links = { forest")),
            "pods[0].links.forest"
        );
        assert_eq!(
            field(CONFIG.replace("[\"/sys/fs/cgroup/cpu/a/trade\", ", "[\"rel\", ")),
            "pods[0].links.trade"
        );
        assert_eq!(
            field(CONFIG.replace("initial = \"active\"", "trickle_percent = -1")),
            "links[0].trickle_percent"
        );
    }

    #[test]
    fn switch_requests_have_a_stable_wire_form() {
        let r: crate::admin::Request =
            serde_json::from_str(r#"{"op":"switch","to":"forest","over_ms":2000,"steps":4}"#).unwrap();
        assert_eq!(
            r,
            crate::admin::Request::Switch {
                to: Some("forest".into()),
                back: false,
                abort: false,
                pause: false,
                resume: false,
                over_ms: 2000,
                steps: 4
            }
        );
        let view: crate::admin::Request = serde_json::from_str(r#"{"op":"switch"}"#).unwrap();
        assert!(matches!(
            view,
            crate::admin::Request::Switch {
                to: None,
                steps: 1,
                ..
            }
        ));
    }

    #[test]
    fn the_links_view_renders_states_limits_and_progress() {
        let v = serde_json::json!({
            "links": [
                { "name": "trade", "state": "switching", "local_share_percent": 76.25, "trickle_percent": 5.0,
                  "cgroups": [{ "pod": "app", "path": "/c/trade", "applied": { "cpu.cfs_quota_us": "100000" } }] },
                { "name": "forest", "state": "switching", "local_share_percent": 28.75, "trickle_percent": 5.0, "cgroups": [] },
            ],
            "switch": { "from": "trade", "to": "forest", "steps": 4, "done": 2, "over_ms": 4000, "elapsed_ms": 1500 },
            "requests": [{ "service": "game", "link": "forest", "outcome": "moved", "requests": 7 }],
            "log": ["1 a", "1796653800508 b"],
        });
        let text = crate::status::render_links(&v);
        assert!(text.contains("trade   switching  76.25 %"), "{text}");
        assert!(text.contains("app: cpu.cfs_quota_us=100000"), "{text}");
        assert!(
            text.contains("[###############...............] 2/4 steps, 1500 ms of 4000 ms"),
            "{text}"
        );
        assert!(text.contains("game     forest  moved    7"), "{text}");
        assert!(text.contains("| 14:30:00.508 b"), "times in UTC: {text}");
    }

    #[test]
    fn state_file_round_trips_a_switch_in_progress() {
        let p = std::env::temp_dir().join(format!("sockmesh-links-state-{}.json", std::process::id()));
        let rt = Arc::new(LinkRuntime::default());
        let m = LinkManager::new(p.clone(), rt.clone());
        let mut st = Persisted::default();
        st.links.insert("trade".into(), (LinkState::Switching, 400_000));
        st.switch = Some(SwitchRec {
            from: "trade".into(),
            to: "forest".into(),
            steps: 5,
            done: 3,
            over_ms: 5000,
            started_unix_ms: 1,
            paused: true,
        });
        m.save(&st);
        let rt2 = Arc::new(LinkRuntime::default());
        let m2 = LinkManager::new(p.clone(), rt2.clone());
        assert_eq!(*m2.st.lock().unwrap(), st);
        assert_eq!(rt2.share("trade"), Some(400_000));
        std::fs::remove_file(p).unwrap();
    }
}
