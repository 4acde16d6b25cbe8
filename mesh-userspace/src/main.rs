//! `sockmesh`: the node daemon and its command line.
//!
//! - `sockmesh run --config FILE`: load and attach the kernel programs at the configured cgroup
//!   root, open each enrolled pod's outbound listener inside its netns, proxy opaque TCP.
//! - `sockmesh enroll|unenroll|status`: talk to a running daemon over its admin socket.
//! - `sockmesh default-config`: print the embedded default policy.

mod admin;
// Shared with the `sockmesh-cni` binary; the daemon uses its wire types (`Notice`).
#[allow(dead_code)]
mod cni;
mod cni_install;
mod config;
mod conn;
mod daemon;
mod ebpf;
mod k8s;
mod kroute;
mod metrics;
mod probe;
mod propagate;
mod proxy;
// Protocol detection and codecs; not wired into the proxy yet (issue 4).
mod l7;
mod links;
// The codecs carry each protocol's whole vocabulary (status codes, flags), not only what the
// handlers use today; the fuzz crate includes them by path.
#[allow(dead_code)]
mod protocol;
mod routing;
mod selftest;
mod state;
mod status;
mod sys;
mod upgrade;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

/// Exit status for an invalid config (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Threads of the control plane's runtime (admin, metrics, links, Kubernetes, upgrades).
const CONTROL_THREADS: usize = 2;
/// Oldest kernel with everything the hooks use (netns cookies in sockops/sk_msg/sockopt,
/// sk_lookup, bpf links for cgroups).
const KERNEL_FLOOR: (u32, u32) = (5, 15);

#[derive(Parser)]
#[command(
    name = "sockmesh",
    version,
    about = "eBPF service-mesh data plane for a Linux node"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node daemon.
    Run {
        /// Node config (TOML). Without it the embedded default policy is used.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        admin_socket: Option<PathBuf>,
        #[arg(long)]
        metrics_addr: Option<String>,
        /// Attach point; overrides `cgroup_root` in the config.
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// bpffs directory for pinned links and maps; overrides `pin_dir`.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// Enrolment state file; overrides `state_file`.
        #[arg(long)]
        state_file: Option<PathBuf>,
        /// Proxy worker threads; overrides `workers` (default: one per CPU).
        #[arg(long)]
        workers: Option<u32>,
        /// Take over from the running daemon (found through the lock file) instead of starting
        /// anew: `sockmesh upgrade` starts the new binary with this.
        #[arg(long)]
        upgrade: bool,
        /// Take over by itself from a daemon already running on this node (found through the
        /// lock file), with the same hand-off as `--upgrade`; start fresh when none runs. For a
        /// DaemonSet's rolling update with `maxSurge`: the new pod's `run` takes the node while
        /// the old pod still runs. `older` (the default) never takes over from a newer daemon
        /// (hand-off protocol, then version): it waits, not ready. `any`: also from a newer one
        /// (a rollback).
        #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "older")]
        take_over: Option<upgrade::takeover::Mode>,
        /// Serve this process's own readiness and health on this Unix socket (`sockmesh probe`):
        /// unlike the metrics endpoint, which moves to the next generation, it always answers
        /// for this process.
        #[arg(long)]
        probe_socket: Option<PathBuf>,
    },
    /// Ask a daemon's probe socket (`run --probe-socket`) whether its process is ready or
    /// healthy: exit 0 if so, 1 with the reason if not. For the kubelet's exec probes.
    Probe {
        #[arg(long)]
        socket: PathBuf,
        #[arg(value_parser = ["ready", "healthz"])]
        what: String,
    },
    /// Internal: what a generation that handed over to a `run --take-over` becomes (same pid):
    /// it holds nothing, answers its probe not ready, and exits 0 at SIGTERM.
    #[command(hide = true)]
    HandedOver {
        #[arg(long)]
        reason: String,
        #[arg(long)]
        probe_socket: Option<PathBuf>,
    },
    /// Upgrade the running daemon under load: start BINARY as the next generation, which takes
    /// over the listeners (no connect is refused) while this one drains and exits. If the new
    /// binary fails at any step, the running daemon keeps serving.
    Upgrade {
        #[arg(long)]
        binary: PathBuf,
        #[arg(long, default_value = config::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Capture a running pod's new connections.
    Enroll {
        #[arg(long)]
        name: String,
        #[arg(long)]
        netns: PathBuf,
        #[arg(long)]
        cgroup: PathBuf,
        /// Another proxy listens on the outbound port in this pod; only capture.
        #[arg(long)]
        external_proxy: bool,
        /// Open the listeners but do not capture (something else redirects to them).
        #[arg(long)]
        no_capture: bool,
        /// Capture this port of the pod inbound (repeatable).
        #[arg(long = "inbound-port")]
        inbound_ports: Vec<u32>,
        /// Capture every inbound port of the pod (but excluded ones and sockmesh's own).
        #[arg(long)]
        inbound_all_ports: bool,
        /// With --inbound-all-ports: never capture this port (repeatable).
        #[arg(long = "inbound-exclude-port")]
        inbound_exclude_ports: Vec<u32>,
        /// The pod's traffic colour (a `[[colours]]` name of the policy): every request it
        /// sends has this colour unless the request carries its own.
        #[arg(long)]
        colour: Option<String>,
        /// Kernel colour propagation for this pod's threads (needs capture; kernel 6.3+).
        #[arg(long)]
        propagate: bool,
        /// Dual links: `LINK=CGROUP_DIR`, the cgroup of that link's apps in this pod (v1 cpu or
        /// memory directory, or v2); repeat for several directories or links.
        #[arg(long = "link", value_parser = parse_link)]
        links: Vec<(String, String)>,
        #[arg(long, default_value = config::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Dual links: switch this node's active link (raise the target's resources, move traffic
    /// in steps, lower the former active to keep-alive). Without an action: the links' states.
    Switch {
        /// The link to make active.
        #[arg(long)]
        to: Option<String>,
        /// Switch back to the link that was active before the last switch.
        #[arg(long)]
        back: bool,
        /// Stop the switch in progress and return to the state before it.
        #[arg(long)]
        abort: bool,
        /// Hold the switch in progress between two steps (kept across a daemon restart).
        #[arg(long)]
        pause: bool,
        /// Go on with a paused switch.
        #[arg(long)]
        resume: bool,
        /// How long the traffic move takes (`0`, `500ms`, `10s`, `2m`).
        #[arg(long, default_value = "0", value_parser = parse_duration)]
        over: std::time::Duration,
        /// Traffic steps (slow start: the target's share grows linearly).
        #[arg(long, default_value_t = 1)]
        steps: u32,
        /// Show live progress until no switch is in progress (at most 1 h).
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = config::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Stop capturing a pod's new connections (open ones finish undisturbed).
    Unenroll {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = config::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Enrolled pods, live connections with their original destinations, kernel counters.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = config::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Stop a running daemon. With `--keep-state` its pinned links, maps and enrolment stay
    /// for the next daemon (a restart or upgrade); without it everything is removed.
    Stop {
        #[arg(long)]
        keep_state: bool,
        #[arg(long, default_value = config::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Stop the daemon if it runs, then detach and unpin everything sockmesh left on this node.
    Uninstall {
        /// Read pin_dir, state_file and admin_socket from this config.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        #[arg(long)]
        state_file: Option<PathBuf>,
        #[arg(long)]
        admin_socket: Option<PathBuf>,
        /// Also unchain `sockmesh-cni` from the CNI network configs in this directory...
        #[arg(long, requires = "cni_bin_dir")]
        cni_conf_dir: Option<PathBuf>,
        /// ...and remove it from this CNI bin dir (Kubernetes nodes).
        #[arg(long, requires = "cni_conf_dir")]
        cni_bin_dir: Option<PathBuf>,
    },
    /// Install `sockmesh-cni` into the node's CNI bin dir and chain it at the end of the node's
    /// network config (the DaemonSet's init container). Idempotent.
    CniInstall {
        /// The plugin binary to install.
        #[arg(long, default_value = "/usr/local/bin/sockmesh-cni")]
        plugin: PathBuf,
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The daemon's admin socket as the plugin (on the host) sees it.
        #[arg(long, default_value = config::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// Where the plugin logs (default: the runtime's log, through stderr).
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// Wait this long for the node's network config to appear (the cluster network's own
        /// agent may write it after this runs).
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
    /// The live routing policy and its per-route counters; `routes apply FILE` replaces it.
    Routes {
        #[command(subcommand)]
        action: Option<RoutesCmd>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = config::DEFAULT_ADMIN_SOCKET, global = true)]
        admin_socket: PathBuf,
    },
    /// Print the embedded default config.
    DefaultConfig,
}

#[derive(Debug, Subcommand)]
enum RoutesCmd {
    /// Replace the running daemon's whole routing policy with FILE (TOML with
    /// `detect_timeout_ms` and `[[services]]`, as in the config). Open connections are kept;
    /// their next request follows the new policy. Invalid: exit 64, the daemon is unchanged.
    Apply { file: PathBuf },
    /// Take an endpoint of the kernel-routed services (`mode = "kernel"`) out of the kernel's
    /// weighted choice (`--down`) or put it back (`--up`).
    Endpoint {
        address: std::net::SocketAddr,
        #[arg(long, conflicts_with = "up", required_unless_present = "up")]
        down: bool,
        #[arg(long)]
        up: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            config,
            admin_socket,
            metrics_addr,
            cgroup_root,
            pin_dir,
            state_file,
            workers,
            upgrade,
            take_over,
            probe_socket,
        } => {
            init_tracing();
            let overrides = Overrides {
                admin_socket,
                metrics_addr,
                cgroup_root,
                pin_dir,
                state_file,
                workers,
                upgrade,
                take_over,
            };
            probe::configure(probe_socket);
            run(config.as_deref(), overrides)
        }
        Cmd::Probe { socket, what } => probe::query(&socket, &what),
        Cmd::HandedOver { reason, probe_socket } => {
            init_tracing();
            upgrade::takeover::idle(probe_socket, &reason)
        }
        Cmd::Enroll {
            name,
            netns,
            cgroup,
            external_proxy,
            no_capture,
            inbound_ports,
            inbound_all_ports,
            inbound_exclude_ports,
            colour,
            propagate,
            links,
            admin_socket,
        } => client(
            &admin_socket,
            admin::Request::Enroll {
                name,
                netns: netns.display().to_string(),
                cgroup: cgroup.display().to_string(),
                external_proxy,
                capture: !no_capture,
                inbound_ports,
                inbound_all_ports,
                inbound_exclude_ports,
                colour,
                propagate,
                links: links.into_iter().fold(
                    Default::default(),
                    |mut m: std::collections::BTreeMap<String, Vec<String>>, (k, v)| {
                        m.entry(k).or_default().push(v);
                        m
                    },
                ),
            },
            false,
        ),
        Cmd::Switch {
            to,
            back,
            abort,
            pause,
            resume,
            over,
            steps,
            watch,
            json,
            admin_socket,
        } => switch(
            &admin_socket,
            to,
            back,
            [abort, pause, resume],
            over,
            steps,
            watch,
            json,
        ),
        Cmd::Unenroll { name, admin_socket } => {
            client(&admin_socket, admin::Request::Unenroll { name }, false)
        }
        Cmd::Status { json, admin_socket } => client(&admin_socket, admin::Request::Status, json),
        Cmd::Upgrade { binary, admin_socket } => match upgrade::old::cli(&admin_socket, &binary) {
            Ok(v) => {
                println!(
                    "upgraded: generation {} (pid {}) took over from generation {} (pid {}), which now drains",
                    v["generation"], v["pid"], v["previous_generation"], v["previous_pid"]
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Stop {
            keep_state,
            admin_socket,
        } => client(&admin_socket, admin::Request::Stop { keep_state }, false),
        Cmd::Uninstall {
            config,
            pin_dir,
            state_file,
            admin_socket,
            cni_conf_dir,
            cni_bin_dir,
        } => {
            let code = uninstall(config.as_deref(), pin_dir, state_file, admin_socket);
            if let (Some(conf), Some(bin)) = (&cni_conf_dir, &cni_bin_dir) {
                // The plugin after the daemon has stopped: a running agent's CNI config guard
                // would chain it back. A pod created in between finds no daemon, and starts.
                match cni_install::uninstall(bin, conf) {
                    Ok(done) => done.iter().for_each(|d| println!("{d}")),
                    Err(e) => {
                        eprintln!("error: failed to remove sockmesh-cni: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            code
        }
        Cmd::CniInstall {
            plugin,
            bin_dir,
            conf_dir,
            admin_socket,
            log_file,
            wait_secs,
        } => cni_install_cmd(
            &plugin,
            &bin_dir,
            &conf_dir,
            &admin_socket,
            log_file.as_deref(),
            wait_secs,
        ),
        Cmd::Routes {
            action: None,
            json,
            admin_socket,
        } => client(&admin_socket, admin::Request::Routes, json),
        Cmd::Routes {
            action: Some(RoutesCmd::Apply { file }),
            admin_socket,
            ..
        } => routes_apply(&admin_socket, &file),
        Cmd::Routes {
            action: Some(RoutesCmd::Endpoint { address, up, .. }),
            admin_socket,
            ..
        } => match admin::call(&admin_socket, &admin::Request::KernelEndpoint { address, up }) {
            Ok(resp) if resp.ok => {
                let t = resp.status.unwrap_or_default();
                println!(
                    "{address} {}: kernel table generation {}",
                    if up { "up" } else { "down" },
                    t["table"]["generation"]
                );
                ExitCode::SUCCESS
            }
            Ok(resp) => {
                eprintln!("error: {}", resp.error.unwrap_or_else(|| "unknown error".into()));
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::DefaultConfig => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
    }
}

fn parse_link(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((l, p)) if !l.is_empty() && p.starts_with('/') => Ok((l.to_owned(), p.to_owned())),
        _ => Err(format!("`{s}`: expected LINK=/absolute/cgroup/dir")),
    }
}

/// `0`, `250ms`, `10s`, `2m` (a bare number is seconds).
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 0, 500ms, 10s, 2m)"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return Err(format!("`{s}`: unit must be ms, s or m")),
    };
    if !ms.is_finite() || !(0.0..=3_600_000.0).contains(&ms) {
        return Err(format!("`{s}`: 0 to 1h"));
    }
    Ok(std::time::Duration::from_millis(ms as u64))
}

/// `sockmesh switch`: one request; with `--watch`, redraw the progress until it is done.
#[allow(clippy::too_many_arguments)]
fn switch(
    socket: &Path,
    to: Option<String>,
    back: bool,
    [abort, pause, resume]: [bool; 3],
    over: std::time::Duration,
    steps: u32,
    watch: bool,
    json: bool,
) -> ExitCode {
    let req = admin::Request::Switch {
        to: to.clone(),
        back,
        abort,
        pause,
        resume,
        over_ms: over.as_millis() as u64,
        steps,
    };
    let acting = to.is_some() || back || abort || pause || resume;
    if acting {
        match admin::call(socket, &req) {
            Ok(r) if r.ok => {
                if json {
                    println!("{}", r.status.unwrap_or_default());
                } else if let Some(s) = r.status {
                    if let Some(a) = s["aborting"].as_str() {
                        println!("aborting the switch {a}");
                    } else if let Some(d) = s["done"].as_str() {
                        println!("{d}");
                    } else {
                        println!(
                            "switching {} -> {}: resources of {} raised and shown by the kernel; {} step(s) over {} ms",
                            s["from"].as_str().unwrap_or("?"),
                            s["to"].as_str().unwrap_or("?"),
                            s["to"].as_str().unwrap_or("?"),
                            s["steps"],
                            s["over_ms"]
                        );
                    }
                }
            }
            Ok(r) => {
                eprintln!("sockmesh: {}", r.error.unwrap_or_default());
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("sockmesh: {e:#}");
                return ExitCode::from(1);
            }
        }
        if !watch {
            return ExitCode::SUCCESS;
        }
    }
    let view = admin::Request::Switch {
        to: None,
        back: false,
        abort: false,
        pause: false,
        resume: false,
        over_ms: 0,
        steps: 1,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    loop {
        let v = match admin::call(socket, &view) {
            Ok(r) if r.ok => r.status.unwrap_or_default(),
            Ok(r) => {
                eprintln!("sockmesh: {}", r.error.unwrap_or_default());
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("sockmesh: {e:#}");
                return ExitCode::from(1);
            }
        };
        if json {
            println!("{v}");
        } else {
            print!("{}", status::render_links(&v));
        }
        if !watch || v["switch"].is_null() || std::time::Instant::now() > deadline {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        if !json {
            println!();
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SOCKMESH_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `sockmesh routes apply FILE`: validate here (exit 64 naming the field), then send.
fn routes_apply(socket: &Path, file: &Path) -> ExitCode {
    let policy = std::fs::read_to_string(file)
        .map_err(|e| format!("{}: {e}", file.display()))
        .and_then(|text| routing::parse_toml(&text).map_err(|e| e.to_string()))
        .and_then(|raw| {
            routing::compile(raw.clone())
                .map(|_| raw)
                .map_err(|e| e.to_string())
        });
    let policy = match policy {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: invalid policy {}: {e}", file.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match admin::call(socket, &admin::Request::RoutesApply { policy }) {
        Ok(resp) if resp.ok => {
            let generation = resp
                .status
                .as_ref()
                .and_then(|s| s["generation"].as_u64())
                .unwrap_or(0);
            println!("applied: policy generation {generation}");
            ExitCode::SUCCESS
        }
        Ok(resp) => {
            eprintln!("error: {}", resp.error.unwrap_or_else(|| "unknown error".into()));
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn client(socket: &Path, req: admin::Request, json: bool) -> ExitCode {
    let is_status = matches!(req, admin::Request::Status);
    let is_routes = matches!(req, admin::Request::Routes);
    match admin::call(socket, &req) {
        Ok(resp) if resp.ok => {
            if let Some(st) = resp.status {
                if json {
                    println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
                } else if is_routes {
                    print!("{}", status::render_routes(&st));
                } else {
                    print!("{}", status::render(&st));
                }
            } else if !is_status {
                println!("ok");
            }
            ExitCode::SUCCESS
        }
        Ok(resp) => {
            eprintln!("error: {}", resp.error.unwrap_or_else(|| "unknown error".into()));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `sockmesh run` flags that override the config file.
struct Overrides {
    admin_socket: Option<PathBuf>,
    metrics_addr: Option<String>,
    cgroup_root: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    state_file: Option<PathBuf>,
    workers: Option<u32>,
    upgrade: bool,
    take_over: Option<upgrade::takeover::Mode>,
}

fn run(config_path: Option<&Path>, o: Overrides) -> ExitCode {
    let Overrides {
        admin_socket,
        metrics_addr,
        cgroup_root,
        pin_dir,
        state_file,
        workers,
        upgrade,
        take_over,
    } = o;
    // Config first: an invalid one exits 64 and attaches nothing.
    let text = match config_path {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("invalid config: {}: {e}", p.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => config::DEFAULT_CONFIG.to_string(),
    };
    let mut cfg = match config::parse(&text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(a) = admin_socket {
        cfg.admin_socket = a;
    }
    if let Some(m) = metrics_addr {
        match m.parse() {
            Ok(a) => cfg.metrics_addr = a,
            Err(_) => {
                eprintln!("invalid config: --metrics-addr: `{m}` is not IP:PORT");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    if let Some(r) = cgroup_root {
        cfg.cgroup_root = Some(r);
    }
    if let Some(p) = pin_dir {
        cfg.pin_dir = p;
    }
    if let Some(p) = state_file {
        cfg.state_file = p;
    }
    if let Some(n) = workers {
        match config::check_workers(n) {
            Ok(n) => cfg.workers = Some(n),
            Err(e) => {
                eprintln!("invalid config: --workers: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let mount = match sys::cgroup2_mount() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let root = match config::check_system(&cfg, &mount) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // `--upgrade` is the explicit take-over: it wins.
    let take_over = take_over.filter(|_| !upgrade);
    match serve(cfg, root, mount, upgrade, take_over) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Checks that the node can run the daemon; returns the check lines for status and the
/// features of optional parts (`needed_for` names) that this kernel lacks.
fn preflight(root: &Path, mount: &Path) -> anyhow::Result<(Vec<(String, String)>, Vec<&'static str>)> {
    let mut checks = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "sockmesh run needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN to enter pod namespaces)"
        );
    }
    let release = sys::kernel_release();
    match sys::parse_release(&release) {
        Some(v) if v >= KERNEL_FLOOR => checks.push(("kernel".into(), format!("{release} >= {}.{}", KERNEL_FLOOR.0, KERNEL_FLOOR.1))),
        Some(_) => anyhow::bail!(
            "kernel {release} is older than {}.{}: netns cookies in sockops/sk_msg/getsockopt programs are missing",
            KERNEL_FLOOR.0,
            KERNEL_FLOOR.1
        ),
        None => checks.push(("kernel".into(), format!("{release}: version not parsed, trying anyway"))),
    }
    checks.push(("cgroup v2".into(), format!("mounted at {}", mount.display())));
    let own = sys::own_cgroup(mount).context("failed to read this process's cgroup")?;
    if !own.starts_with(root) {
        anyhow::bail!(
            "the daemon runs in cgroup {} which is outside cgroup_root {}: sockops must see the daemon's accepted sockets, so start the daemon inside the attach root",
            own.display(),
            root.display()
        );
    }
    checks.push((
        "daemon cgroup".into(),
        format!("{} (inside the attach root)", own.display()),
    ));
    let mut missing = Vec::new();
    let mut optional_off = Vec::new();
    for f in ebpf::probe_features() {
        if !f.present && !f.required && !optional_off.contains(&f.needed_for) {
            optional_off.push(f.needed_for);
        }
        let verdict = if f.present {
            "ok"
        } else if f.required {
            "MISSING"
        } else {
            "missing (feature off)"
        };
        checks.push((
            f.name.to_string(),
            format!("{verdict}: needed for {}", f.needed_for),
        ));
        if !f.present && f.required {
            missing.push(format!("{} (needed for {})", f.name, f.needed_for));
        }
    }
    if !missing.is_empty() {
        anyhow::bail!("this kernel lacks what sockmesh needs: {}", missing.join(", "));
    }
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("failed to open a probe socket")?;
    match sys::netns_cookie(std::os::fd::AsRawFd::as_raw_fd(&probe)) {
        Ok(_) => checks.push(("SO_NETNS_COOKIE".into(), "supported".into())),
        Err(e) => anyhow::bail!("SO_NETNS_COOKIE is not supported by this kernel ({e}): needs 5.14 or later"),
    }
    Ok((checks, optional_off))
}

fn serve(
    mut cfg: config::Config,
    root: PathBuf,
    mount: PathBuf,
    upgrade: bool,
    take_over: Option<upgrade::takeover::Mode>,
) -> anyhow::Result<()> {
    if take_over.is_some() {
        // Before any thread starts: a waiting `--take-over` takes SIGTERM itself.
        upgrade::takeover::block_signals();
        probe::set_not_ready("starting");
    }
    // A successor prepares beside the generation that serves: nicer, until it takes over (or,
    // for a `--take-over` that finds no daemon, until it serves), from its preflight on.
    let mut prepare_nice = if upgrade || take_over.is_some() {
        upgrade::new::lower_priority_while_preparing()
    } else {
        None
    };
    // A successor by `sockmesh upgrade` answers its probe once it serves (the running
    // generation answers on the same path until then); any other `run` from the start.
    if !upgrade {
        probe::start();
    }
    let (mut checks, optional_off) = preflight(&root, &mount)?;
    // Every proxied connection costs two descriptors: take all the host allows.
    match sys::raise_nofile_limit() {
        Ok((before, after)) if after > before => {
            info!("open-files limit raised from {before} to {after} (the hard limit)");
            checks.push((
                "open files".into(),
                format!("limit {after} (raised from {before})"),
            ));
        }
        Ok((_, after)) => checks.push(("open files".into(), format!("limit {after} (the hard limit)"))),
        Err(e) => {
            warn!("could not raise the open-files limit: {e}");
            checks.push(("open files".into(), format!("not raised: {e}")));
        }
    }
    if cfg.acceleration.mode != config::AccelMode::Off && optional_off.contains(&"acceleration") {
        if cfg.acceleration.mode == config::AccelMode::On {
            warn!("acceleration requested but this kernel lacks sk_msg support: off");
        }
        cfg.acceleration.mode = config::AccelMode::Off;
        checks.push(("acceleration".into(), "off: kernel lacks sk_msg support".into()));
    }
    // One daemon per pinned state: a second one would adopt the first one's links. A
    // successor (`--upgrade`) shares the running daemon's lock, passed with its listeners.
    let (inherited, taken_lock) = if upgrade {
        (
            Some(upgrade::new::connect(&cfg.state_file, worker_count(&cfg), false)?),
            None,
        )
    } else if let Some(mode) = take_over {
        let start = upgrade::takeover::acquire(&cfg.state_file, mode, worker_count(&cfg), &mut prepare_nice);
        upgrade::takeover::unblock_signals();
        match start? {
            upgrade::takeover::Start::Fresh(f) => (None, Some(f)),
            upgrade::takeover::Start::TakeOver(i) => (Some(i), None),
            upgrade::takeover::Start::Stop => return Ok(()),
        }
    } else {
        (None, None)
    };
    let lock = match (&inherited, taken_lock) {
        (Some(i), _) => i.lock.try_clone()?,
        (None, Some(f)) => f,
        (None, None) => sys::lock_file(&cfg.state_file.with_extension("lock")).with_context(|| {
            // Started beside the running one (e.g. a DaemonSet's new pod): say who runs and how
            // to take over from it instead.
            let holder = upgrade::read_lock_info(&cfg.state_file)
                .map(|i| {
                    format!(
                        ": generation {} (pid {}) runs; `sockmesh run --upgrade` with the same config takes over from it",
                        i.generation, i.pid
                    )
                })
                .unwrap_or_default();
            format!(
                "another sockmesh daemon owns {} (or its lock cannot be taken){holder}",
                cfg.pin_dir.display()
            )
        })?,
    };
    if inherited.is_none() {
        upgrade::fresh_start(&cfg.state_file);
    }
    if ebpf::has_pinned_state(&cfg.pin_dir) {
        match state::load(&cfg.state_file) {
            Ok(Some(st)) if st.cgroup_root == root => {}
            Ok(Some(st)) => anyhow::bail!(
                "the pinned state in {} is attached to cgroup root {}, not {}: run `sockmesh uninstall --pin-dir {}` first",
                cfg.pin_dir.display(),
                st.cgroup_root.display(),
                root.display(),
                cfg.pin_dir.display()
            ),
            Ok(None) | Err(_) => anyhow::bail!(
                "{} holds pinned links but {} does not say where they are attached: run `sockmesh uninstall --pin-dir {}` first",
                cfg.pin_dir.display(),
                cfg.state_file.display(),
                cfg.pin_dir.display()
            ),
        }
    }
    let bpffs = Path::new("/sys/fs/bpf");
    let mounted_bpffs = sys::ensure_bpffs(bpffs)?;
    checks.push((
        "bpffs".into(),
        if mounted_bpffs {
            "mounted by sockmesh".into()
        } else {
            "present".into()
        },
    ));
    let result = serve_loaded(cfg, root, &mount, checks, &lock, inherited, prepare_nice);
    // Leave the mount if anything is pinned in it (our kept state, or anybody else's).
    if mounted_bpffs
        && std::fs::read_dir(bpffs)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false)
    {
        sys::umount(bpffs);
    }
    result
}

/// Decide whether the short-circuit stays on: the data-path self-test must pass; the
/// blocking-reader check must pass too when acceleration is on by default (`Auto`).
/// The proxy workers to start: `workers`, or one per CPU.
fn worker_count(cfg: &config::Config) -> usize {
    cfg.workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn accel_selftest(
    kernel: &mut ebpf::Kernel,
    mode: config::AccelMode,
    checks: &[(String, String)],
) -> anyhow::Result<daemon::AccelState> {
    use config::AccelMode;
    if mode == AccelMode::Off {
        // Off in the config, or switched off by the preflight (the kernel lacks sk_msg).
        let detail = checks
            .iter()
            .find(|(k, _)| k == "acceleration")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "off in config".into());
        return Ok(daemon::AccelState {
            enabled: false,
            detail,
        });
    }
    let verdict = selftest::run(kernel).map_err(|why| format!("self-test failed: {why}"));
    let verdict = verdict.and_then(|s| match selftest::blocking_reads(kernel) {
        Ok(b) => Ok(format!("{s}; {b}")),
        Err(why) if mode == AccelMode::On => {
            warn!(
                "acceleration on as configured, but blocking readers are at risk on this kernel: {why} \
                 (the sockmap receive path, tcp_bpf_recvmsg*, returns EAGAIN to blocking readers; see ARCHITECTURE.md); the default would be off"
            );
            Ok(format!("{s}; WARNING blocking readers at risk: {why}"))
        }
        Err(why) => Err(format!(
            "off by default on this kernel: blocking-reader check failed: {why} \
             (the sockmap receive path, tcp_bpf_recvmsg*, returns EAGAIN to blocking readers; see ARCHITECTURE.md); set enabled = true to force"
        )),
    });
    Ok(match verdict {
        Ok(s) => {
            info!("acceleration on: {s}");
            daemon::AccelState {
                enabled: true,
                detail: s,
            }
        }
        Err(why) => {
            if mode == AccelMode::On {
                warn!("acceleration self-test failed, short-circuit disabled: {why}");
            } else {
                info!("acceleration off: {why}");
            }
            kernel.disable_acceleration()?;
            daemon::AccelState {
                enabled: false,
                detail: why,
            }
        }
    })
}

fn serve_loaded(
    cfg: config::Config,
    root: PathBuf,
    mount: &Path,
    mut checks: Vec<(String, String)>,
    lock: &std::fs::File,
    inherited: Option<upgrade::new::Inherited>,
    prepare_nice: Option<i32>,
) -> anyhow::Result<()> {
    let opts = ebpf::KernelOptions {
        cgroup_root: &root,
        cgroup_mount: mount,
        pin_dir: &cfg.pin_dir,
        outbound_port: cfg.outbound_port,
        daemon_mark: cfg.daemon_mark,
        accelerate: cfg.acceleration.mode != config::AccelMode::Off,
        accel_max_msg: cfg.acceleration.max_msg_bytes,
        accel_flow_budget: cfg.acceleration.flow_budget_bytes,
        bpf_log: cfg.bpf_log,
        propagation: cfg.propagation,
    };
    let mut kernel = match ebpf::Kernel::load(&opts) {
        Ok(k) => k,
        Err(e) => {
            if let Some(i) = &inherited {
                i.abort(&format!("loading the kernel state failed: {e:#}"));
            }
            return Err(e.into());
        }
    };
    let origin = kernel.origin;
    checks.push((
        "pinned state".into(),
        match origin {
            ebpf::Origin::Fresh => format!("created under {}", cfg.pin_dir.display()),
            ebpf::Origin::Adopted => format!("re-adopted from {}", cfg.pin_dir.display()),
        },
    ));
    checks.push((
        "hooks".into(),
        "connect4/6, getpeername4/6, getsockopt, sockops loaded and attached".into(),
    ));
    kernel.set_bypass(&cfg.bypass_cidrs, &cfg.bypass_ports)?;
    let accel = accel_selftest(&mut kernel, cfg.acceleration.mode, &checks)?;
    upgrade::set_accelerated(accel.enabled);
    let mut pods = cfg.pods.clone();
    let mut resumed_routing = None;
    if origin == ebpf::Origin::Adopted {
        // The previous daemon's enrolment, unless the config says otherwise for the same name.
        match state::load(&cfg.state_file) {
            Ok(Some(st)) if st.cgroup_root == root => {
                resumed_routing = st.routing;
                for p in st.pods {
                    if !pods.iter().any(|q| q.name == p.name) {
                        pods.push(p.into());
                    }
                }
            }
            Ok(Some(st)) => warn!(
                "ignoring {}: it belongs to cgroup root {}",
                cfg.state_file.display(),
                st.cgroup_root.display()
            ),
            Ok(None) => warn!(
                "pinned state without {}: only config pods are enrolled",
                cfg.state_file.display()
            ),
            Err(e) => warn!("ignoring unreadable enrolment state: {e}"),
        }
    }
    let metrics_addr = cfg.metrics_addr;
    let admin_path = cfg.admin_socket.clone();
    let state_file = cfg.state_file.clone();
    let kubernetes = cfg.kubernetes.clone();
    // Thread-per-core: the proxy's workers each run a current-thread runtime of their own
    // (`conn::worker`); the control plane (admin, metrics, links, Kubernetes, upgrades) runs
    // on this small one and reaches the workers through their handles.
    let workers = worker_count(&cfg);
    let (worker_threads, worker_handles) =
        conn::worker::start(workers, cfg.pin_workers).context("failed to start the proxy workers")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CONTROL_THREADS)
        .enable_all()
        .thread_name("sockmesh-ctl")
        .build()
        .context("failed to start the runtime")?;
    let daemon = Arc::new(daemon::Daemon::new(
        cfg,
        root.clone(),
        kernel,
        accel,
        checks,
        conn::Workers::new(worker_handles),
    ));
    // Before any pod is adopted, so that no request sees the config's policy in between.
    if let Some(r) = resumed_routing {
        daemon.resume_routing(r);
    }
    daemon.write_kernel_routes();
    // A successor: everything is ready to take over; wait for the running generation's go
    // (it names its upstream pools, opened below before taking over).
    let warm = match &inherited {
        Some(i) => i.ready()?,
        None => Vec::new(),
    };
    // It serves from here on: the priority it had before it prepared, on every thread.
    if let Some(nice) = prepare_nice {
        upgrade::new::restore_priority(nice);
    }
    let result = rt.block_on(async {
        // Handlers first: a successor is signalled as soon as it serves (before it would
        // reach the wait below, SIGTERM would kill it without the shutdown).
        let signals = signals()?;
        let (admin, metrics) = match &inherited {
            Some(i) => {
                let a = std::os::unix::net::UnixListener::from(i.admin.try_clone()?);
                a.set_nonblocking(true)?;
                let m = std::net::TcpListener::from(i.metrics.try_clone()?);
                m.set_nonblocking(true)?;
                (tokio::net::UnixListener::from_std(a)?, tokio::net::TcpListener::from_std(m)?)
            }
            None => (
                admin::bind(&admin_path)
                    .with_context(|| format!("failed to bind the admin socket {}", admin_path.display()))?,
                tokio::net::TcpListener::bind(metrics_addr)
                    .await
                    .with_context(|| format!("failed to bind the metrics endpoint {metrics_addr}"))?,
            ),
        };
        let handoff_fds = (
            std::os::fd::AsFd::as_fd(&admin).try_clone_to_owned()?,
            std::os::fd::AsFd::as_fd(&metrics).try_clone_to_owned()?,
        );
        info!(admin = %admin_path.display(), metrics = %metrics.local_addr()?, root = %root.display(), workers, "sockmesh running");
        if origin == ebpf::Origin::Adopted {
            let skipped = daemon.adopt(pods);
            info!(skipped = skipped.len(), "re-adopted the previous daemon's state");
        } else {
            for p in pods {
                daemon.enroll(p).context("failed to enrol a pod from the config")?;
            }
        }
        // A switch the previous daemon left unfinished goes on (after the pods' link cgroups).
        daemon.resume_links();
        // Loading parsed the kernel's BTF (megabytes, for the colour tracepoints) and the
        // self-test moved tens of MiB through sockets: hand the freed heap back to the system so
        // the idle daemon is small again (glibc keeps freed pages otherwise).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory of the allocator.
        unsafe {
            libc::malloc_trim(0);
        }
        let admin_task = tokio::spawn(admin::serve(admin, daemon.clone()));
        let metrics_task = tokio::spawn(metrics::serve(metrics, daemon.clone()));
        upgrade::old::stop_on_handoff(vec![admin_task.abort_handle(), metrics_task.abort_handle()]);
        if let Some(i) = inherited {
            // Warm upstream pools for the connections about to move here, then take over.
            upgrade::new::preconnect(&daemon, warm).await;
            i.started(daemon.clone())?;
            // (A no-op when it answers already: `--take-over` did from the start.)
            probe::start();
        }
        // Listen for the next generation (per-generation rendezvous, advertised in the lock).
        if let Err(e) = upgrade::old::listen(upgrade::old::Ctx {
            daemon: daemon.clone(),
            state_file,
            lock: lock.try_clone()?,
            admin: handoff_fds.0,
            metrics: handoff_fds.1,
        }) {
            warn!("upgrades unavailable: the rendezvous socket failed: {e}");
        }
        tokio::spawn(daemon.clone().forward_bpf_logs());
        tokio::spawn(probe::tick());
        tokio::spawn(daemon.clone().kernel_health_loop());
        if let Some(k) = &kubernetes {
            k8s::start(daemon.clone(), k.clone(), mount.to_path_buf(), root.clone()).await;
        }
        metrics::set_ready();
        probe::clear();
        // A DaemonSet pod gets SIGTERM on every rolling update: capture and state stay.
        let sigterm_keeps_state = kubernetes.as_ref().is_some_and(|k| k.sigterm_keeps_state);
        let signal = wait_for_signal(signals);
        tokio::pin!(signal);
        let mut signalled = false;
        let keep_state = loop {
            let keep_state = tokio::select! {
                r = &mut signal => { r?; signalled = true; sigterm_keeps_state }
                keep = daemon.stop_requested() => keep,
            };
            if !upgrade::old::handed_off() {
                break keep_state;
            }
            // The successor serves admin and metrics on the same sockets now.
            admin_task.abort();
            metrics_task.abort();
            // Drain; if the successor dies first, serve again (the hand-off is taken back).
            if !daemon.drain_handed_off().await {
                break keep_state;
            }
            upgrade::old::served_again();
        };
        if upgrade::old::handed_off() {
            // Drained: the successor serves; nothing more to stop here.
        } else if keep_state {
            info!("stopping, keeping pinned state for the next daemon");
        } else {
            info!("shutting down: capture off, draining, then detaching");
        }
        if !upgrade::old::handed_off() {
            daemon.shutdown(keep_state).await;
        }
        // Handed over to a `run --take-over` beside this one (a DaemonSet's new pod): exiting
        // would make the kubelet restart this container, so stay until SIGTERM (unless it came
        // during the drain: the pod is being deleted already).
        let mut idle = None;
        if upgrade::old::handed_to_take_over() {
            let term = signalled
                || tokio::time::timeout(std::time::Duration::ZERO, &mut signal)
                    .await
                    .is_ok();
            if term {
                info!("drained after handing over; SIGTERM came meanwhile: exiting");
            } else if let Some((g, pid)) = upgrade::old::successor() {
                idle = Some(format!(
                    "handed over to generation {g} (pid {pid}), a `run --take-over` beside this one, and drained: \
                     this generation serves nothing and holds nothing, and waits for SIGTERM (exit 0, nothing detached)"
                ));
            }
        }
        anyhow::Ok(idle)
    });
    upgrade::old::finish();
    if upgrade::old::handed_off() {
        // Answers in flight (the `upgrade` request's own) get written before the runtime goes.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if upgrade::owns_admin_socket() {
        let _ = std::fs::remove_file(daemon.admin_socket());
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    worker_threads.stop();
    // Dropping the daemon drops the kernel handle: unpinned links detach now.
    drop(daemon);
    if let Ok(Some(reason)) = &result {
        // Same pid, nothing held: see `become_idle`.
        let e = upgrade::takeover::become_idle(reason);
        error!("could not become idle after the hand-off: {e:#}; staying as this process");
        upgrade::takeover::idle(None, reason);
        return Ok(());
    }
    info!("bye");
    result.map(drop)
}

/// `sockmesh uninstall`: stop the daemon if it answers, then remove every pin and the state file.
fn uninstall(
    config_path: Option<&Path>,
    pin_dir: Option<PathBuf>,
    state_file: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
) -> ExitCode {
    let cfg = match config_path.map(std::fs::read_to_string) {
        None => config::parse(""),
        Some(Ok(text)) => config::parse(&text),
        Some(Err(e)) => {
            eprintln!("invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let pin_dir = pin_dir.unwrap_or(cfg.pin_dir);
    let state_file = state_file.unwrap_or(cfg.state_file);
    let admin_socket = admin_socket.unwrap_or(cfg.admin_socket);
    if admin_socket.exists() {
        match admin::call(&admin_socket, &admin::Request::Stop { keep_state: false }) {
            Ok(_) => {
                println!("stopping the running daemon ({})", admin_socket.display());
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while admin_socket.exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                if admin_socket.exists() {
                    eprintln!("error: the daemon did not stop within 60s");
                    return ExitCode::FAILURE;
                }
            }
            Err(_) => {
                println!(
                    "no daemon answers on {}; removing its socket",
                    admin_socket.display()
                );
                let _ = std::fs::remove_file(&admin_socket);
            }
        }
    }
    match ebpf::remove_pins(&pin_dir) {
        Ok(removed) => {
            for r in &removed {
                println!("removed {r}");
            }
        }
        Err(e) => {
            eprintln!("error: failed to remove pins under {}: {e}", pin_dir.display());
            return ExitCode::FAILURE;
        }
    }
    let _ = std::fs::remove_file(state_file.with_extension("lock"));
    let _ = state::remove(&links::state_path(&state_file));
    match state::remove(&state_file) {
        Ok(true) => println!("removed {}", state_file.display()),
        Ok(false) => {}
        Err(e) => {
            eprintln!("error: failed to remove {}: {e}", state_file.display());
            return ExitCode::FAILURE;
        }
    }
    println!("sockmesh uninstalled: no program, map, pin or attachment of it remains");
    ExitCode::SUCCESS
}

fn cni_install_cmd(
    plugin: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    admin_socket: &Path,
    log_file: Option<&Path>,
    wait_secs: u64,
) -> ExitCode {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
    loop {
        match cni_install::install(plugin, bin_dir, conf_dir, admin_socket, log_file) {
            Ok(conf) => {
                println!(
                    "sockmesh-cni installed in {} and chained into {}",
                    bin_dir.display(),
                    conf.display()
                );
                return ExitCode::SUCCESS;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::time::Instant::now() < deadline => {
                println!("waiting for the node's CNI network config: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(e) => {
                eprintln!("error: failed to install sockmesh-cni: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}

type Signals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

fn signals() -> anyhow::Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    Ok((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
}

async fn wait_for_signal((mut term, mut int): Signals) -> anyhow::Result<()> {
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
