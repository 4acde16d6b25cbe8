//! The only module that talks to aya: load the embedded object, attach the hooks at the cgroup
//! root with bpf links (multi-attach, so a CNI's programs keep working), and give the rest of the
//! daemon typed access to the maps. Dropping [`Kernel`] detaches everything it attached.

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, SockHash, SockMap},
    programs::{
        links::{FdLink, PinnedLink},
        BtfTracePoint, CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SkSkb, SockOps,
    },
    Btf, Ebpf, EbpfLoader,
};
use mesh_common::{
    colour::{port_bit, InboundColourKey, Ledger},
    config::{MeshConfig, FLAG_ACCELERATE, FLAG_ENABLED, FLAG_LOG, FLAG_PROPAGATE},
    flow::{ip_to_words, ConnTuple},
    inbound::{InboundKey, InboundTarget},
    maps::{self as m, progs},
    pods::PodInfo,
    service::{self as svc, SvcEndpoint, SvcEntry, SvcKey},
    stats::{reason, REASON_NAMES},
};
use thiserror::Error;

use crate::config::Cidr;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

#[derive(Debug, Error)]
pub enum KernelError {
    #[error(
        "the eBPF object is not embedded in this build: run `cargo xtask build-ebpf`, then rebuild sockmesh"
    )]
    NoObject,
    #[error("failed to load the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no map `{0}` (object and daemon out of step: rebuild both)")]
    MissingMap(&'static str),
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("failed to load `{hook}` into the kernel (kernel too old or feature missing?): {source}")]
    ProgramLoad {
        hook: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("failed to attach `{hook}` to {target}: {source}")]
    Attach {
        hook: &'static str,
        target: String,
        source: aya::programs::ProgramError,
    },
    #[error("failed to open cgroup {path}: {source}")]
    Cgroup { path: String, source: std::io::Error },
    #[error("map `{name}` is full ({max} entries)")]
    Full { name: &'static str, max: u32 },
    #[error("failed to create pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: std::io::Error },
    #[error("failed to pin {path}: {source}")]
    Pin {
        path: String,
        source: aya::pin::PinError,
    },
    #[error("failed to adopt the pinned link {path}: {source}")]
    Adopt {
        path: String,
        source: aya::programs::links::LinkError,
    },
    #[error("failed to attach `{hook}` with a pinned bpf link: {source}")]
    RawLink {
        hook: &'static str,
        source: std::io::Error,
    },
    #[error("the attachment is not a bpf link (kernel without cgroup bpf links?): {0}")]
    NotALink(aya::programs::links::LinkError),
    #[error("pinned state in {pin_dir} has ABI version {found}, this daemon speaks {}: run `sockmesh uninstall` first", mesh_common::ABI_VERSION)]
    AbiMismatch { pin_dir: String, found: u32 },
}

/// What the daemon asks of the kernel side.
pub struct KernelOptions<'a> {
    pub cgroup_root: &'a Path,
    /// The cgroup v2 mount `cgroup_root` is under (for its level).
    pub cgroup_mount: &'a Path,
    /// bpffs directory holding `maps/` and `links/`.
    pub pin_dir: &'a Path,
    pub outbound_port: u16,
    pub daemon_mark: u32,
    pub accelerate: bool,
    pub accel_max_msg: u32,
    pub accel_flow_budget: u64,
    pub bpf_log: bool,
    /// Try to attach the colour propagation hooks (never fatal: see [`Kernel::colour`]).
    pub propagation: bool,
}

/// How the kernel state was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Nothing was pinned: programs loaded, attached and pinned now.
    Fresh,
    /// A previous daemon's pinned links and maps were re-adopted (no detach, no new programs).
    Adopted,
}

pub struct Kernel {
    /// Owns the programs this daemon loaded (none when every link was adopted).
    bpf: Ebpf,
    config_map: Array<MapData, MeshConfig>,
    pods: HashMap<MapData, u64, PodInfo>,
    bypass_cidrs: LpmTrie<MapData, [u32; 4], u32>,
    bypass_ports: HashMap<MapData, u32, u32>,
    stats: PerCpuArray<MapData, u64>,
    socks: SockHash<MapData, ConnTuple>,
    inbound: HashMap<MapData, InboundKey, InboundTarget>,
    inbound_exclude: HashMap<MapData, InboundKey, u32>,
    listeners: SockMap<MapData>,
    /// `sk_lookup` links per pod netns, by pod name.
    netns_links: std::collections::BTreeMap<String, (PathBuf, PinnedLink)>,
    sk_lookup_loaded: bool,
    config: MeshConfig,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    links: Vec<(PathBuf, PinnedLink)>,
    pin_dir: PathBuf,
    /// Colour propagation: the proxy's handle on its maps, or why it is unavailable.
    colour: ColourKernel,
    pub origin: Origin,
    /// Hooks attached, for status ("sm_connect4 -> /sys/fs/cgroup/...").
    pub attached: Vec<String>,
    /// The kernel-routed services' tables (`SM_SVC`, `SM_SVC_EP`, `SM_SVC_COUNT`).
    pub services: ServiceTables,
}

macro_rules! take_map {
    ($bpf:expr, $name:expr, $ty:ty) => {{
        let map = $bpf.take_map($name).ok_or(KernelError::MissingMap($name))?;
        <$ty>::try_from(map).map_err(|source| KernelError::Map { name: $name, source })?
    }};
}

/// `<pin_dir>/maps` and `<pin_dir>/links`.
pub fn pin_paths(pin_dir: &Path) -> (PathBuf, PathBuf) {
    (pin_dir.join("maps"), pin_dir.join("links"))
}

/// The bpffs file name of a pod's pinned `sk_lookup` link. bpffs refuses names holding `.`
/// (EPERM: reserved), and Kubernetes pod names usually hold dots, so such a name is pinned as
/// its dots turned into `_` plus a hash of the whole name (`a.b` and `a_b` stay apart). A name
/// without dots keeps the plain `sk_lookup-<pod>` that earlier daemons pinned, so their pins
/// are re-adopted. The pod keeps its real name everywhere else (status, metrics, state).
pub fn netns_pin_name(pod: &str) -> String {
    if !pod.contains('.') {
        return format!("sk_lookup-{pod}");
    }
    // FNV-1a 64: stable across builds and releases (std's hasher is not).
    let hash = pod.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("sk_lookup-{}-{hash:016x}", pod.replace('.', "_"))
}

/// True when a previous daemon left pinned links in `pin_dir`.
pub fn has_pinned_state(pin_dir: &Path) -> bool {
    let (_, links) = pin_paths(pin_dir);
    std::fs::read_dir(links)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Remove everything under `pin_dir`: dropping the last reference to a link detaches it, and
/// maps go with their last user. Returns what was removed. Works without the object.
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut removed = Vec::new();
    let (maps, links) = pin_paths(pin_dir);
    for dir in [&links, &maps] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                std::fs::remove_file(e.path())?;
                removed.push(e.path().display().to_string());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => removed.push(pin_dir.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(removed)
}

impl Kernel {
    /// Load the object with every map pinned under `pin_dir` (reusing pinned maps), and make
    /// sure every cgroup hook is attached at `opts.cgroup_root` through a pinned link: links a
    /// previous daemon pinned are adopted as they are, missing ones are attached and pinned.
    pub fn load(opts: &KernelOptions<'_>) -> Result<Self, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        let (maps_dir, links_dir) = pin_paths(opts.pin_dir);
        for d in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(d).map_err(|source| KernelError::PinDir {
                path: d.clone(),
                source,
            })?;
        }
        let origin = if has_pinned_state(opts.pin_dir) {
            Origin::Adopted
        } else {
            Origin::Fresh
        };
        // aya-log's level: 0 turns every log statement in the programs into one skipped branch.
        let log_level: u8 = if opts.bpf_log { 0xff } else { 0 };
        let map_paths: Vec<(&'static str, PathBuf)> =
            m::PINNED.iter().map(|n| (*n, maps_dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        loader.override_global("AYA_LOG_LEVEL", &log_level, false);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut bpf = loader.load(OBJECT).map_err(KernelError::Load)?;
        let config_map = take_map!(bpf, m::CONFIG, Array<MapData, MeshConfig>);
        // A pinned config from another ABI means maps of another shape: refuse to mix them.
        if let Ok(old) = config_map.get(&0, 0) {
            if old.abi_version != 0 && old.abi_version != mesh_common::ABI_VERSION {
                return Err(KernelError::AbiMismatch {
                    pin_dir: opts.pin_dir.display().to_string(),
                    found: old.abi_version,
                });
            }
        }
        let pods = take_map!(bpf, m::PODS, HashMap<MapData, u64, PodInfo>);
        let bypass_cidrs = take_map!(bpf, m::BYPASS_CIDRS, LpmTrie<MapData, [u32; 4], u32>);
        let bypass_ports = take_map!(bpf, m::BYPASS_PORTS, HashMap<MapData, u32, u32>);
        let stats = take_map!(bpf, m::STATS, PerCpuArray<MapData, u64>);
        let socks = take_map!(bpf, m::SOCKS, SockHash<MapData, ConnTuple>);
        let inbound = take_map!(bpf, m::INBOUND, HashMap<MapData, InboundKey, InboundTarget>);
        let listeners = take_map!(bpf, m::LISTENERS, SockMap<MapData>);
        let inbound_exclude = take_map!(bpf, m::INBOUND_EXCLUDE, HashMap<MapData, InboundKey, u32>);
        let services = ServiceTables::new(
            take_map!(bpf, m::SVC, HashMap<MapData, SvcKey, SvcEntry>),
            take_map!(bpf, m::SVC_ENDPOINTS, Array<MapData, SvcEndpoint>),
            take_map!(bpf, m::SVC_COUNTS, PerCpuArray<MapData, u64>),
        );
        let mut flags = FLAG_ENABLED;
        if opts.accelerate {
            flags |= FLAG_ACCELERATE;
        }
        if opts.bpf_log {
            flags |= FLAG_LOG;
        }
        let mut config = MeshConfig::new(
            flags,
            opts.outbound_port,
            mesh_common::DEFAULT_INBOUND_PORT,
            opts.daemon_mark,
        );
        config.accel_max_msg = opts.accel_max_msg;
        if let (Ok(rel), Ok(id)) = (
            opts.cgroup_root.strip_prefix(opts.cgroup_mount),
            crate::sys::cgroup_id(opts.cgroup_root),
        ) {
            config.cgroup_root_level = rel.components().count() as u32;
            config.cgroup_root_id = id;
        }
        config.accel_flow_budget = opts.accel_flow_budget;
        let mut k = Self {
            bpf,
            config_map,
            pods,
            bypass_cidrs,
            bypass_ports,
            stats,
            socks,
            inbound,
            inbound_exclude,
            listeners,
            netns_links: Default::default(),
            sk_lookup_loaded: false,
            config,
            logger: None,
            links: Vec::new(),
            pin_dir: opts.pin_dir.to_path_buf(),
            colour: ColourKernel::unavailable("not probed yet".into()),
            origin,
            attached: Vec::new(),
            services,
        };
        // Take the log ring before anything runs, so records are never lost to a full ring.
        k.logger = if opts.bpf_log {
            aya_log::EbpfLogger::init(&mut k.bpf).ok()
        } else {
            None
        };
        k.write_config()?;
        k.attach_cgroup_hooks(opts.cgroup_root, &links_dir)?;
        if opts.accelerate {
            k.attach_accel()?;
        }
        let status = if opts.propagation {
            k.attach_propagation(&maps_dir, &links_dir, opts.accelerate)
        } else {
            // A predecessor's colour tracepoints stay attached only while someone wants them.
            for (name, _) in progs::TRACEPOINTS {
                let _ = std::fs::remove_file(links_dir.join(name));
            }
            Err("switched off (propagation = false)".to_string())
        };
        k.colour = match status {
            Ok(maps) => {
                k.config.flags |= FLAG_PROPAGATE;
                k.write_config()?;
                ColourKernel::available(maps)
            }
            Err(why) => {
                log::warn!("colour propagation unavailable: {why}");
                ColourKernel::unavailable(why)
            }
        };
        Ok(k)
    }

    /// The proxy's handle on colour propagation (cheap to clone).
    pub fn colour(&self) -> ColourKernel {
        self.colour.clone()
    }

    /// Colour propagation: the sk_msg program on `SM_SOCKS` (already there with acceleration)
    /// and the two BTF tracepoints through pinned links (`links/sm_recv_colour`,
    /// `links/sm_send_colour`), adopted like the cgroup links after a restart. Any failure
    /// (kernel < 6.3 without the tracepoints, no BTF, a verifier refusal) makes propagation
    /// unavailable with the reason; the daemon runs on.
    fn attach_propagation(
        &mut self,
        maps_dir: &Path,
        links_dir: &Path,
        accel_attached: bool,
    ) -> Result<ColourMaps, String> {
        if !accel_attached {
            self.attach_accel().map_err(|e| e.to_string())?;
        }
        let mut btf: Option<Btf> = None;
        for (name, tracepoint) in progs::TRACEPOINTS {
            let pin = links_dir.join(name);
            if pin.exists() {
                let link = PinnedLink::from_pin(&pin)
                    .map_err(|e| format!("adopting the pinned link {}: {e}", pin.display()))?;
                self.links.push((pin, link));
                self.attached
                    .push(format!("{name} -> tp_btf/{tracepoint} (adopted)"));
                continue;
            }
            if btf.is_none() {
                btf = Some(
                    Btf::from_sys_fs()
                        .map_err(|e| format!("no kernel BTF (/sys/kernel/btf/vmlinux): {e}"))?,
                );
            }
            let prog: &mut BtfTracePoint = self.program(name).map_err(|e| e.to_string())?;
            prog.load(tracepoint, btf.as_ref().expect("set above"))
                .map_err(|e| format!("loading {name} on tp_btf/{tracepoint} (kernel 6.3+): {e}"))?;
            let id = prog
                .attach()
                .map_err(|e| format!("attaching {name} to tp_btf/{tracepoint}: {e}"))?;
            let link: FdLink = prog.take_link(id).map_err(|e| format!("{name}: {e}"))?.into();
            let link = link
                .pin(&pin)
                .map_err(|e| format!("pinning {}: {e}", pin.display()))?;
            self.links.push((pin, link));
            self.attached.push(format!("{name} -> tp_btf/{tracepoint}"));
        }
        ColourMaps::open(maps_dir).map_err(|e| e.to_string())
    }

    /// Enrolled cgroup ids as the kernel has them (after a restart: what the last daemon left).
    pub fn pod_entries(&self) -> Vec<(u64, PodInfo)> {
        self.pods.iter().filter_map(Result::ok).collect()
    }

    /// Remove every pin (a full stop): the links detach when this handle drops, the maps go
    /// with their last user.
    pub fn remove_pins(&mut self) -> std::io::Result<Vec<String>> {
        for (_, (_, l)) in std::mem::take(&mut self.netns_links) {
            let _ = l.unpin();
        }
        for (_, l) in std::mem::take(&mut self.links) {
            // Unpinning removes the pin file; dropping the fd then detaches the link.
            let _ = l.unpin();
        }
        remove_pins(&self.pin_dir)
    }

    fn write_config(&mut self) -> Result<(), KernelError> {
        self.config_map
            .set(0, self.config, 0)
            .map_err(|source| KernelError::Map {
                name: m::CONFIG,
                source,
            })
    }

    /// Write this process's config again (an upgrade taken back: the successor that died had
    /// written its own).
    pub fn rewrite_config(&mut self) -> Result<(), KernelError> {
        self.write_config()
    }

    /// Stop capturing new connections (shutdown, first phase). Hooks stay attached but idle.
    pub fn disable(&mut self) -> Result<(), KernelError> {
        self.config.flags &= !FLAG_ENABLED;
        self.write_config()
    }

    /// Turn the short-circuit off (a self-test failed). Sockets already in the map fall back.
    pub fn disable_acceleration(&mut self) -> Result<(), KernelError> {
        self.config.flags &= !FLAG_ACCELERATE;
        self.write_config()
    }

    /// Cgroup hooks attach through bpf links (kernel 5.7+). A cgroup bpf link always joins the
    /// cgroup's multi-program list (the kernel rejects link flags, so aya's `Single` mode, flags
    /// 0, is the right call): a CNI's programs on the same cgroup keep running next to ours.
    /// Each link is pinned, so it survives this process; a pinned link is adopted, not redone.
    fn attach_cgroup_hooks(&mut self, root: &Path, links_dir: &Path) -> Result<(), KernelError> {
        let target = root.display().to_string();
        let mut cgroup: Option<File> = None;
        for name in progs::CGROUP_LINKED {
            let pin = links_dir.join(name);
            if pin.exists() {
                let link = PinnedLink::from_pin(&pin).map_err(|source| KernelError::Adopt {
                    path: pin.display().to_string(),
                    source,
                })?;
                self.links.push((pin, link));
                self.attached.push(format!("{name} -> {target} (adopted)"));
                continue;
            }
            if cgroup.is_none() {
                cgroup = Some(File::open(root).map_err(|source| KernelError::Cgroup {
                    path: target.clone(),
                    source,
                })?);
            }
            let cg = cgroup.as_ref().expect("opened above");
            let attach_err = |source| KernelError::Attach {
                hook: name,
                target: target.clone(),
                source,
            };
            let fd_link: FdLink = match name {
                progs::GETSOCKOPT => {
                    // aya 0.14 cannot turn a sockopt link into an `FdLink`, so this one is
                    // created and pinned with the raw syscalls, then adopted like the others.
                    let prog: &mut CgroupSockopt = self.program(name)?;
                    prog.load()
                        .map_err(|source| KernelError::ProgramLoad { hook: name, source })?;
                    let prog_fd = prog.fd().map_err(attach_err)?.as_fd().as_raw_fd();
                    raw_link_pin(prog_fd, cg.as_raw_fd(), BPF_CGROUP_GETSOCKOPT, &pin)
                        .map_err(|source| KernelError::RawLink { hook: name, source })?;
                    let link = PinnedLink::from_pin(&pin).map_err(|source| KernelError::Adopt {
                        path: pin.display().to_string(),
                        source,
                    })?;
                    self.links.push((pin, link));
                    self.attached.push(format!("{name} -> {target}"));
                    continue;
                }
                progs::SOCKOPS => {
                    let prog: &mut SockOps = self.program(name)?;
                    prog.load()
                        .map_err(|source| KernelError::ProgramLoad { hook: name, source })?;
                    let id = prog.attach(cg, CgroupAttachMode::Single).map_err(attach_err)?;
                    prog.take_link(id)
                        .map_err(attach_err)?
                        .try_into()
                        .map_err(KernelError::NotALink)?
                }
                _ => {
                    let prog: &mut CgroupSockAddr = self.program(name)?;
                    prog.load()
                        .map_err(|source| KernelError::ProgramLoad { hook: name, source })?;
                    let id = prog.attach(cg, CgroupAttachMode::Single).map_err(attach_err)?;
                    prog.take_link(id)
                        .map_err(attach_err)?
                        .try_into()
                        .map_err(KernelError::NotALink)?
                }
            };
            let link = fd_link.pin(&pin).map_err(|source| KernelError::Pin {
                path: pin.display().to_string(),
                source,
            })?;
            self.links.push((pin, link));
            self.attached.push(format!("{name} -> {target}"));
        }
        Ok(())
    }

    fn attach_accel(&mut self) -> Result<(), KernelError> {
        let fd = self.socks.fd().try_clone().map_err(|e| KernelError::Map {
            name: m::SOCKS,
            source: aya::maps::MapError::IoError(e),
        })?;
        let name = progs::SK_MSG;
        let prog: &mut SkMsg = self.program(name)?;
        prog.load()
            .map_err(|source| KernelError::ProgramLoad { hook: name, source })?;
        prog.attach(&fd).map_err(|source| KernelError::Attach {
            hook: name,
            target: m::SOCKS.into(),
            source,
        })?;
        self.attached.push(format!("{name} -> {}", m::SOCKS));
        let name = progs::SK_SKB_VERDICT;
        let prog: &mut SkSkb = self.program(name)?;
        prog.load()
            .map_err(|source| KernelError::ProgramLoad { hook: name, source })?;
        prog.attach(&fd).map_err(|source| KernelError::Attach {
            hook: name,
            target: m::SOCKS.into(),
            source,
        })?;
        self.attached.push(format!("{name} -> {}", m::SOCKS));
        Ok(())
    }

    fn program<'s, T>(&'s mut self, name: &'static str) -> Result<&'s mut T, KernelError>
    where
        &'s mut T: TryFrom<&'s mut aya::programs::Program>,
    {
        let p = self
            .bpf
            .program_mut(name)
            .ok_or(KernelError::MissingProgram(name))?;
        p.try_into().map_err(|_| KernelError::MissingProgram(name))
    }

    /// Forward the programs' aya-log records (only with `bpf_log`; a no-op otherwise).
    pub fn flush_logs(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }

    pub fn add_pod(&mut self, cgroup_id: u64, info: PodInfo) -> Result<(), KernelError> {
        self.pods
            .insert(cgroup_id, info, 0)
            .map_err(|source| match source {
                aya::maps::MapError::SyscallError(ref e)
                    if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    KernelError::Full {
                        name: m::PODS,
                        max: m::PODS_MAX,
                    }
                }
                source => KernelError::Map {
                    name: m::PODS,
                    source,
                },
            })
    }

    pub fn remove_pod(&mut self, cgroup_id: u64) -> Result<(), KernelError> {
        match self.pods.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(KernelError::Map {
                name: m::PODS,
                source,
            }),
        }
    }

    /// Attach `sk_lookup` to a pod's netns through a pinned link (`links/sk_lookup-<pod>`),
    /// adopting the pin a previous daemon left.
    pub fn attach_netns(&mut self, pod: &str, netns: &Path) -> Result<(), KernelError> {
        if self.netns_links.contains_key(pod) {
            return Ok(());
        }
        let (_, links_dir) = pin_paths(&self.pin_dir);
        let pin = links_dir.join(netns_pin_name(pod));
        if !pin.exists() {
            let name = progs::SK_LOOKUP;
            if !self.sk_lookup_loaded {
                let prog: &mut SkLookup = self.program(name)?;
                prog.load()
                    .map_err(|source| KernelError::ProgramLoad { hook: name, source })?;
                self.sk_lookup_loaded = true;
            }
            let prog: &mut SkLookup = self.program(name)?;
            let prog_fd = prog
                .fd()
                .map_err(|source| KernelError::Attach {
                    hook: name,
                    target: pod.into(),
                    source,
                })?
                .as_fd()
                .as_raw_fd();
            let ns = File::open(netns).map_err(|source| KernelError::Cgroup {
                path: netns.display().to_string(),
                source,
            })?;
            raw_link_pin(prog_fd, ns.as_raw_fd(), BPF_SK_LOOKUP, &pin)
                .map_err(|source| KernelError::RawLink { hook: name, source })?;
        }
        let link = PinnedLink::from_pin(&pin).map_err(|source| KernelError::Adopt {
            path: pin.display().to_string(),
            source,
        })?;
        self.attached
            .push(format!("{} -> netns of pod {pod}", progs::SK_LOOKUP));
        self.netns_links.insert(pod.to_string(), (pin, link));
        Ok(())
    }

    /// Detach a pod's `sk_lookup` (unenrol).
    pub fn detach_netns(&mut self, pod: &str) {
        if let Some((_, link)) = self.netns_links.remove(pod) {
            let _ = link.unpin();
        }
        let tag = format!("{} -> netns of pod {pod}", progs::SK_LOOKUP);
        self.attached.retain(|a| *a != tag);
    }

    /// Put a pod's inbound listener in its slot.
    pub fn set_listener(&mut self, slot: u32, sock: &impl AsRawFd) -> Result<(), KernelError> {
        self.listeners
            .set(slot, sock, 0)
            .map_err(|source| KernelError::Map {
                name: m::LISTENERS,
                source,
            })
    }

    pub fn clear_listener(&mut self, slot: u32) {
        let _ = self.listeners.clear_index(&slot);
    }

    pub fn add_inbound(&mut self, key: InboundKey, target: InboundTarget) -> Result<(), KernelError> {
        self.inbound
            .insert(key, target, 0)
            .map_err(|source| match source {
                aya::maps::MapError::SyscallError(ref e)
                    if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    KernelError::Full {
                        name: m::INBOUND,
                        max: m::INBOUND_MAX,
                    }
                }
                source => KernelError::Map {
                    name: m::INBOUND,
                    source,
                },
            })
    }

    pub fn remove_inbound(&mut self, key: &InboundKey) {
        let _ = self.inbound.remove(key);
        let _ = self.inbound_exclude.remove(key);
    }

    /// A pod address and port never captured inbound (all ports meshed otherwise).
    pub fn add_inbound_exclude(&mut self, key: InboundKey) -> Result<(), KernelError> {
        self.inbound_exclude
            .insert(key, 1, 0)
            .map_err(|source| KernelError::Map {
                name: m::INBOUND_EXCLUDE,
                source,
            })
    }

    /// Inbound entries as the kernel has them (after a restart: what the last daemon left).
    pub fn inbound_entries(&self) -> Vec<(InboundKey, InboundTarget)> {
        self.inbound.iter().filter_map(Result::ok).collect()
    }

    pub fn set_bypass(&mut self, cidrs: &[Cidr], ports: &[u16]) -> Result<(), KernelError> {
        for c in cidrs {
            let (words, prefix) = match c.addr {
                IpAddr::V4(v4) => (
                    mesh_common::addr::map_v4(u32::from_ne_bytes(v4.octets())),
                    96 + c.prefix as u32,
                ),
                IpAddr::V6(_) => (ip_to_words(c.addr), c.prefix as u32),
            };
            self.bypass_cidrs
                .insert(&Key::new(prefix, words), 1, 0)
                .map_err(|source| KernelError::Map {
                    name: m::BYPASS_CIDRS,
                    source,
                })?;
        }
        for p in ports {
            self.bypass_ports
                .insert(*p as u32, 1, 0)
                .map_err(|source| KernelError::Map {
                    name: m::BYPASS_PORTS,
                    source,
                })?;
        }
        Ok(())
    }

    /// Kernel counters summed over CPUs, as `(name, value)`.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        (0..reason::COUNT)
            .map(|i| {
                let v = self.stats.get(&i, 0).map(|vals| vals.iter().sum()).unwrap_or(0);
                (REASON_NAMES[i as usize], v)
            })
            .collect()
    }

    pub fn counter(&self, r: u32) -> u64 {
        self.stats.get(&r, 0).map(|vals| vals.iter().sum()).unwrap_or(0)
    }

    /// Put a connected socket in `SM_SOCKS` under its own tuple (the self-test does this).
    pub fn sockhash_insert(&mut self, key: ConnTuple, sock: &impl AsRawFd) -> Result<(), KernelError> {
        self.socks
            .insert(key, sock.as_raw_fd(), 0)
            .map_err(|source| KernelError::Map {
                name: m::SOCKS,
                source,
            })
    }

    pub fn sockhash_remove(&mut self, key: &ConnTuple) {
        let _ = self.socks.remove(key);
    }
}

/// One kernel-routed service as the tables get it: its slot, VIPs and entries
/// `(endpoint, weight, down)` in table order (a down entry gets zero width).
pub struct TableService {
    pub slot: u32,
    /// Identity of each entry (service, subset, endpoint): a counter whose identity changes
    /// is zeroed so counts are never attributed to another endpoint.
    pub identity: Vec<String>,
    pub addresses: Vec<SocketAddr>,
    pub entries: Vec<(SocketAddr, u64, bool)>,
}

/// What one table write did.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct TableWrite {
    pub generation: u32,
    pub half: u32,
    /// Time from the first endpoint write to the last `SM_SVC` flip.
    pub write_us: u64,
    /// Wall clock (µs since the Unix epoch) right after the last flip: a connect that starts
    /// later sees this generation.
    pub flipped_at_unix_us: u64,
    pub services: usize,
}

/// `SM_SVC`, `SM_SVC_EP` and `SM_SVC_COUNT` (see `mesh_common::service`): double-buffered.
/// Every write fills the half no `SM_SVC` entry points at, then flips each service's entry
/// with one map update, then removes VIPs that left the policy.
pub struct ServiceTables {
    svc: HashMap<MapData, SvcKey, SvcEntry>,
    eps: Array<MapData, SvcEndpoint>,
    counts: PerCpuArray<MapData, u64>,
    live_half: u32,
    generation: u32,
    layout: std::collections::BTreeMap<u32, Vec<String>>,
    pub last: Option<TableWrite>,
}

fn svc_key(a: SocketAddr) -> SvcKey {
    match a {
        SocketAddr::V4(v4) => SvcKey::v4(u32::from_ne_bytes(v4.ip().octets()), a.port()),
        SocketAddr::V6(_) => SvcKey::v6(ip_to_words(a.ip()), a.port()),
    }
}

impl ServiceTables {
    /// Adopts what a previous daemon left: the live half and generation come from `SM_SVC`.
    fn new(
        svc: HashMap<MapData, SvcKey, SvcEntry>,
        eps: Array<MapData, SvcEndpoint>,
        counts: PerCpuArray<MapData, u64>,
    ) -> Self {
        let mut live_half = 1;
        let mut generation = 0;
        for (_, e) in svc.iter().filter_map(Result::ok) {
            live_half = e.half & 1;
            generation = generation.max(e.generation);
        }
        Self {
            svc,
            eps,
            counts,
            live_half,
            generation,
            layout: Default::default(),
            last: None,
        }
    }

    /// Generation and live half now (generation 0: never written).
    pub fn generation(&self) -> (u32, u32) {
        (self.generation, self.live_half)
    }

    /// Write a whole new table generation (see [`ServiceTables`]).
    pub fn write(&mut self, services: &[TableService]) -> Result<TableWrite, KernelError> {
        let map_err = |name| move |source| KernelError::Map { name, source };
        let half = 1 - self.live_half;
        let generation = self.generation.wrapping_add(1).max(1);
        let started = std::time::Instant::now();
        for s in services {
            if s.slot >= svc::SVC_SLOTS || s.entries.len() > svc::SVC_MAX_ENDPOINTS as usize {
                return Err(KernelError::Map {
                    name: m::SVC_ENDPOINTS,
                    source: aya::maps::MapError::OutOfBounds {
                        index: s.slot,
                        max_entries: svc::SVC_SLOTS,
                    },
                });
            }
            let weights: Vec<u64> = s
                .entries
                .iter()
                .map(|(_, w, down)| if *down { 0 } else { *w })
                .collect();
            let mut cum = vec![0u32; weights.len()];
            svc::cumulative(&weights, &mut cum);
            for (i, ((ep, _, down), c)) in s.entries.iter().zip(&cum).enumerate() {
                let (family, ip) = match ep {
                    SocketAddr::V4(v4) => (
                        mesh_common::AF_INET,
                        [u32::from_ne_bytes(v4.ip().octets()), 0, 0, 0],
                    ),
                    SocketAddr::V6(_) => (mesh_common::AF_INET6, ip_to_words(ep.ip())),
                };
                let flags = if *down { svc::EP_FLAG_DOWN } else { 0 };
                let value = SvcEndpoint::new(family, ip, ep.port(), *c, flags);
                self.eps
                    .set(svc::ep_index(half, s.slot, i as u32), value, 0)
                    .map_err(map_err(m::SVC_ENDPOINTS))?;
            }
            // Counters whose (service, subset, endpoint) changed start again from 0.
            if let Some(old) = self.layout.get(&s.slot) {
                let n = aya::util::nr_cpus().unwrap_or(1);
                for i in 0..s.identity.len().max(old.len()) {
                    if old.get(i) != s.identity.get(i) {
                        let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; n])
                            .map_err(|e| map_err(m::SVC_COUNTS)(aya::maps::MapError::IoError(e)))?;
                        let _ = self.counts.set(svc::count_index(s.slot, i as u32), zeros, 0);
                    }
                }
            }
        }
        let mut keep = std::collections::HashSet::new();
        for s in services {
            let entry = SvcEntry::new(s.slot, half, s.entries.len() as u32, generation);
            for a in &s.addresses {
                let k = svc_key(*a);
                self.svc.insert(k, entry, 0).map_err(map_err(m::SVC))?;
                keep.insert(k);
            }
        }
        let write_us = started.elapsed().as_micros() as u64;
        let flipped_at_unix_us = crate::sys::unix_us();
        let stale: Vec<SvcKey> = self
            .svc
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for k in stale {
            let _ = self.svc.remove(&k);
        }
        self.live_half = half;
        self.generation = generation;
        self.layout = services.iter().map(|s| (s.slot, s.identity.clone())).collect();
        let w = TableWrite {
            generation,
            half,
            write_us,
            flipped_at_unix_us,
            services: services.len(),
        };
        self.last = Some(w);
        Ok(w)
    }

    /// Connects routed per entry of `slot` (summed over CPUs), for `n` entries.
    pub fn counts(&self, slot: u32, n: usize) -> Vec<u64> {
        (0..n as u32)
            .map(|i| {
                self.counts
                    .get(&svc::count_index(slot, i), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0)
            })
            .collect()
    }
}

/// The colour maps, opened from their pins (own fds, so the proxy never takes the kernel lock).
struct ColourMaps {
    inbound: Mutex<HashMap<MapData, InboundColourKey, u32>>,
    ports: Mutex<Array<MapData, u64>>,
    ledger: HashMap<MapData, ConnTuple, Ledger>,
    threads: HashMap<MapData, u32, u32>,
}

impl ColourMaps {
    fn open(maps_dir: &Path) -> Result<Self, KernelError> {
        fn pinned(maps_dir: &Path, name: &'static str) -> Result<aya::maps::Map, KernelError> {
            let data =
                MapData::from_pin(maps_dir.join(name)).map_err(|source| KernelError::Map { name, source })?;
            Ok(match name {
                m::COLOUR_PORTS => aya::maps::Map::Array(data),
                m::COLOUR_INBOUND => aya::maps::Map::HashMap(data),
                _ => aya::maps::Map::LruHashMap(data),
            })
        }
        Ok(Self {
            inbound: Mutex::new(take_pinned(
                m::COLOUR_INBOUND,
                pinned(maps_dir, m::COLOUR_INBOUND)?,
            )?),
            ports: Mutex::new(take_pinned(m::COLOUR_PORTS, pinned(maps_dir, m::COLOUR_PORTS)?)?),
            ledger: take_pinned(m::COLOUR_LEDGER, pinned(maps_dir, m::COLOUR_LEDGER)?)?,
            threads: take_pinned(m::THREAD_COLOUR, pinned(maps_dir, m::THREAD_COLOUR)?)?,
        })
    }
}

fn take_pinned<T>(name: &'static str, map: aya::maps::Map) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}

/// Kernel colour propagation, as the proxy uses it. Cheap to clone; `Send + Sync`.
///
/// The proxy colours an inbound connection with [`ColourKernel::set_inbound`] *before* it
/// writes a request's bytes to the app, and must not change it while that request is in flight.
/// The app thread that reads the request takes its colour; what that thread then writes on a
/// captured outbound connection is recorded by stream offset, and the proxy reads it back with
/// [`ColourKernel::ledger_colour`] when it parses a request starting at that offset.
#[derive(Clone)]
pub struct ColourKernel {
    inner: Arc<ColourInner>,
}

struct ColourInner {
    status: Result<(), String>,
    maps: Option<ColourMaps>,
}

/// Colour ids are 1..=255; 0 is the base.
pub const MAX_COLOUR: u32 = 255;

impl ColourKernel {
    fn available(maps: ColourMaps) -> Self {
        Self {
            inner: Arc::new(ColourInner {
                status: Ok(()),
                maps: Some(maps),
            }),
        }
    }

    /// A handle that refuses everything with `why` (no kernel, or propagation off).
    pub fn disabled(why: String) -> Self {
        Self::unavailable(why)
    }

    fn unavailable(why: String) -> Self {
        Self {
            inner: Arc::new(ColourInner {
                status: Err(why),
                maps: None,
            }),
        }
    }

    /// Cheap check for the hot path.
    pub fn is_available(&self) -> bool {
        self.inner.status.is_ok()
    }

    /// Available, or why not.
    pub fn status(&self) -> Result<(), String> {
        self.inner.status.clone()
    }

    fn maps(&self) -> Result<&ColourMaps, String> {
        match (&self.inner.status, &self.inner.maps) {
            (Ok(()), Some(m)) => Ok(m),
            (Err(why), _) => Err(format!("colour propagation unavailable: {why}")),
            (Ok(()), None) => Err("colour propagation unavailable".into()),
        }
    }

    /// The app's accepted socket `app_local` (the pod address and port) ← `app_remote` (the
    /// proxy's delivering socket) now carries a request of `colour` (0: uncoloured; the thread
    /// that reads it drops any colour it had).
    pub fn set_inbound(
        &self,
        app_local: SocketAddr,
        app_remote: SocketAddr,
        colour: u32,
    ) -> Result<(), String> {
        if colour > MAX_COLOUR {
            return Err(format!("colour {colour} is out of range (0..={MAX_COLOUR})"));
        }
        let key = inbound_colour_key(app_local, app_remote)?;
        let maps = self.maps()?;
        {
            // The hooks' cheap filter: the port's bit, set once and never cleared.
            let (word, bit) = port_bit(key.local_port);
            let mut ports = maps.ports.lock().expect("colour ports lock");
            let cur = ports
                .get(&word, 0)
                .map_err(|e| format!("{}: {e}", m::COLOUR_PORTS))?;
            if cur & bit == 0 {
                ports
                    .set(word, cur | bit, 0)
                    .map_err(|e| format!("{}: {e}", m::COLOUR_PORTS))?;
            }
        }
        maps.inbound
            .lock()
            .expect("colour inbound lock")
            .insert(key, colour, 0)
            .map_err(|e| match e {
                aya::maps::MapError::SyscallError(ref s)
                    if s.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    format!(
                        "{} is full ({} entries)",
                        m::COLOUR_INBOUND,
                        m::COLOUR_INBOUND_MAX
                    )
                }
                e => format!("{}: {e}", m::COLOUR_INBOUND),
            })
    }

    /// The inbound connection is gone (or no longer coloured by the proxy).
    pub fn clear_inbound(&self, app_local: SocketAddr, app_remote: SocketAddr) {
        let (Ok(key), Ok(maps)) = (inbound_colour_key(app_local, app_remote), self.maps()) else {
            return;
        };
        let _ = maps.inbound.lock().expect("colour inbound lock").remove(&key);
    }

    /// The colour of the app's outbound stream at `offset`, for the app socket `app_local` →
    /// `app_remote` (what the app connected to after the rewrite: the outbound listener, e.g.
    /// 127.0.0.1:15001) in the pod netns `netns_cookie`. `Some(0)`: base. `None`: no ledger for
    /// that socket (its pod has no propagation, the socket predates the daemon, or LRU eviction)
    /// or the ring has moved past `offset`. From the proxy's accepted socket, see
    /// [`crate::propagate::app_side_of_accepted`].
    pub fn ledger_colour(
        &self,
        netns_cookie: u64,
        app_local: SocketAddr,
        app_remote: SocketAddr,
        offset: u64,
    ) -> Option<u32> {
        self.ledger(netns_cookie, app_local, app_remote)?.lookup(offset)
    }

    /// The whole ledger of one app socket (diagnostics and tests).
    pub fn ledger(&self, netns_cookie: u64, app_local: SocketAddr, app_remote: SocketAddr) -> Option<Ledger> {
        let maps = self.maps().ok()?;
        let key = ConnTuple::from_addrs(netns_cookie, app_local, app_remote);
        maps.ledger.get(&key, 0).ok()
    }

    /// Entry counts for status: (inbound colour entries, threads with a colour, ledgers).
    pub fn entry_counts(&self) -> Option<(usize, usize, usize)> {
        let maps = self.maps().ok()?;
        let inbound = maps.inbound.lock().expect("colour inbound lock").keys().count();
        Some((inbound, maps.threads.keys().count(), maps.ledger.keys().count()))
    }
}

/// The key of an app's inbound socket: IPv4, or IPv4-mapped IPv6 (normalised).
fn inbound_colour_key(app_local: SocketAddr, app_remote: SocketAddr) -> Result<InboundColourKey, String> {
    fn v4(a: SocketAddr) -> Option<[u8; 4]> {
        match a.ip() {
            IpAddr::V4(v4) => Some(v4.octets()),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(|v4| v4.octets()),
        }
    }
    match (v4(app_local), v4(app_remote)) {
        (Some(l), Some(r)) => Ok(InboundColourKey::v4(
            u32::from_ne_bytes(l),
            app_local.port(),
            u32::from_ne_bytes(r),
            app_remote.port(),
        )),
        _ => Err("colour propagation covers IPv4 inbound connections only".into()),
    }
}

/// `enum bpf_attach_type`: BPF_CGROUP_GETSOCKOPT.
const BPF_CGROUP_GETSOCKOPT: u32 = 21;
/// `enum bpf_attach_type`: BPF_SK_LOOKUP.
const BPF_SK_LOOKUP: u32 = 36;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `bpf(BPF_LINK_CREATE)` for a cgroup attach, then `bpf(BPF_OBJ_PIN)` at `pin`. The link's fd is
/// closed on return; the pin keeps the link attached.
fn raw_link_pin(prog_fd: i32, cgroup_fd: i32, attach_type: u32, pin: &Path) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // union bpf_attr, link_create: prog_fd, target_fd, attach_type, flags (all u32), rest zero.
    let mut attr = [0u32; 32];
    attr[0] = prog_fd as u32;
    attr[1] = cgroup_fd as u32;
    attr[2] = attach_type;
    // SAFETY: bpf(2) with a zero-padded attr larger than the kernel's link_create view.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just handed us this fd.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // obj_pin: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut pin_attr = [0u64; 4];
    pin_attr[0] = path.as_ptr() as u64;
    pin_attr[1] = link.as_raw_fd() as u32 as u64;
    // SAFETY: as above; `path` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            pin_attr.as_mut_ptr(),
            std::mem::size_of_val(&pin_attr),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One kernel feature the daemon needs, and what for.
pub struct Feature {
    pub name: &'static str,
    pub needed_for: &'static str,
    /// Without it the daemon refuses to start; otherwise only `needed_for` is switched off.
    pub required: bool,
    pub present: bool,
}

/// Probe the program types, map types and helpers the hooks use (the way libbpf does: load a
/// minimal program or map and read the verifier's verdict), so a missing one is named at start
/// instead of surfacing as a verifier log.
pub fn probe_features() -> Vec<Feature> {
    use aya::{
        maps::MapType,
        programs::ProgramType as P,
        sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper as H},
    };
    let prog = |t| is_program_supported(t).unwrap_or(false);
    let map = |t| is_map_supported(t).unwrap_or(false);
    let helper = |t, h| is_helper_supported(t, h).unwrap_or(false);
    let f = |name, needed_for, required, present| Feature {
        name,
        needed_for,
        required,
        present,
    };
    vec![
        f(
            "cgroup/connect4|6 programs",
            "outbound capture",
            true,
            prog(P::CgroupSockAddr),
        ),
        f(
            "sockops programs",
            "original destinations",
            true,
            prog(P::SockOps),
        ),
        f(
            "cgroup/getsockopt programs",
            "SO_ORIGINAL_DST",
            true,
            prog(P::CgroupSockopt),
        ),
        f("LRU hash maps", "flow records", true, map(MapType::LruHash)),
        f("LPM trie maps", "bypass CIDRs", true, map(MapType::LpmTrie)),
        f("per-CPU arrays", "counters", true, map(MapType::PerCpuArray)),
        f(
            "bpf_sk_lookup_tcp in cgroup/connect",
            "listener liveness (fail safe)",
            true,
            helper(P::CgroupSockAddr, H::BPF_FUNC_sk_lookup_tcp),
        ),
        f(
            "bpf_get_netns_cookie in cgroup/connect",
            "per-pod netns check",
            true,
            helper(P::CgroupSockAddr, H::BPF_FUNC_get_netns_cookie),
        ),
        f(
            "bpf_get_netns_cookie in sockops",
            "flow keys",
            true,
            helper(P::SockOps, H::BPF_FUNC_get_netns_cookie),
        ),
        f(
            "bpf_get_netns_cookie in cgroup/getsockopt",
            "SO_ORIGINAL_DST",
            true,
            helper(P::CgroupSockopt, H::BPF_FUNC_get_netns_cookie),
        ),
        f("sk_lookup programs", "inbound capture", false, prog(P::SkLookup)),
        f("sockmaps", "inbound capture", false, map(MapType::SockMap)),
        f(
            "bpf_sk_assign in sk_lookup",
            "inbound capture",
            false,
            helper(P::SkLookup, H::BPF_FUNC_sk_assign),
        ),
        f("sk_msg programs", "acceleration", false, prog(P::SkMsg)),
        f("sockhash maps", "acceleration", true, map(MapType::SockHash)),
        f(
            "bpf_get_netns_cookie in sk_msg",
            "acceleration",
            false,
            helper(P::SkMsg, H::BPF_FUNC_get_netns_cookie),
        ),
        f(
            "BTF tracepoint programs",
            "colour propagation",
            false,
            prog(P::Tracing),
        ),
        f(
            "bpf_get_current_pid_tgid in sk_msg",
            "colour propagation",
            false,
            helper(P::SkMsg, H::BPF_FUNC_get_current_pid_tgid),
        ),
    ]
}

#[cfg(test)]
mod tests {
    //! The two sides must agree on names: a map or program the loader asks for that the kernel
    //! crate does not define (or defines under another name) fails here, not on a node.
    use super::*;

    fn ebpf_source(file: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../mesh-ebpf/src")
            .join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn colour_kernel_is_send_sync_clone_and_keys_mapped_addresses_as_ipv4() {
        fn shareable<T: Send + Sync + Clone>() {}
        shareable::<ColourKernel>();
        let v4 = inbound_colour_key(
            "198.18.0.3:8080".parse().unwrap(),
            "198.18.0.2:40000".parse().unwrap(),
        );
        let mapped = inbound_colour_key(
            "[::ffff:198.18.0.3]:8080".parse().unwrap(),
            "[::ffff:198.18.0.2]:40000".parse().unwrap(),
        );
        assert_eq!(v4, mapped);
        let k = v4.unwrap();
        assert_eq!((k.local_port, k.remote_port), (8080, 40000));
        assert_eq!(k.local_ip_be[0].to_ne_bytes(), [198, 18, 0, 3]);
        assert!(
            inbound_colour_key("[fd00::3]:8080".parse().unwrap(), "198.18.0.2:1".parse().unwrap()).is_err()
        );
    }

    #[test]
    fn every_kernel_map_is_known_and_pinned() {
        let src = ebpf_source("maps.rs");
        let defined: Vec<&str> = src
            .split("#[map(name = \"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .collect();
        assert!(defined.len() >= 16, "{defined:?}");
        for name in &defined {
            assert!(
                m::PINNED.contains(name),
                "kernel map {name} is not in mesh_common::maps::PINNED"
            );
        }
        for name in m::PINNED.iter().filter(|n| **n != m::AYA_LOGS) {
            assert!(
                defined.contains(name),
                "{name} is pinned but the kernel crate does not define it"
            );
        }
    }

    #[test]
    fn every_program_the_loader_uses_exists() {
        let all: String = [
            "connect.rs",
            "sockops.rs",
            "sk_msg.rs",
            "getsockopt.rs",
            "getpeername.rs",
            "sk_lookup.rs",
            "colour.rs",
        ]
        .iter()
        .map(|f| ebpf_source(f))
        .collect();
        for name in progs::CGROUP_LINKED.iter().chain(&[
            progs::SK_MSG,
            progs::SK_SKB_VERDICT,
            progs::SK_LOOKUP,
            progs::RECV_COLOUR,
            progs::SEND_COLOUR,
        ]) {
            assert!(
                all.contains(&format!("pub fn {name}(")),
                "no program `{name}` in mesh-ebpf"
            );
        }
    }

    #[test]
    fn netns_pin_names_are_valid_on_bpffs() {
        // Names without dots keep the pin earlier daemons made (re-adoption).
        assert_eq!(netns_pin_name("web"), "sk_lookup-web");
        let long = "a".repeat(63);
        assert_eq!(netns_pin_name(&long), format!("sk_lookup-{long}"));
        let dotted = netns_pin_name("default.web");
        assert!(!dotted.contains('.'), "{dotted}");
        assert!(dotted.starts_with("sk_lookup-default_web-"), "{dotted}");
        // Stable, and distinct from the same name spelt with `_`.
        assert_eq!(dotted, netns_pin_name("default.web"));
        assert_ne!(dotted, netns_pin_name("default_web"));
        assert_ne!(netns_pin_name("a.b_c"), netns_pin_name("a_b.c"));
        let long_dotted = format!("{}.{}", "b".repeat(31), "c".repeat(31));
        let pin = netns_pin_name(&long_dotted);
        assert!(!pin.contains('.') && pin.len() <= 255, "{pin}");
    }
}
