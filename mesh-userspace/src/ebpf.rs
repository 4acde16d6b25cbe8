//! The only module that talks to aya: load the embedded object, attach the hooks at the cgroup
//! root with bpf links (multi-attach, so a CNI's programs keep working), and give the rest of the
//! daemon typed access to the maps. Dropping [`Kernel`] detaches everything it attached.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, SockHash, SockMap},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SkSkb, SockOps,
    },
    Ebpf, EbpfLoader,
};
use mesh_common::{
    config::{MeshConfig, FLAG_ACCELERATE, FLAG_ENABLED, FLAG_LOG},
    flow::{ip_to_words, ConnTuple},
    inbound::{InboundKey, InboundTarget},
    maps::{self as m, progs},
    pods::PodInfo,
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
    /// bpffs directory holding `maps/` and `links/`.
    pub pin_dir: &'a Path,
    pub outbound_port: u16,
    pub daemon_mark: u32,
    pub accelerate: bool,
    pub accel_max_msg: u32,
    pub accel_flow_budget: u64,
    pub bpf_log: bool,
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
    pub origin: Origin,
    /// Hooks attached, for status ("sm_connect4 -> /sys/fs/cgroup/...").
    pub attached: Vec<String>,
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
            origin,
            attached: Vec::new(),
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
        Ok(k)
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
        let pin = links_dir.join(format!("sk_lookup-{pod}"));
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
    fn every_kernel_map_is_known_and_pinned() {
        let src = ebpf_source("maps.rs");
        let defined: Vec<&str> = src
            .split("#[map(name = \"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .collect();
        assert!(defined.len() >= 12, "{defined:?}");
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
        ]
        .iter()
        .map(|f| ebpf_source(f))
        .collect();
        for name in
            progs::CGROUP_LINKED
                .iter()
                .chain(&[progs::SK_MSG, progs::SK_SKB_VERDICT, progs::SK_LOOKUP])
        {
            assert!(
                all.contains(&format!("pub fn {name}(")),
                "no program `{name}` in mesh-ebpf"
            );
        }
    }
}
