//! Small system facts and operations: the cgroup v2 mount, cgroup ids, bpffs, network
//! namespaces (enter, create a socket, return), socket options the daemon needs.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::{
        fd::{AsFd, AsRawFd, RawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SysError {
    #[error("no cgroup v2 mount found in /proc/self/mountinfo")]
    NoCgroup2,
    #[error("failed to read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("failed to open network namespace `{path}`: {source}")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("failed to enter network namespace `{path}`: {source}")]
    EnterNetns { path: PathBuf, source: io::Error },
    #[error("failed to mount bpffs at {path}: {source}")]
    MountBpffs { path: PathBuf, source: io::Error },
}

/// The cgroup v2 mount point, from `/proc/self/mountinfo` (`/sys/fs/cgroup` on most nodes,
/// `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> Result<PathBuf, SysError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| SysError::Read {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    parse_mountinfo(&text, "cgroup2").ok_or(SysError::NoCgroup2)
}

/// First mount point of `fstype` in mountinfo text.
pub fn parse_mountinfo(text: &str, fstype: &str) -> Option<PathBuf> {
    for line in text.lines() {
        // id parent maj:min root mountpoint opts [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some(fstype) {
            if let Some(mp) = left.split_whitespace().nth(4) {
                return Some(PathBuf::from(mp.replace("\\040", " ")));
            }
        }
    }
    None
}

/// A cgroup v2 directory's id is its inode number (what `bpf_get_current_cgroup_id` returns).
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// The cgroup v2 path of this process, under `mount`.
pub fn own_cgroup(mount: &Path) -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    for line in text.lines() {
        if let Some(rel) = line.strip_prefix("0::") {
            return Ok(mount.join(rel.trim_start_matches('/')));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no cgroup v2 entry in /proc/self/cgroup",
    ))
}

/// Mount bpffs at `path` unless one is there. Returns true when this call mounted it.
pub fn ensure_bpffs(path: &Path) -> Result<bool, SysError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| SysError::Read {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("bpf")
            && left.split_whitespace().nth(4).map(Path::new) == Some(path)
        {
            return Ok(false);
        }
    }
    std::fs::create_dir_all(path).map_err(|source| SysError::MountBpffs {
        path: path.into(),
        source,
    })?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let target = c(path.to_str().unwrap_or("/sys/fs/bpf"));
    // SAFETY: plain mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            c("bpf").as_ptr(),
            target.as_ptr(),
            c("bpf").as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(SysError::MountBpffs {
            path: path.into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(true)
}

pub fn umount(path: &Path) {
    if let Ok(p) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: valid C string.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Take an exclusive, non-blocking `flock` on `path` (created if needed). The lock lasts as long
/// as the returned file is open, and dies with the process.
pub fn lock_file(path: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `(major, minor)` of a release string like `6.18.44-foo`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// A network namespace the daemon can step into to create sockets.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    file: File,
}

impl NetNs {
    pub fn open(path: &Path) -> Result<Self, SysError> {
        let file = File::open(path).map_err(|source| SysError::OpenNetns {
            path: path.into(),
            source,
        })?;
        Ok(Self {
            path: path.into(),
            file,
        })
    }

    /// This thread's current network namespace.
    pub fn current() -> Result<Self, SysError> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Run `f` with this thread inside the namespace, then return. `f` must not block or yield:
    /// it creates sockets, which keep their namespace after we leave. Failing to come back would
    /// leave a runtime thread in a pod's namespace, so that aborts the process.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, SysError> {
        let home = NetNs::current()?;
        setns(self.file.as_fd().as_raw_fd()).map_err(|source| SysError::EnterNetns {
            path: self.path.clone(),
            source,
        })?;
        let out = f();
        if let Err(e) = setns(home.file.as_raw_fd()) {
            eprintln!("fatal: failed to return to the daemon's network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }
}

fn setns(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns(2) on a valid namespace fd.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Set `net.ipv4.tcp_migrate_req` (Linux 5.14+, per netns) of `ns`: with it on, a closed
/// member of an `SO_REUSEPORT` group hands its queued connections to another member instead of
/// resetting them. Returns whether it changed.
pub fn set_migrate_req(ns: &NetNs, on: bool) -> io::Result<bool> {
    ns.run(|| -> io::Result<bool> {
        // /proc/sys/net is the namespace of the thread that opens it.
        let path = "/proc/sys/net/ipv4/tcp_migrate_req";
        let was = std::fs::read_to_string(path)?.trim() != "0";
        if was != on {
            std::fs::write(path, if on { "1" } else { "0" })?;
        }
        Ok(was != on)
    })
    .map_err(|e| io::Error::other(e.to_string()))?
}

/// The connections waiting in a listening socket's accept queue (`TCP_INFO`'s `tcpi_unacked`
/// for a listener).
pub fn accept_queue_len(fd: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: tcp_info is plain data; the kernel writes at most `len` bytes of it.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        if libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(info.tcpi_unacked as u64)
    }
}

/// The pod's own addresses: every address on a non-loopback interface of `ns`, IPv6
/// link-local excluded.
pub fn local_addrs_in(ns: &NetNs) -> io::Result<Vec<std::net::IpAddr>> {
    ns.run(|| -> io::Result<Vec<std::net::IpAddr>> {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs allocates a list we free below.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: cur walks the list getifaddrs returned.
            let ifa = unsafe { &*cur };
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0 {
                continue;
            }
            // SAFETY: ifa_addr is non-null and its family says which sockaddr it is.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            let ip = match family {
                libc::AF_INET => {
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    std::net::IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    let v6 = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    if v6.segments()[0] & 0xffc0 == 0xfe80 {
                        continue;
                    }
                    std::net::IpAddr::V6(v6)
                }
                _ => continue,
            };
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        // SAFETY: the list from getifaddrs, freed once.
        unsafe { libc::freeifaddrs(head) };
        Ok(out)
    })
    .map_err(|e| io::Error::other(e.to_string()))?
}

const SO_NETNS_COOKIE: libc::c_int = 71;

/// `SO_NETNS_COOKIE` of a socket: the id the kernel programs see for its namespace.
pub fn netns_cookie(fd: RawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 with its size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// The cookie of a namespace, measured with a throwaway socket created inside it.
pub fn netns_cookie_of(ns: &NetNs) -> io::Result<u64> {
    let sock = ns
        .run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None))
        .map_err(|e| io::Error::other(e.to_string()))??;
    netns_cookie(sock.as_raw_fd())
}

/// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` of an accepted socket, as the kernel hook answers.
pub fn original_dst(fd: RawFd, v6: bool) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain old data; the kernel fills at most `len` bytes.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            mesh_common::SO_ORIGINAL_DST,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    sockaddr_to_std(&ss, len)
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> io::Result<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: family says sockaddr_in and the length covers it.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        f => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected address family {f} (len {len})"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_finds_cgroup2_and_bpf() {
        let text = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
40 22 0:33 / /sys/fs/bpf rw - bpf bpf rw,mode=700
";
        assert_eq!(
            parse_mountinfo(text, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_mountinfo(text, "bpf"), Some(PathBuf::from("/sys/fs/bpf")));
        assert_eq!(parse_mountinfo(text, "xfs"), None);
    }

    #[test]
    fn release_parsing() {
        assert_eq!(parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn original_dst_on_a_plain_socket_is_an_error_not_garbage() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // No hook attached in host tests: the kernel says no (ENOPROTOOPT or ENOENT).
        assert!(original_dst(c.as_raw_fd(), false).is_err());
    }
}

/// The process's open-files limit: `(soft, hard)`.
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur as u64, r.rlim_max as u64))
}

/// Raise the open-files soft limit to the hard limit (what the host allows this process).
/// Returns `(before, after)` soft limits.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = nofile_limit()?;
    if soft >= hard {
        return Ok((soft, soft));
    }
    let r = libc::rlimit {
        rlim_cur: hard as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads one struct rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((soft, nofile_limit()?.0))
}

/// Descriptors this process has open now (entries of /proc/self/fd).
pub fn open_fds() -> io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64)
}

/// EMFILE (this process) or ENFILE (the whole system): out of file descriptors.
pub fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

#[cfg(test)]
mod fd_tests {
    use super::*;

    #[test]
    fn raising_the_open_files_limit_reaches_the_hard_limit() {
        let (_, hard) = nofile_limit().unwrap();
        let (before, after) = raise_nofile_limit().unwrap();
        assert!(after >= before);
        assert_eq!(after, hard);
        assert!(open_fds().unwrap() >= 3);
    }

    #[test]
    fn emfile_and_enfile_are_out_of_descriptors_and_nothing_else_is() {
        assert!(is_out_of_fds(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_out_of_fds(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_out_of_fds(&io::Error::from_raw_os_error(libc::ECONNABORTED)));
    }
}

/// Now, in milliseconds of Unix time (0 before 1970).
pub fn unix_ms() -> u64 {
    unix_us() / 1000
}

/// Now, in microseconds of Unix time (0 before 1970): comparable across processes.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
