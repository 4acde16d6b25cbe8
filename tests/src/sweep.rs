//! What killed harness processes left behind, swept once per process at harness start.
//!
//! A test process killed by a signal (`timeout -s KILL`, the OOM killer) runs no `Drop` guard:
//! its node's cgroup subtree (and any daemon still in it), network namespaces, pinned state
//! (links stay attached while their bpffs pin exists) and temp dirs stay. Every name the harness
//! gives these starts with a fixed prefix and the owning process's pid
//! (`sockmesh-test-<pid>-<n>`, see [`OWNED`]), so the next harness start can tell whose they
//! are: [`sweep_once`] removes only what belongs to a pid that is no longer running, and never
//! touches a name without such a prefix or a live process's resources (test binaries of other
//! checkouts may run at the same time on the same machine).
//!
//! Limit: pids are those of this pid namespace; a harness in another pid namespace sharing this
//! machine's bpffs and cgroup tree would look dead here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{cgroup, node};

const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const RMDIR_TIMEOUT: Duration = Duration::from_secs(10);
const BPFFS: &str = "/sys/fs/bpf";

/// What the harness names, by the prefix that precedes the owner's pid.
pub struct Owned {
    /// cgroup v2 roots (`<cgroup2>/<prefix><pid>-<n>`) and their twins in cgroup v1 hierarchies
    /// (the dual-link tests' `cpu`/`memory` dirs, runc's pod cgroups).
    pub cgroups: &'static [&'static str],
    /// Pinned state directories under `/sys/fs/bpf`.
    pub pin_dirs: &'static [&'static str],
    /// Network namespaces under `/run/netns`.
    pub netns: &'static [&'static str],
    /// Directories and files under the temp dir.
    pub temp: &'static [&'static str],
}

/// Every name prefix the harness creates resources under; the owner's pid follows it, then `-`
/// or the end of the name.
pub const OWNED: Owned = Owned {
    // VirtualNode (and its V1LinkCgroups); KubeNode's kubepods.
    cgroups: &["sockmesh-test-", "sockmesh-k8s-"],
    // Daemon's pin dirs; tests/k8s.rs's.
    pin_dirs: &["sockmesh-test-", "sockmesh-k8s-test-"],
    // VirtualNode: `<node prefix>-node`, `<node prefix>-<pod>`.
    netns: &["sockmesh-test-"],
    // TempDir; Daemon::hand_over_state's state file copies.
    temp: &["sockmesh-test-", "sockmesh-test-state-"],
};

/// The pid in `name` after `prefix` (`sockmesh-test-` + `1234-5` -> 1234), if `name` is one of
/// the harness's.
pub fn owner(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits = rest.split('-').next()?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn owner_any(name: &str, prefixes: &[&str]) -> Option<u32> {
    prefixes.iter().find_map(|p| owner(name, p))
}

/// Whether `pid` is a running process here. A zombie (killed, not yet reaped) is not; anything
/// that cannot be read for another reason than absence counts as running.
pub fn running(pid: u32) -> bool {
    if pid == 0 || pid == std::process::id() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(s) => {
            let field = |k: &str| crate::util::status_field(&s, k).unwrap_or_default();
            let state = field("State:");
            let threads: u32 = field("Threads:").parse().unwrap_or(1);
            !((state.starts_with('Z') || state.starts_with('X')) && threads <= 1)
        }
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

/// Entries of `dir` whose name belongs to a dead owner, with the owner.
fn dead_entries(dir: &Path, prefixes: &[&str]) -> Vec<(PathBuf, u32)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, u32)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let pid = owner_any(&name, prefixes)?;
            (!running(pid)).then(|| (e.path(), pid))
        })
        .collect();
    out.sort();
    out
}

/// Removes a pinned state directory bottom-up. Unlinking a link's pin drops the last reference
/// to it once its owner is dead, which detaches it; the same for maps.
fn unpin_tree(dir: &Path, removed: &mut usize) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if e.file_type()?.is_dir() {
            unpin_tree(&p, removed)?;
        } else {
            match std::fs::remove_file(&p) {
                Ok(()) => *removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Mount points at or below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    v
}

/// Detaches (`MNT_DETACH`) every mount at or below `dir`, deepest first.
pub fn detach_mounts_below(dir: &Path) {
    for m in mounts_below(dir) {
        if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid C string; umount2 has no memory preconditions.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Mount points of the cgroup v1 hierarchies (fstype `cgroup`).
fn cgroup1_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next() == Some("cgroup")).then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// SIGKILLs every process whose command line names one of `paths` or a path inside one (a node
/// runtime and its shims, configured in a test's temp dir, run in no test cgroup); returns how
/// many.
pub fn kill_processes_naming(paths: &[PathBuf]) -> usize {
    if paths.is_empty() {
        return 0;
    }
    let me = std::process::id();
    let mut n = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let names = cmdline.split(|b| *b == 0).any(|arg| {
            let arg = String::from_utf8_lossy(arg);
            paths.iter().any(|d| {
                let d = d.to_string_lossy();
                arg.match_indices(&*d)
                    .any(|(i, _)| matches!(arg.as_bytes().get(i + d.len()), None | Some(b'/')))
            })
        });
        if names {
            // SAFETY: kill has no memory preconditions; the process runs from a dead test's dir.
            if unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
                n += 1;
            }
        }
    }
    n
}

/// Where to look (the machine's places, or a test's stand-ins).
pub struct Places {
    pub cgroup2: Option<PathBuf>,
    pub cgroup1: Vec<PathBuf>,
    pub bpffs: PathBuf,
    pub netns: PathBuf,
    pub temp: PathBuf,
}

impl Places {
    pub fn machine() -> Places {
        Places {
            cgroup2: cgroup::try_cgroup2_mount().ok(),
            cgroup1: cgroup1_mounts(),
            bpffs: PathBuf::from(BPFFS),
            netns: PathBuf::from(node::NETNS_DIR),
            temp: std::env::temp_dir(),
        }
    }
}

/// Removes what dead harness processes left in `places`; returns one line per thing removed
/// (and per problem, prefixed `failed:`). Order: the processes still in their cgroups (a
/// daemon of a killed test keeps its links' fds) and those whose command line names a dead
/// test's temp dir (a Kubernetes node's containerd and shims), the pinned state, the cgroups
/// bottom-up, the network namespaces (their veths and bridges go with them), the temp dirs
/// (mounts below them detached first).
pub fn sweep(places: &Places) -> Vec<String> {
    let mut log = Vec::new();
    let mut cgroups: Vec<(PathBuf, u32)> = Vec::new();
    if let Some(cg2) = &places.cgroup2 {
        cgroups.extend(dead_entries(cg2, OWNED.cgroups));
    }
    for v1 in &places.cgroup1 {
        cgroups.extend(dead_entries(v1, OWNED.cgroups));
    }
    cgroups.retain(|(p, _)| p.is_dir());
    for (root, pid) in &cgroups {
        let n: usize = cgroup::subtree_dirs(root)
            .iter()
            .map(|d| cgroup::procs(d).len())
            .sum();
        if n > 0 {
            match cgroup::kill_subtree(root, KILL_TIMEOUT) {
                Ok(()) => log.push(format!(
                    "killed {n} process(es) left in {} by dead test process {pid}",
                    root.display()
                )),
                Err(e) => log.push(format!("failed: {e:#}")),
            }
        }
    }
    let temp = dead_entries(&places.temp, OWNED.temp);
    let temp_dirs: Vec<PathBuf> = temp
        .iter()
        .filter(|(p, _)| p.is_dir())
        .map(|(p, _)| p.clone())
        .collect();
    match kill_processes_naming(&temp_dirs) {
        0 => {}
        n => log.push(format!(
            "killed {n} process(es) running from dead test processes' temp dirs"
        )),
    }
    for (dir, pid) in dead_entries(&places.bpffs, OWNED.pin_dirs) {
        if !dir.is_dir() {
            continue;
        }
        let mut n = 0;
        match unpin_tree(&dir, &mut n) {
            Ok(()) => log.push(format!(
                "unpinned {} ({n} pinned links and maps) left by dead test process {pid}",
                dir.display()
            )),
            Err(e) => log.push(format!("failed: unpin {}: {e}", dir.display())),
        }
    }
    for (root, pid) in &cgroups {
        match cgroup::remove_subtree(root, RMDIR_TIMEOUT) {
            Ok(()) => log.push(format!(
                "removed cgroup {} left by dead test process {pid}",
                root.display()
            )),
            Err(e) => log.push(format!("failed: {e:#}")),
        }
    }
    for (path, pid) in dead_entries(&places.netns, OWNED.netns) {
        match node::remove_netns_file(&path) {
            Ok(()) => log.push(format!(
                "deleted netns {} left by dead test process {pid}",
                path.display()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log.push(format!("failed: delete netns {}: {e}", path.display())),
        }
    }
    for (path, pid) in temp {
        let result = if path.is_dir() {
            // A node runtime's mounts (rootfs, shm): detached, never deleted through.
            detach_mounts_below(&path);
            if !mounts_below(&path).is_empty() {
                log.push(format!(
                    "failed: {} (of dead test process {pid}) still has mounts below it: left alone",
                    path.display()
                ));
                continue;
            }
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => log.push(format!(
                "removed {} left by dead test process {pid}",
                path.display()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log.push(format!("failed: remove {}: {e}", path.display())),
        }
    }
    log
}

/// [`sweep`] of this machine, once per process, printing every line (`harness sweep: ...`).
/// Runs at harness start: [`crate::require_privileged`], [`crate::require_root`] and
/// [`crate::VirtualNode::new`] call it. Only root can sweep; for anybody else it does nothing.
pub fn sweep_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        for line in sweep(&Places::machine()) {
            eprintln!("harness sweep: {line}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_reads_the_pid_after_the_prefix() {
        assert_eq!(owner("sockmesh-test-1234-5", "sockmesh-test-"), Some(1234));
        assert_eq!(owner("sockmesh-test-1234-5-node", "sockmesh-test-"), Some(1234));
        assert_eq!(owner("sockmesh-test-77", "sockmesh-test-"), Some(77));
        assert_eq!(
            owner("sockmesh-test-state-9-1.json", "sockmesh-test-state-"),
            Some(9)
        );
        assert_eq!(owner("sockmesh-k8s-test-42", "sockmesh-k8s-test-"), Some(42));
        // Not the harness's, or not this prefix's.
        assert_eq!(owner("sockmesh-test-state-9-1.json", "sockmesh-test-"), None);
        assert_eq!(owner("sockmesh-k8s-test-42", "sockmesh-k8s-"), None);
        assert_eq!(owner("sockmesh", "sockmesh-test-"), None);
        assert_eq!(owner("sockmesh-test-", "sockmesh-test-"), None);
        assert_eq!(owner("sockmesh-test-12x-1", "sockmesh-test-"), None);
        assert_eq!(owner("sockmesh-testing-1-1", "sockmesh-test-"), None);
    }

    #[test]
    fn this_process_runs_and_a_killed_child_does_not_even_before_it_is_reaped() {
        assert!(running(std::process::id()));
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let pid = child.id();
        assert!(running(pid));
        child.kill().unwrap();
        crate::eventually(Duration::from_secs(5), || {
            anyhow::ensure!(!running(pid), "{pid} still runs");
            Ok(())
        })
        .unwrap();
        // Not reaped yet: a zombie, which holds nothing.
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        child.wait().unwrap();
    }

    /// The selection on plain directories: dead owners' entries go, live ones' and foreign names
    /// stay.
    #[test]
    fn sweep_removes_only_dead_owners_entries() {
        let base = std::env::temp_dir().join(format!(
            "sweep-unit-{}-{}",
            std::process::id(),
            crate::util::unique()
        ));
        let mk = |d: &str| {
            let p = base.join(d);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let (bpffs, netns, temp) = (mk("bpf"), mk("netns"), mk("tmp"));
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let live = std::process::id();
        let dead_pin = bpffs.join(format!("sockmesh-test-{dead_pid}-3"));
        std::fs::create_dir_all(dead_pin.join("links")).unwrap();
        std::fs::write(dead_pin.join("links/l1"), b"").unwrap();
        let live_pin = bpffs.join(format!("sockmesh-test-{live}-3"));
        std::fs::create_dir_all(&live_pin).unwrap();
        let foreign = bpffs.join("sockmesh");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(netns.join(format!("sockmesh-test-{dead_pid}-3-node")), b"").unwrap();
        std::fs::write(netns.join(format!("sockmesh-test-{live}-3-node")), b"").unwrap();
        std::fs::create_dir_all(temp.join(format!("sockmesh-test-{dead_pid}-4-daemon"))).unwrap();
        std::fs::write(temp.join(format!("sockmesh-test-state-{dead_pid}-5.json")), b"{}").unwrap();
        std::fs::create_dir_all(temp.join(format!("sockmesh-test-{live}-4-daemon"))).unwrap();
        if running(dead_pid) {
            // The pid was handed out again at once: nothing to check this time.
            std::fs::remove_dir_all(&base).unwrap();
            return;
        }
        let log = sweep(&Places {
            cgroup2: None,
            cgroup1: Vec::new(),
            bpffs: bpffs.clone(),
            netns: netns.clone(),
            temp: temp.clone(),
        });
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names(&bpffs),
            vec!["sockmesh".to_owned(), format!("sockmesh-test-{live}-3")]
        );
        assert_eq!(names(&netns), vec![format!("sockmesh-test-{live}-3-node")]);
        assert_eq!(names(&temp), vec![format!("sockmesh-test-{live}-4-daemon")]);
        assert_eq!(log.len(), 4, "{log:#?}");
        assert!(log[0].contains("(1 pinned links and maps)"), "{log:#?}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
