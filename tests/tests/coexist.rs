//! Coexistence with a "foreign" cgroup BPF program, as a CNI would attach one: a
//! `cgroup/connect4` program that counts every connect in an ARRAY map, attached with
//! `BPF_F_ALLOW_MULTI` to the same cgroup sockmesh attaches to (the node's cgroup root), before
//! and after the daemon starts. Both must keep working: sockmesh still captures enrolled pods'
//! connects, and the foreign program still sees every connect, enrolled or not.
//!
//! The foreign program is built here with raw `bpf(2)` syscalls (no toolchain): hand-assembled
//! instructions, loaded with the verifier log on, attached with `BPF_PROG_ATTACH` and detached by
//! a Drop guard.
//!
//! ```sh
//! SOCKMESH_BIN=target/release/sockmesh cargo test -p sockmesh-tests --test coexist -- --test-threads=1
//! ```

use std::time::Duration;

use anyhow::bail;
use sockmesh_tests::checks::{counter, wait_counter_eq, whoami};
use sockmesh_tests::cluster::{connections, status_dump};
use sockmesh_tests::daemon::basic_config;
use sockmesh_tests::{attached_programs, eventually, require_privileged, Daemon, Pod, Server, VirtualNode};

const SETTLE: Duration = Duration::from_secs(10);

/// A CNI-like `cgroup/connect4` program made with raw `bpf(2)` calls.
mod foreign {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::path::Path;

    use anyhow::{bail, Context, Result};

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_PROG_DETACH: libc::c_long = 9;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    const BPF_F_ALLOW_MULTI: u32 = 2;
    const BPF_PSEUDO_MAP_FD: u8 = 1;
    const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
    /// The name `bpftool cgroup tree` shows.
    pub const PROG_NAME: &str = "foreign_cni";

    #[repr(C)]
    #[derive(Default)]
    struct MapCreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }

    #[repr(C)]
    #[derive(Default)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct AttachAttr {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
    }

    /// `struct bpf_insn`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Insn {
        code: u8,
        /// dst_reg in the low nibble, src_reg in the high one.
        regs: u8,
        off: i16,
        imm: i32,
    }

    const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src << 4) | (dst & 0xf),
            off,
            imm,
        }
    }

    /// `*(u64 *)map_value(key 0) += 1` (atomically), then `return 1` (allow the connect).
    fn program(map_fd: i32) -> Vec<Insn> {
        // Opcodes (uapi/linux/bpf.h, bpf_common.h).
        const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW
        const ST_MEM_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
        const MOV64_REG: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
        const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
        const ADD64_IMM: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
        const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
        const JEQ_IMM: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
        const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_ATOMIC | BPF_DW
        const ATOMIC_ADD: i32 = 0x00; // BPF_ADD
        const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
        vec![
            insn(ST_MEM_W, 10, 0, -4, 0),                    // *(u32 *)(r10 - 4) = 0 (the key)
            insn(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, map_fd), // r1 = &map
            insn(0, 0, 0, 0, 0),                             //   (second half of ld_imm64)
            insn(MOV64_REG, 2, 10, 0, 0),                    // r2 = r10
            insn(ADD64_IMM, 2, 0, 0, -4),                    // r2 -= 4 (&key)
            insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),   // r0 = lookup(r1, r2)
            insn(JEQ_IMM, 0, 0, 2, 0),                       // if r0 == NULL skip 2
            insn(MOV64_IMM, 1, 0, 0, 1),                     // r1 = 1
            insn(ATOMIC_DW, 0, 1, 0, ATOMIC_ADD),            // lock *(u64 *)(r0 + 0) += r1
            insn(MOV64_IMM, 0, 0, 0, 1),                     // r0 = 1 (allow)
            insn(EXIT, 0, 0, 0, 0),                          // return r0
        ]
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
        // SAFETY: `attr` is a live, properly laid out bpf_attr prefix of the given size; the
        // kernel zero-extends the rest.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    fn name16(s: &str) -> [u8; 16] {
        let mut n = [0u8; 16];
        for (d, b) in n.iter_mut().zip(s.bytes().take(15)) {
            *d = b;
        }
        n
    }

    /// The map, the program and (once attached) the cgroup it is attached to. Dropping it
    /// detaches the program; closing the fds frees both.
    #[derive(Debug)]
    pub struct ForeignProg {
        map: OwnedFd,
        prog: OwnedFd,
        attached: Option<(OwnedFd, String)>,
    }

    impl ForeignProg {
        /// Creates the counter map and loads the program (the verifier log is in the error).
        pub fn load() -> Result<ForeignProg> {
            let mut m = MapCreateAttr {
                map_type: BPF_MAP_TYPE_ARRAY,
                key_size: 4,
                value_size: 8,
                max_entries: 1,
                map_name: name16("foreign_count"),
                ..Default::default()
            };
            let fd = bpf(BPF_MAP_CREATE, &mut m).context("BPF_MAP_CREATE (ARRAY u32 -> u64, 1 entry)")?;
            // SAFETY: a fresh fd the kernel just gave us.
            let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };

            let insns = program(map.as_raw_fd());
            let license = CString::new("GPL").expect("no NUL");
            let mut log = vec![0u8; 1 << 16];
            let mut p = ProgLoadAttr {
                prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                insn_cnt: insns.len() as u32,
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: 1,
                log_size: log.len() as u32,
                log_buf: log.as_mut_ptr() as u64,
                prog_name: name16(PROG_NAME),
                expected_attach_type: BPF_CGROUP_INET4_CONNECT,
                ..Default::default()
            };
            let r = bpf(BPF_PROG_LOAD, &mut p);
            let log_text =
                String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned();
            match r {
                Ok(fd) => {
                    // SAFETY: a fresh fd the kernel just gave us.
                    let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
                    Ok(ForeignProg {
                        map,
                        prog,
                        attached: None,
                    })
                }
                Err(e) => {
                    eprintln!("==== verifier log of the foreign program ====\n{log_text}\n==== end ====");
                    bail!("BPF_PROG_LOAD of the foreign connect4 program failed: {e}\nverifier log:\n{log_text}")
                }
            }
        }

        /// `BPF_PROG_ATTACH` to `cgroup` as `BPF_CGROUP_INET4_CONNECT` with `BPF_F_ALLOW_MULTI`.
        pub fn attach(&mut self, cgroup: &Path) -> Result<()> {
            if self.attached.is_some() {
                bail!("already attached");
            }
            let cg = std::fs::File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
            let cg: OwnedFd = cg.into();
            let mut a = AttachAttr {
                target_fd: cg.as_raw_fd() as u32,
                attach_bpf_fd: self.prog.as_raw_fd() as u32,
                attach_type: BPF_CGROUP_INET4_CONNECT,
                attach_flags: BPF_F_ALLOW_MULTI,
                replace_bpf_fd: 0,
            };
            bpf(BPF_PROG_ATTACH, &mut a)
                .with_context(|| format!("BPF_PROG_ATTACH (ALLOW_MULTI) to {}", cgroup.display()))?;
            self.attached = Some((cg, cgroup.display().to_string()));
            Ok(())
        }

        /// `BPF_PROG_DETACH` (a no-op when not attached).
        pub fn detach(&mut self) -> Result<()> {
            let Some((cg, what)) = self.attached.take() else {
                return Ok(());
            };
            let mut a = AttachAttr {
                target_fd: cg.as_raw_fd() as u32,
                attach_bpf_fd: self.prog.as_raw_fd() as u32,
                attach_type: BPF_CGROUP_INET4_CONNECT,
                ..Default::default()
            };
            bpf(BPF_PROG_DETACH, &mut a).with_context(|| format!("BPF_PROG_DETACH from {what}"))?;
            Ok(())
        }

        /// The counter (value of key 0).
        pub fn count(&self) -> Result<u64> {
            let key: u32 = 0;
            let mut value: u64 = 0;
            let mut a = MapElemAttr {
                map_fd: self.map.as_raw_fd() as u32,
                key: &key as *const u32 as u64,
                value: &mut value as *mut u64 as u64,
                ..Default::default()
            };
            bpf(BPF_MAP_LOOKUP_ELEM, &mut a).context("BPF_MAP_LOOKUP_ELEM")?;
            Ok(value)
        }
    }

    impl Drop for ForeignProg {
        fn drop(&mut self) {
            if let Err(e) = self.detach() {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

use foreign::ForeignProg;

// ---------------------------------------------------------------------------------------------
// helpers

fn assert_whoami(line: &str, client: &Pod, server_addr: &str) {
    let want_peer = format!("peer={}:", client.ip);
    let want_local = format!("local={server_addr}");
    assert!(
        line.starts_with(&want_peer) && line.ends_with(&want_local),
        "server saw {line:?}; expected {want_peer}<port> {want_local}"
    );
}

/// Both programs are on the node's cgroup root.
fn assert_both_attached(node: &VirtualNode) {
    let progs = attached_programs(node.cgroup_root()).unwrap();
    let root = node.cgroup_root().display().to_string();
    let connect4: Vec<&String> = progs
        .iter()
        .filter(|p| p.starts_with(&format!("{root} ")) && p.contains("inet4_connect"))
        .collect();
    assert!(
        connect4.iter().any(|p| p.ends_with(foreign::PROG_NAME)),
        "the foreign program is not attached to {root}: {progs:?}"
    );
    assert!(
        connect4.iter().any(|p| !p.ends_with(foreign::PROG_NAME)),
        "sockmesh's connect4 program is not attached to {root}: {progs:?}"
    );
}

/// The counter moves by exactly `want` (the kernel program runs synchronously in connect(), so
/// there is nothing to wait for; the read is immediate).
fn assert_counted(what: &str, f: &ForeignProg, before: u64, want: u64) {
    let now = f.count().unwrap();
    assert_eq!(
        now - before,
        want,
        "{what}: the foreign program counted {} connects, expected {want}",
        now - before
    );
}

/// The shared scenario once both programs are attached: an enrolled pod is captured and counted,
/// a plain pod is counted and goes direct.
fn check_both_work(node: &VirtualNode, daemon: &Daemon, f: &ForeignProg, who: &Server) {
    let (app, plain, server) = (node.pod("app"), node.pod("plain"), node.pod("server"));
    assert_both_attached(node);

    // Enrolled: captured by sockmesh AND seen by the foreign program. The foreign program counts
    // every connect under the cgroup root: the app's, and the daemon's upstream connect (the
    // daemon's cgroup is inside the root too).
    let c0 = counter(daemon, "connect_captured");
    let t0 = daemon.status().map(|s| s["pods"].clone()).unwrap_or_default();
    let f0 = f.count().unwrap();
    let n0 = who.accepted().len();
    let line = whoami(app, &server.addr(7000));
    assert_whoami(&line, app, &server.addr(7000));
    wait_counter_eq(daemon, "connect_captured", c0 + 1);
    assert_eq!(who.accepted().len(), n0 + 1);
    let counted = f.count().unwrap() - f0;
    assert_eq!(
        counted,
        2,
        "the foreign program should have counted the app's connect and the daemon's upstream \
         connect (2), counted {counted}\npods before: {t0}\nstatus: {}",
        status_dump(daemon)
    );

    // Not enrolled: counted once by the foreign program, not captured, straight to the server.
    let f1 = f.count().unwrap();
    let line = whoami(plain, &server.addr(7000));
    assert_whoami(&line, plain, &server.addr(7000));
    assert_counted("plain pod connect", f, f1, 1);
    wait_counter_eq(daemon, "connect_captured", c0 + 1);
    assert!(connections(daemon, "plain", None).unwrap().is_empty());
    assert_eq!(who.accepted().len(), n0 + 2);
}

// ---------------------------------------------------------------------------------------------
// tests

#[test]
fn a_foreign_program_attached_before_the_daemon_keeps_working_and_so_does_capture() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["app", "plain", "server"]).unwrap();
    let (app, plain, server) = (node.pod("app"), node.pod("plain"), node.pod("server"));
    let who = Server::peer(server, 7000, "whoami").unwrap();

    let mut f = ForeignProg::load().unwrap();
    f.attach(node.cgroup_root()).unwrap();
    // Alone, it counts every connect.
    let f0 = f.count().unwrap();
    assert_whoami(&whoami(plain, &server.addr(7000)), plain, &server.addr(7000));
    assert_whoami(&whoami(app, &server.addr(7000)), app, &server.addr(7000));
    assert_counted("without the daemon", &f, f0, 2);

    let mut daemon = Daemon::start(&node, &basic_config(&node, "")).unwrap();
    daemon.enroll(app).unwrap();
    check_both_work(&node, &daemon, &f, &who);

    // The daemon going away leaves the foreign program attached and counting; connects go direct.
    assert!(
        daemon.stop().is_some_and(|s| s.success()),
        "daemon did not exit cleanly"
    );
    let progs = attached_programs(node.cgroup_root()).unwrap();
    assert!(
        progs.iter().any(|p| p.ends_with(foreign::PROG_NAME)),
        "stopping the daemon detached the foreign program: {progs:?}"
    );
    let f2 = f.count().unwrap();
    assert_whoami(&whoami(app, &server.addr(7000)), app, &server.addr(7000));
    assert_counted("after the daemon stopped", &f, f2, 1);
    f.detach().unwrap();
}

#[test]
fn a_foreign_program_attached_after_the_daemon_starts_keeps_working_and_so_does_capture() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["app", "plain", "server"]).unwrap();
    let (app, server) = (node.pod("app"), node.pod("server"));
    let who = Server::peer(server, 7000, "whoami").unwrap();
    let daemon = Daemon::start(&node, &basic_config(&node, "")).unwrap();
    daemon.enroll(app).unwrap();

    let mut f = ForeignProg::load().unwrap();
    f.attach(node.cgroup_root()).unwrap();
    check_both_work(&node, &daemon, &f, &who);

    // Detaching the foreign program leaves sockmesh's programs in place and capturing.
    f.detach().unwrap();
    let progs = attached_programs(node.cgroup_root()).unwrap();
    assert!(
        !progs.iter().any(|p| p.ends_with(foreign::PROG_NAME))
            && progs.iter().any(|p| p.contains("inet4_connect")),
        "after detaching the foreign program: {progs:?}"
    );
    let c0 = counter(&daemon, "connect_captured");
    let f0 = f.count().unwrap();
    assert_whoami(&whoami(app, &server.addr(7000)), app, &server.addr(7000));
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);
    assert_eq!(f.count().unwrap(), f0, "a detached program must not count");
    eventually(SETTLE, || -> anyhow::Result<()> {
        if who.accepted().len() == 3 {
            Ok(())
        } else {
            bail!("server accepted {}", who.accepted().len())
        }
    })
    .unwrap();
}
