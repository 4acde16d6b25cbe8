//! The only module that talks to aya: load the embedded object, attach the hooks at the cgroup
//! root with bpf links (multi-attach, so a CNI's programs keep working), and give the rest of the
//! daemon typed access to the maps. Dropping [`Kernel`] detaches everything it attached.

use std::{fs::File, net::IpAddr, os::fd::AsRawFd, path::Path};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SkMsg, SkSkb, SockOps},
    Ebpf, EbpfLoader,
};
use mesh_common::{
    config::{MeshConfig, FLAG_ACCELERATE, FLAG_ENABLED, FLAG_LOG},
    flow::{ip_to_words, ConnTuple},
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
}

/// What the daemon asks of the kernel side.
pub struct KernelOptions<'a> {
    pub cgroup_root: &'a Path,
    pub outbound_port: u16,
    pub daemon_mark: u32,
    pub accelerate: bool,
    pub accel_max_msg: u32,
    pub accel_flow_budget: u64,
    pub bpf_log: bool,
}

pub struct Kernel {
    /// Owns the programs and their links; dropped last.
    bpf: Ebpf,
    config_map: Array<MapData, MeshConfig>,
    pods: HashMap<MapData, u64, PodInfo>,
    bypass_cidrs: LpmTrie<MapData, [u32; 4], u32>,
    bypass_ports: HashMap<MapData, u32, u32>,
    stats: PerCpuArray<MapData, u64>,
    socks: SockHash<MapData, ConnTuple>,
    config: MeshConfig,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Hooks attached, for status ("connect4 -> /sys/fs/cgroup/...").
    pub attached: Vec<String>,
}

macro_rules! take_map {
    ($bpf:expr, $name:expr, $ty:ty) => {{
        let map = $bpf.take_map($name).ok_or(KernelError::MissingMap($name))?;
        <$ty>::try_from(map).map_err(|source| KernelError::Map { name: $name, source })?
    }};
}

impl Kernel {
    /// Load the object and attach every hook at `opts.cgroup_root`.
    pub fn load(opts: &KernelOptions<'_>) -> Result<Self, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        // aya-log's level: 0 turns every log statement in the programs into one skipped branch.
        let log_level: u8 = if opts.bpf_log { 0xff } else { 0 };
        let mut bpf = EbpfLoader::new()
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .load(OBJECT)
            .map_err(KernelError::Load)?;
        let config_map = take_map!(bpf, m::CONFIG, Array<MapData, MeshConfig>);
        let pods = take_map!(bpf, m::PODS, HashMap<MapData, u64, PodInfo>);
        let bypass_cidrs = take_map!(bpf, m::BYPASS_CIDRS, LpmTrie<MapData, [u32; 4], u32>);
        let bypass_ports = take_map!(bpf, m::BYPASS_PORTS, HashMap<MapData, u32, u32>);
        let stats = take_map!(bpf, m::STATS, PerCpuArray<MapData, u64>);
        let socks = take_map!(bpf, m::SOCKS, SockHash<MapData, ConnTuple>);
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
            config,
            logger: None,
            attached: Vec::new(),
        };
        // Take the log ring before anything runs, so records are never lost to a full ring.
        k.logger = if opts.bpf_log {
            aya_log::EbpfLogger::init(&mut k.bpf).ok()
        } else {
            None
        };
        k.write_config()?;
        k.attach_cgroup_hooks(opts.cgroup_root)?;
        if opts.accelerate {
            k.attach_accel()?;
        }
        Ok(k)
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
    fn attach_cgroup_hooks(&mut self, root: &Path) -> Result<(), KernelError> {
        let cgroup = File::open(root).map_err(|source| KernelError::Cgroup {
            path: root.display().to_string(),
            source,
        })?;
        let target = root.display().to_string();
        for name in [
            progs::CONNECT4,
            progs::CONNECT6,
            progs::GETPEERNAME4,
            progs::GETPEERNAME6,
        ] {
            let prog: &mut CgroupSockAddr = self.program(name)?;
            prog.load()
                .map_err(|source| KernelError::ProgramLoad { hook: name, source })?;
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| KernelError::Attach {
                    hook: name,
                    target: target.clone(),
                    source,
                })?;
            self.attached.push(format!("{name} -> {target}"));
        }
        let name = progs::GETSOCKOPT;
        let prog: &mut CgroupSockopt = self.program(name)?;
        prog.load()
            .map_err(|source| KernelError::ProgramLoad { hook: name, source })?;
        prog.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| KernelError::Attach {
                hook: name,
                target: target.clone(),
                source,
            })?;
        self.attached.push(format!("{name} -> {target}"));
        let name = progs::SOCKOPS;
        let prog: &mut SockOps = self.program(name)?;
        prog.load()
            .map_err(|source| KernelError::ProgramLoad { hook: name, source })?;
        prog.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| KernelError::Attach {
                hook: name,
                target: target.clone(),
                source,
            })?;
        self.attached.push(format!("{name} -> {target}"));
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
