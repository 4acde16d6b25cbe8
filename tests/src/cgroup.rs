//! cgroup v2 helpers: find the mount, list, kill and remove a test-owned subtree; and
//! [`V1LinkCgroups`], test-owned v1 `cpu`/`memory` cgroups for dual links' apps.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The cgroup v2 mount point from `/proc/self/mountinfo` (first mount with fstype `cgroup2`).
///
/// Panics when there is none; use [`try_cgroup2_mount`] to handle that case.
pub fn cgroup2_mount() -> PathBuf {
    try_cgroup2_mount().expect("no cgroup2 mount in /proc/self/mountinfo")
}

/// The cgroup v2 mount point, or an error naming what is missing.
pub fn try_cgroup2_mount() -> Result<PathBuf> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("failed to read /proc/self/mountinfo")?;
    parse_mountinfo_cgroup2(&text).ok_or_else(|| anyhow!("no cgroup2 mount in /proc/self/mountinfo"))
}

/// Parses mountinfo text (see proc(5)): `id parent maj:min root mountpoint opts [optional...] -
/// fstype source superopts`.
pub fn parse_mountinfo_cgroup2(text: &str) -> Option<PathBuf> {
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split_whitespace().next();
        if fstype != Some("cgroup2") {
            continue;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        return Some(PathBuf::from(unescape_octal(mount_point)));
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup id the kernel and `bpf_get_current_cgroup_id()` use: the inode of the directory.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// Pids in `<cgroup>/cgroup.procs` (empty if the file cannot be read).
pub fn procs(cgroup: &Path) -> Vec<i32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The cgroup v2 path of `pid` (the `0::` line of `/proc/<pid>/cgroup`, joined to the mount).
pub fn cgroup_of_pid(pid: u32) -> Result<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("read /proc/{pid}/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| anyhow!("no cgroup v2 line in /proc/{pid}/cgroup"))?;
    Ok(try_cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// Every directory of the subtree rooted at `root`, deepest first (root last).
pub fn subtree_dirs(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    if root.is_dir() {
        walk(root, &mut out);
    }
    out
}

/// Kills every process in the subtree: `cgroup.kill` on the root (kernel 5.14+), then SIGKILL to
/// any pid still listed, until the subtree is empty or `timeout` passes.
pub fn kill_subtree(root: &Path, timeout: Duration) -> Result<()> {
    let me = std::process::id() as i32;
    if !root.is_dir() {
        return Ok(());
    }
    let _ = std::fs::write(root.join("cgroup.kill"), b"1");
    let deadline = Instant::now() + timeout;
    loop {
        let mut remaining = Vec::new();
        for dir in subtree_dirs(root) {
            for pid in procs(&dir) {
                if pid > 1 && pid != me {
                    remaining.push(pid);
                }
            }
        }
        if remaining.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "processes still alive in {} after {timeout:?}: {remaining:?}",
                root.display()
            );
        }
        for pid in &remaining {
            // SAFETY: plain syscall; the pid was just read from a cgroup this harness owns.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the subtree deepest first, retrying `EBUSY` until `timeout`.
pub fn remove_subtree(root: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for dir in subtree_dirs(root) {
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => bail!("failed to remove cgroup {}: {e}", dir.display()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let text = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/pids rw,relatime shared:10 - cgroup cgroup rw,pids
";
        assert_eq!(
            parse_mountinfo_cgroup2(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn handles_optional_fields_and_escapes() {
        let text = "41 31 0:38 / /mnt/my\\040cg rw shared:1 master:2 - cgroup2 none rw\n";
        assert_eq!(parse_mountinfo_cgroup2(text), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(parse_mountinfo_cgroup2("1 2 0:1 / / rw - ext4 /dev/x rw\n"), None);
    }

    #[test]
    fn this_machine_has_a_cgroup2_mount() {
        // Every supported host has one; this only reads /proc.
        let p = try_cgroup2_mount().unwrap();
        assert!(p.join("cgroup.procs").exists(), "{}", p.display());
    }
}

/// Test-owned cgroup v1 `cpu` and `memory` cgroups `<ctrl>/<prefix>/<link>` for dual links'
/// apps (the directories the daemon's link actuator writes). Drop it after the processes in
/// it are gone (declare it before them): it kills what is left (only test processes can be
/// there) and removes the directories.
pub struct V1LinkCgroups {
    base: Vec<PathBuf>,
    links: Vec<String>,
}

impl V1LinkCgroups {
    /// Whether the v1 `cpu` and `memory` hierarchies are mounted at `/sys/fs/cgroup/<ctrl>`.
    pub fn available() -> bool {
        ["cpu", "memory"]
            .iter()
            .all(|c| Path::new("/sys/fs/cgroup").join(c).join("cgroup.procs").exists())
    }

    pub fn new(prefix: &str, links: &[&str]) -> Result<V1LinkCgroups> {
        let mut g = V1LinkCgroups {
            base: Vec::new(),
            links: links.iter().map(|l| l.to_string()).collect(),
        };
        for ctrl in ["cpu", "memory"] {
            let root = Path::new("/sys/fs/cgroup").join(ctrl);
            if !root.join("cgroup.procs").exists() {
                bail!("cgroup v1 `{ctrl}` is not mounted at {}", root.display());
            }
            let base = root.join(prefix);
            std::fs::create_dir(&base).with_context(|| format!("create {}", base.display()))?;
            g.base.push(base.clone());
            for link in links {
                std::fs::create_dir(base.join(link))
                    .with_context(|| format!("create {}/{link}", base.display()))?;
            }
        }
        Ok(g)
    }

    /// The link's directories, `cpu` first.
    pub fn dirs(&self, link: &str) -> Vec<PathBuf> {
        self.base.iter().map(|b| b.join(link)).collect()
    }

    pub fn cpu(&self, link: &str) -> PathBuf {
        self.base[0].join(link)
    }

    pub fn mem(&self, link: &str) -> PathBuf {
        self.base[1].join(link)
    }

    /// Put a process (all its threads) in the link's cgroups.
    pub fn enter(&self, link: &str, pid: u32) -> Result<()> {
        for d in self.dirs(link) {
            std::fs::write(d.join("cgroup.procs"), pid.to_string())
                .with_context(|| format!("move {pid} into {}", d.display()))?;
        }
        Ok(())
    }

    /// A pod's `links = { <link> = [dirs...], ... }` config line for these cgroups.
    pub fn links_toml(&self) -> String {
        let lists: Vec<String> = self
            .links
            .iter()
            .map(|l| {
                let dirs: Vec<String> = self
                    .dirs(l)
                    .iter()
                    .map(|d| crate::daemon::toml_str(&d.to_string_lossy()))
                    .collect();
                format!("{l} = [{}]", dirs.join(", "))
            })
            .collect();
        format!("links = {{ {} }}", lists.join(", "))
    }

    /// A knob's value as the kernel shows it (empty when unreadable).
    pub fn knob(dir: &Path, file: &str) -> String {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }
}

impl Drop for V1LinkCgroups {
    fn drop(&mut self) {
        for base in &self.base {
            for link in &self.links {
                let d = base.join(link);
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    let pids = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                    if pids.trim().is_empty() || Instant::now() > deadline {
                        break;
                    }
                    for p in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        // SAFETY: kill has no memory preconditions; only test processes are here.
                        unsafe { libc::kill(p, libc::SIGKILL) };
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = std::fs::remove_dir(&d);
            }
            let _ = std::fs::remove_dir(base);
        }
    }
}
