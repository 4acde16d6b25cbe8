//! `cargo xtask vm-test`: the privileged suite on other kernels, inside QEMU.
//!
//! For each kernel series (Debian's `linux-image-6.1.0-N-amd64` and `linux-image-6.12.N+debM-amd64`)
//! it downloads the newest package with `apt-get download` (never installing it on the host),
//! unpacks it under `target/vm/kernels/<version>/`, builds a small busybox initramfs around
//! `tests/vm/init`, and boots the kernel with the host's root filesystem shared read-only over 9p.
//! The guest runs the already-built test binaries through `tests/vm/guest-suite.sh` and prints
//! `SOCKMESH-VM-RESULT <code>` on the serial console, which is streamed here with a `[6.1]` prefix
//! and saved to `target/vm/run/<version>/console.log`. Every VM is bounded twice: the guest kills
//! its job after `--timeout` seconds, and the host stops QEMU (via `timeout(1)`, which also outlives
//! a killed xtask) shortly after. See `tests/vm/README.md`.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};

use crate::{bootstrap, build_ebpf, daemon, exec, workspace_root};

/// The crate holding the privileged end-to-end tests.
const PRIVILEGED_PACKAGE: &str = "sockmesh-tests";
/// Seconds each guest may spend on its tests (the whole matrix must fit CI's budget).
const DEFAULT_TIMEOUT_SECS: u64 = 420;
/// Seconds the host allows on top of the guest's timeout for booting and powering off.
const BOOT_SLACK_SECS: u64 = 90;
/// Under TCG (software emulation, no usable KVM) the suite runs 20-50x slower than on the host:
/// only these test files run unless `--test` says otherwise.
const TCG_DEFAULT_TESTS: &[&str] = &["harness", "capture"];
/// Load tests with wall-clock limits, skipped under TCG unless `--test` is given: emulated, they
/// time out (measured on 6.1: 86 of 100 and 68 of 100 connections done within their 50 s and 75 s,
/// with no data errors). Under KVM they run.
const TCG_SKIPPED: &[&str] = &[
    "peer_load_is_byte_exact_and_fast_without_daemon",
    "payloads_from_1_byte_to_64_mib_arrive_intact_over_100_concurrent_connections",
];
/// Guest memory in MiB.
const GUEST_MEMORY_MIB: u32 = 2048;
/// Modules the initramfs loads to reach the host's root (dependencies are added from modules.dep).
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];
/// Console lines the guest init and `guest-suite.sh` print.
const RESULT_MARKER: &str = "SOCKMESH-VM-RESULT ";
const ERROR_MARKER: &str = "SOCKMESH-VM-ERROR: ";

/// One Debian kernel series of the matrix.
#[derive(Debug, Clone, Copy)]
struct Series {
    label: &'static str,
    /// Major and minor version every package of the series starts with.
    major_minor: [u64; 2],
    /// `apt-cache search --names-only` pattern; [`newest_package`] filters the answer strictly.
    pattern: &'static str,
}

const SERIES: &[Series] = &[
    Series {
        label: "6.1",
        major_minor: [6, 1],
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
    },
    Series {
        label: "6.12",
        major_minor: [6, 12],
        pattern: r"^linux-image-6\.12.*-amd64$",
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelChoice {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm can run stock kernels, else TCG (software emulation)
    Auto,
    /// Hardware virtualisation through /dev/kvm (`-enable-kvm -cpu host`)
    Kvm,
    /// QEMU's software emulation: runs anywhere, 20-50x slower
    Tcg,
}

/// `cargo xtask vm-test [--kernel 6.1|6.12|all] [--test NAME]... [-- TEST_ARGS]`
#[derive(Debug, Args)]
pub struct Options {
    /// Which Debian kernel series to boot
    #[arg(long, value_enum, default_value_t = KernelChoice::All)]
    kernel: KernelChoice,
    /// How QEMU runs the guest
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Integration test file to run (`capture` for tests/tests/capture.rs); repeatable. Default:
    /// all of them under KVM, `harness` and `capture` under TCG
    #[arg(long = "test", value_name = "NAME")]
    tests: Vec<String>,
    /// Seconds each guest may spend running tests before it is stopped
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    timeout: u64,
    /// Passed to every test binary after `--test-threads=1`, e.g. a test name filter
    #[arg(last = true, value_name = "TEST_ARGS")]
    args: Vec<String>,
}

impl Options {
    /// The matrix `cargo xtask test` runs after the host suite: every kernel, the same test args.
    pub fn for_test_suite(args: Vec<String>) -> Options {
        Options {
            kernel: KernelChoice::All,
            accel: Accel::Auto,
            tests: Vec::new(),
            timeout: DEFAULT_TIMEOUT_SECS,
            args,
        }
    }
}

/// One line of the summary table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    kernel: String,
    result: String,
    ok: bool,
    passed: u32,
    failed: u32,
    duration: Duration,
}

impl Row {
    /// The host suite's line (its counts are in cargo's own output above the table).
    pub fn host(ok: bool, duration: Duration) -> Row {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Row {
            kernel: format!("{} (host)", release.trim()),
            result: if ok { "passed" } else { "FAILED" }.to_owned(),
            ok,
            passed: 0,
            failed: 0,
            duration,
        }
    }
}

pub fn run(opts: Options) -> Result<ExitCode> {
    let root = workspace_root();
    bootstrap::require_root("cargo xtask vm-test")?;
    bootstrap::ensure(&[bootstrap::Purpose::Test, bootstrap::Purpose::Vm])?;
    build_ebpf::build(&root)?;
    daemon::build(&root)?;
    matrix(&root, &opts, None)
}

/// Boots each selected kernel, runs the suite in it and prints the summary table (with `host`
/// first when given). Fails (exit 1) when any kernel did not pass.
pub fn matrix(root: &Path, opts: &Options, host: Option<Row>) -> Result<ExitCode> {
    let accel = resolve_accel(opts.accel)?;
    let binaries = test_binaries(root)?;
    let default_tests: Vec<String> = match (opts.tests.is_empty(), accel) {
        (false, _) => opts.tests.clone(),
        (true, Accel::Tcg) => TCG_DEFAULT_TESTS.iter().map(|&t| t.to_owned()).collect(),
        (true, _) => binaries.iter().map(|(name, _)| name.clone()).collect(),
    };
    let selected = select_tests(&binaries, &default_tests)?;
    let mut args = opts.args.clone();
    if accel == Accel::Tcg && opts.tests.is_empty() {
        for name in TCG_SKIPPED {
            args.extend(["--skip".to_owned(), (*name).to_owned()]);
        }
    }
    println!(
        "kernel matrix: {} under {}, tests: {}",
        series_for(opts.kernel)
            .iter()
            .map(|s| s.label)
            .collect::<Vec<_>>()
            .join(", "),
        if accel == Accel::Kvm { "KVM" } else { "TCG" },
        selected
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut rows: Vec<Row> = host.into_iter().collect();
    for series in series_for(opts.kernel) {
        let start = Instant::now();
        let row = match prepare_kernel(root, series) {
            Ok(kernel) => boot(root, &kernel, accel, &selected, &args, opts.timeout),
            Err(err) => Err(err),
        };
        rows.push(row.unwrap_or_else(|err| {
            eprintln!("[{}] error: {err:#}", series.label);
            Row {
                kernel: series.label.to_owned(),
                result: format!("ERROR: {}", first_line(&format!("{err:#}"))),
                ok: false,
                passed: 0,
                failed: 0,
                duration: start.elapsed(),
            }
        }));
    }
    print!("{}", summary(&rows));
    Ok(if rows.iter().all(|r| r.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn series_for(choice: KernelChoice) -> Vec<Series> {
    SERIES
        .iter()
        .copied()
        .filter(|s| match choice {
            KernelChoice::V6_1 => s.label == "6.1",
            KernelChoice::V6_12 => s.label == "6.12",
            KernelChoice::All => true,
        })
        .collect()
}

/// KVM needs /dev/kvm from a hypervisor that runs unmodified kernels. PVM (`kvm_pvm`, used by
/// some sandboxes for nested guests) does not: Debian's kernels stop with "KVM internal error ...
/// emulation failure" on BMI2, `cmpxchg16b` or `xrstor` instructions.
fn resolve_accel(requested: Accel) -> Result<Accel> {
    let kvm = Path::new("/dev/kvm").exists();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    match requested {
        Accel::Kvm if !kvm => bail!("--accel kvm: /dev/kvm not available"),
        Accel::Auto if !kvm => {
            println!("kernel matrix: /dev/kvm not available, using TCG (software emulation, slow)");
            Ok(Accel::Tcg)
        }
        Accel::Auto if pvm => {
            println!(
                "kernel matrix: /dev/kvm is PVM (kvm_pvm), which cannot run Debian's stock \
                 kernels; using TCG (software emulation, slow)"
            );
            Ok(Accel::Tcg)
        }
        Accel::Auto => Ok(Accel::Kvm),
        other => Ok(other),
    }
}

/// Builds the privileged suite and returns its integration test binaries as (file stem, path),
/// from `cargo test --no-run --message-format=json`.
fn test_binaries(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let json = exec::capture(exec::cargo(root).args([
        "test",
        "-p",
        PRIVILEGED_PACKAGE,
        "--no-run",
        "--message-format=json",
    ]))?;
    let found = integration_tests(&json);
    if found.is_empty() {
        bail!("`cargo test -p {PRIVILEGED_PACKAGE} --no-run` reported no integration test binaries");
    }
    Ok(found)
}

/// The `(target name, executable)` of every integration test (`"kind":["test"]`) artifact in
/// cargo's JSON messages. xtask has no JSON parser: the fields are plain strings without escapes.
fn integration_tests(json: &str) -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = json
        .lines()
        .filter(|l| l.contains(r#""reason":"compiler-artifact""#) && l.contains(r#""kind":["test"]"#))
        .filter_map(|l| {
            let target = &l[l.find(r#""target":"#)?..];
            let name = string_field(target, "name")?;
            let exe = string_field(l, "executable")?;
            Some((name.to_owned(), PathBuf::from(exe)))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

fn string_field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let len = json[start..].find('"')?;
    Some(&json[start..start + len])
}

fn select_tests(all: &[(String, PathBuf)], wanted: &[String]) -> Result<Vec<(String, PathBuf)>> {
    wanted
        .iter()
        .map(|name| {
            all.iter().find(|(n, _)| n == name).cloned().with_context(|| {
                let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
                format!(
                    "no integration test `{name}` in {PRIVILEGED_PACKAGE} (have: {})",
                    names.join(", ")
                )
            })
        })
        .collect()
}

/// An unpacked kernel ready to boot.
#[derive(Debug)]
struct Kernel {
    label: &'static str,
    /// `uname -r`, e.g. `6.1.0-56-amd64`.
    version: String,
    dir: PathBuf,
}

impl Kernel {
    fn modules(&self) -> PathBuf {
        self.dir.join("lib/modules").join(&self.version)
    }
}

fn vm_dir(root: &Path) -> PathBuf {
    root.join("target").join("vm")
}

/// Finds, downloads and unpacks the newest package of `series` (each step skipped when done).
fn prepare_kernel(root: &Path, series: Series) -> Result<Kernel> {
    let package = match newest_package(series, &apt_search(series)?) {
        Some(p) => p,
        None => {
            exec::run(exec::command("apt-get").arg("update"))?;
            newest_package(series, &apt_search(series)?)
                .with_context(|| format!("no package matches `{}` (apt-cache search)", series.pattern))?
        }
    };
    let version = package.trim_start_matches("linux-image-").to_owned();
    let dir = vm_dir(root).join("kernels").join(&version);
    let kernel = Kernel {
        label: series.label,
        version,
        dir,
    };
    let vmlinuz = kernel
        .dir
        .join("boot")
        .join(format!("vmlinuz-{}", kernel.version));
    if !(vmlinuz.is_file() && kernel.modules().join("modules.dep").is_file()) {
        let deb = download(root, &package)?;
        println!(
            "[{}] unpacking {} into {}",
            series.label,
            deb.display(),
            kernel.dir.display()
        );
        // `with_extension` would cut the version at its first dot ("6.1.0-56" -> "6.1.partial").
        let mut partial = kernel.dir.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        remove_dir(&partial)?;
        remove_dir(&kernel.dir)?;
        // dpkg-deb -x creates only the last component: a fresh checkout has no target/vm/kernels.
        fs::create_dir_all(&partial).with_context(|| format!("failed to create {}", partial.display()))?;
        exec::run(exec::command("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        exec::run(
            exec::command("depmod")
                .arg("-b")
                .arg(&partial)
                .arg(&kernel.version),
        )?;
        fs::rename(&partial, &kernel.dir).with_context(|| {
            format!(
                "failed to rename {} to {}",
                partial.display(),
                kernel.dir.display()
            )
        })?;
    }
    let vmlinux = kernel.dir.join("vmlinux");
    if !vmlinux.is_file() {
        extract_vmlinux(&vmlinuz, &vmlinux)?;
    }
    Ok(kernel)
}

fn apt_search(series: Series) -> Result<String> {
    exec::capture(exec::command("apt-cache").args(["search", "--names-only", series.pattern]))
}

/// The newest `linux-image-<version>-amd64` of `series` in `apt-cache search` output, leaving out
/// meta packages (`linux-image-6.12-amd64`) and other flavours (`-cloud`, `-rt`, `-unsigned`).
fn newest_package(series: Series, search_output: &str) -> Option<String> {
    search_output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| Some((version_key(series, name)?, name.to_owned())))
        .max()
        .map(|(_, name)| name)
}

fn version_key(series: Series, package: &str) -> Option<Vec<u64>> {
    let version = package.strip_prefix("linux-image-")?.strip_suffix("-amd64")?;
    if version
        .replace("deb", "")
        .chars()
        .any(|c| c.is_ascii_alphabetic())
    {
        return None;
    }
    let numbers: Vec<u64> = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect::<Option<_>>()?;
    (numbers.len() >= 3 && numbers[..2] == series.major_minor).then_some(numbers)
}

/// `target/vm/debs/<package>_*.deb`, downloaded unless already there.
fn download(root: &Path, package: &str) -> Result<PathBuf> {
    let debs = vm_dir(root).join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("failed to create {}", debs.display()))?;
    let existing = || -> Result<Option<PathBuf>> {
        for entry in fs::read_dir(&debs).with_context(|| format!("failed to read {}", debs.display()))? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(&format!("{package}_")) && name.ends_with(".deb") {
                return Ok(Some(path));
            }
        }
        Ok(None)
    };
    if let Some(deb) = existing()? {
        return Ok(deb);
    }
    // Root downloading into a root-owned directory: apt's `_apt` sandbox user could not write it.
    exec::run(
        exec::command("apt-get")
            .args(["download", "-o", "APT::Sandbox::User=root", package])
            .current_dir(&debs),
    )?;
    existing()?.with_context(|| format!("`apt-get download {package}` left no .deb in {}", debs.display()))
}

/// Writes the uncompressed ELF kernel inside a bzImage: QEMU boots it through its PVH entry
/// point, which skips the boot decompressor (minutes under TCG; instructions PVM cannot emulate).
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    const FORMATS: &[(&[u8], &str)] = &[
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"\x1f\x8b\x08", "gzip"),
    ];
    let image = fs::read(vmlinuz).with_context(|| format!("failed to read {}", vmlinuz.display()))?;
    let tail = out.with_extension("payload");
    for &(magic, tool) in FORMATS {
        let starts = image
            .windows(magic.len())
            .enumerate()
            .filter(|(_, w)| *w == magic);
        for (offset, _) in starts.take(4) {
            fs::write(&tail, &image[offset..])
                .with_context(|| format!("failed to write {}", tail.display()))?;
            let stdout =
                fs::File::create(out).with_context(|| format!("failed to create {}", out.display()))?;
            // Trailing bytes after the payload make the tool exit non-zero: judge by the output.
            exec::command(tool)
                .arg("-dc")
                .stdin(fs::File::open(&tail)?)
                .stdout(stdout)
                .stderr(Stdio::null())
                .status()
                .with_context(|| format!("failed to start `{tool} -dc`"))?;
            let mut head = [0u8; 4];
            let elf = fs::File::open(out)?.read_exact(&mut head).is_ok() && &head == b"\x7fELF";
            if elf {
                let _ = fs::remove_file(&tail);
                return Ok(());
            }
        }
    }
    let _ = fs::remove_file(&tail);
    let _ = fs::remove_file(out);
    bail!(
        "no xz, zstd or gzip payload holding an ELF kernel in {}",
        vmlinuz.display()
    )
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("failed to remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The initramfs modules in load order (dependencies first), as paths relative to the module
/// tree; modules built into the kernel are left out.
fn module_load_order(modules_dep: &str, builtin: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let name_of = |path: &str| -> String {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let deps: Vec<(String, String, Vec<String>)> = modules_dep
        .lines()
        .filter_map(|line| {
            let (path, rest) = line.split_once(':')?;
            let deps = rest.split_whitespace().map(str::to_owned).collect();
            Some((name_of(path), path.to_owned(), deps))
        })
        .collect();
    let builtins: Vec<String> = builtin.lines().map(name_of).collect();
    fn visit(path: &str, deps: &[(String, String, Vec<String>)], order: &mut Vec<String>) {
        if order.iter().any(|p| p == path) {
            return;
        }
        if let Some((_, _, children)) = deps.iter().find(|(_, p, _)| p == path) {
            for child in children {
                visit(child, deps, order);
            }
        }
        order.push(path.to_owned());
    }
    let mut order = Vec::new();
    for &want in wanted {
        let want = want.replace('-', "_");
        if builtins.contains(&want) {
            continue;
        }
        let (_, path, _) = deps
            .iter()
            .find(|(name, _, _)| *name == want)
            .with_context(|| format!("module `{want}` is neither in modules.dep nor built in"))?;
        visit(path, &deps, &mut order);
    }
    Ok(order)
}

/// `target/vm/kernels/<version>/initramfs.cpio`: busybox, tests/vm/init and the modules that
/// reach the host's root, decompressed (busybox `insmod` cannot read `.ko.xz`).
fn build_initramfs(root: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!("/bin/busybox is missing: install busybox-static (`cargo xtask bootstrap`)");
    }
    let stage = kernel.dir.join("initramfs.d");
    remove_dir(&stage)?;
    for sub in ["bin", "dev", "modules"] {
        fs::create_dir_all(stage.join(sub))
            .with_context(|| format!("failed to create {}", stage.display()))?;
    }
    let init = root.join("tests").join("vm").join("init");
    fs::copy(&init, stage.join("init")).with_context(|| format!("failed to copy {}", init.display()))?;
    fs::copy(busybox, stage.join("bin/busybox")).context("failed to copy /bin/busybox")?;
    exec::run(
        exec::command("chmod")
            .arg("0755")
            .arg(stage.join("init"))
            .arg(stage.join("bin/busybox")),
    )?;
    exec::run(
        exec::command("mknod")
            .arg(stage.join("dev/console"))
            .args(["c", "5", "1"]),
    )?;

    let read = |name: &str| {
        let path = kernel.modules().join(name);
        fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))
    };
    let order = module_load_order(
        &read("modules.dep")?,
        &read("modules.builtin")?,
        INITRAMFS_MODULES,
    )?;
    let mut list = String::new();
    for rel in &order {
        let src = kernel.modules().join(rel);
        let file = src.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let (stem, tool) = match file.rsplit_once('.') {
            Some((stem, "xz")) => (stem.to_owned(), Some("xz")),
            Some((stem, "zst")) => (stem.to_owned(), Some("zstd")),
            Some((stem, "gz")) => (stem.to_owned(), Some("gzip")),
            _ => (file.clone(), None),
        };
        let dst = stage.join("modules").join(&stem);
        match tool {
            Some(tool) => {
                let out =
                    fs::File::create(&dst).with_context(|| format!("failed to create {}", dst.display()))?;
                exec::run(exec::command(tool).arg("-dc").arg(&src).stdout(out))?;
            }
            None => {
                fs::copy(&src, &dst).with_context(|| format!("failed to copy {}", src.display()))?;
            }
        }
        let _ = writeln!(list, "{stem}");
    }
    fs::write(stage.join("modules/order"), list).context("failed to write modules/order")?;

    let cpio = kernel.dir.join("initramfs.cpio");
    let out = fs::File::create(&cpio).with_context(|| format!("failed to create {}", cpio.display()))?;
    exec::run(
        exec::command("sh")
            .args(["-c", "cd \"$1\" && find . | cpio -o -H newc -R 0:0 --quiet", "sh"])
            .arg(&stage)
            .stdout(out),
    )?;
    Ok(cpio)
}

/// The script the guest runs in its chroot: the suite's environment, then tests/vm/guest-suite.sh.
fn job_script(root: &Path, tests: &[(String, PathBuf)], args: &[String]) -> String {
    let python = if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let mut words = vec![
        "exec".to_owned(),
        "/bin/sh".to_owned(),
        root.join("tests/vm/guest-suite.sh").display().to_string(),
        root.display().to_string(),
    ];
    words.extend(
        tests
            .iter()
            .map(|(name, path)| format!("{name}={}", path.display())),
    );
    words.push("--".to_owned());
    words.extend(["--test-threads=1", "--color", "never"].map(str::to_owned));
    words.extend(args.iter().cloned());
    let command: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
    format!(
        "#!/bin/sh\n\
         # Generated by `cargo xtask vm-test`; runs in the guest, chrooted into the host's root.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n\
         export SOCKMESH_BIN={} SOCKMESH_REQUIRE_PRIVILEGED=1 SOCKMESH_PYTHON={python}\n\
         export RUST_BACKTRACE=1\n\
         {}\n",
        shell_quote(&daemon::sockmesh_bin_path(root).display().to_string()),
        command.join(" ")
    )
}

fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// What the console said.
#[derive(Debug, Default, PartialEq, Eq)]
struct Console {
    result: Option<i32>,
    errors: Vec<String>,
    passed: u32,
    failed: u32,
    failures: Vec<String>,
    hypervisor_error: bool,
}

impl Console {
    fn line(&mut self, line: &str) {
        if let Some(code) = line.strip_prefix(RESULT_MARKER) {
            self.result = code.trim().parse().ok();
        } else if let Some(why) = line.strip_prefix(ERROR_MARKER) {
            self.errors.push(why.to_owned());
        } else if let Some(counts) = line.strip_prefix("test result: ") {
            self.passed += count_before(counts, " passed");
            self.failed += count_before(counts, " failed");
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            self.failures.push(name.to_owned());
        } else if line.starts_with("KVM internal error") {
            self.hypervisor_error = true;
            self.errors
                .push("KVM internal error (the hypervisor could not run this kernel)".to_owned());
        } else if line.contains("Kernel panic - not syncing") {
            self.errors.push(line.trim().to_owned());
        }
    }
}

/// `3` from `ok. 3 passed; 0 failed; ...` for `" passed"`.
fn count_before(text: &str, label: &str) -> u32 {
    text.find(label)
        .and_then(|end| text[..end].rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Boots `kernel`, streams its console and returns the summary row.
fn boot(
    root: &Path,
    kernel: &Kernel,
    accel: Accel,
    tests: &[(String, PathBuf)],
    args: &[String],
    timeout: u64,
) -> Result<Row> {
    let start = Instant::now();
    let initramfs = build_initramfs(root, kernel)?;
    let run_dir = vm_dir(root).join("run").join(&kernel.version);
    fs::create_dir_all(&run_dir).with_context(|| format!("failed to create {}", run_dir.display()))?;
    let job = run_dir.join("job.sh");
    fs::write(&job, job_script(root, tests, args))
        .with_context(|| format!("failed to write {}", job.display()))?;
    let log_path = run_dir.join("console.log");
    let mut log =
        fs::File::create(&log_path).with_context(|| format!("failed to create {}", log_path.display()))?;

    let hard_limit = timeout + BOOT_SLACK_SECS;
    let mut cmd = exec::command("timeout");
    cmd.args(["--kill-after=10", &hard_limit.to_string(), "qemu-system-x86_64"]);
    match accel {
        Accel::Kvm => cmd.args(["-enable-kvm", "-cpu", "host"]),
        _ => cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    cmd.args(["-m", &GUEST_MEMORY_MIB.to_string(), "-smp", "2"])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel.dir.join("vmlinux"))
        .arg("-initrd")
        .arg(&initramfs)
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 loglevel=4 sockmesh_root={} sockmesh_job={} sockmesh_modules={} \
             sockmesh_timeout={}",
            root.display(),
            job.display(),
            kernel.modules().display(),
            timeout
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!(
        "[{}] booting {} ({})",
        kernel.label,
        kernel.version,
        exec::display(&cmd)
    );
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start: {}", exec::display(&cmd)))?;

    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&buf);
                if tx.send(line.trim_end_matches(['\r', '\n']).to_owned()).is_err() {
                    break;
                }
                buf.clear();
            }
        })
    })
    .collect();
    drop(tx);

    let mut console = Console::default();
    let deadline = start + Duration::from_secs(hard_limit + 20);
    let mut stopping = false;
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                let _ = writeln!(log, "{line}");
                println!("[{}] {line}", kernel.label);
                console.line(&line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // QEMU stays up, paused, after a KVM internal error; `timeout(1)` forwards TERM to it.
        if !stopping && (console.hypervisor_error || Instant::now() > deadline) {
            stopping = true;
            let _ = exec::probe(exec::command("kill").args(["-TERM", &child.id().to_string()]));
        }
    }
    let status = child.wait().context("failed to wait for qemu")?;
    for reader in readers {
        let _ = reader.join();
    }
    let duration = start.elapsed();
    let (ok, result) = match console.result {
        Some(0) => (true, "passed".to_owned()),
        Some(code) if console.errors.is_empty() => (false, format!("FAILED (exit {code})")),
        _ if status.code() == Some(124) => (false, format!("TIMEOUT after {hard_limit}s")),
        _ if !console.errors.is_empty() => (false, format!("ERROR: {}", console.errors.join("; "))),
        _ => (false, format!("ERROR: no result marker (qemu {status})")),
    };
    if !console.failures.is_empty() {
        println!("[{}] failed tests: {}", kernel.label, console.failures.join(", "));
    }
    println!("[{}] console log: {}", kernel.label, log_path.display());
    Ok(Row {
        kernel: kernel.version.clone(),
        result,
        ok,
        passed: console.passed,
        failed: console.failed,
        duration,
    })
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

fn summary(rows: &[Row]) -> String {
    let width = rows
        .iter()
        .map(|r| r.kernel.len())
        .max()
        .unwrap_or(0)
        .max("kernel".len());
    let mut out = format!("\n{:width$} | passed | failed | duration | result\n", "kernel");
    for r in rows {
        let counts = if r.kernel.ends_with("(host)") {
            format!("{:>6} | {:>6}", "-", "-")
        } else {
            format!("{:>6} | {:>6}", r.passed, r.failed)
        };
        let _ = writeln!(
            out,
            "{:width$} | {counts} | {:>7.0}s | {}",
            r.kernel,
            r.duration.as_secs_f64(),
            r.result
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEARCH: &str = "\
linux-image-6.1.0-47-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-56-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-56-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.12-amd64 - Linux for 64-bit PCs (meta-package)
linux-image-6.12.100+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.117+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.12.117+deb12-rt-amd64 - Linux 6.12 for 64-bit PCs (signed), PREEMPT_RT
linux-image-6.12.99+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.117+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
";

    #[test]
    fn newest_package_per_series() {
        assert_eq!(
            newest_package(SERIES[0], SEARCH).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(
            newest_package(SERIES[1], SEARCH).as_deref(),
            Some("linux-image-6.12.117+deb12-amd64")
        );
        assert_eq!(newest_package(SERIES[1], "linux-image-6.12-amd64 - meta\n"), None);
    }

    #[test]
    fn load_order_puts_dependencies_first_and_skips_builtins() {
        let dep = "kernel/fs/overlayfs/overlay.ko.xz:\n\
                   kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n\
                   kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz\n\
                   kernel/fs/netfs/netfs.ko.xz:\n\
                   kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n";
        let builtin = "kernel/drivers/virtio/virtio_pci.ko\n";
        let order = module_load_order(dep, builtin, INITRAMFS_MODULES).unwrap();
        assert_eq!(
            order,
            [
                "kernel/fs/netfs/netfs.ko.xz",
                "kernel/net/9p/9pnet.ko.xz",
                "kernel/net/9p/9pnet_virtio.ko.xz",
                "kernel/fs/9p/9p.ko.xz",
                "kernel/fs/overlayfs/overlay.ko.xz",
            ]
        );
        assert!(module_load_order(dep, "", INITRAMFS_MODULES).is_err());
    }

    #[test]
    fn console_counts_and_marker() {
        let mut c = Console::default();
        for line in [
            "test a ... ok",
            "test b::c ... FAILED",
            "test result: FAILED. 6 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s",
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 1s",
            "SOCKMESH-VM-RESULT 1",
        ] {
            c.line(line);
        }
        assert_eq!((c.passed, c.failed, c.result), (9, 1, Some(1)));
        assert_eq!(c.failures, ["b::c"]);
        assert!(c.errors.is_empty());
        c.line("KVM internal error. Suberror: 1");
        assert!(c.hypervisor_error);
    }

    #[test]
    fn integration_tests_from_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"crate_types":["bin"],"name":"capture","src_path":"/w/tests/tests/capture.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/capture-80d5"}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"sockmesh_tests"},"executable":"/w/target/debug/deps/sockmesh_tests-1"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            integration_tests(json),
            [(
                "capture".to_owned(),
                PathBuf::from("/w/target/debug/deps/capture-80d5")
            )]
        );
    }

    #[test]
    fn job_script_quotes_test_args() {
        let script = job_script(
            Path::new("/w"),
            &[("capture".to_owned(), PathBuf::from("/w/t/capture-1"))],
            &["it's".to_owned()],
        );
        assert!(
            script.contains(
                "exec /bin/sh /w/tests/vm/guest-suite.sh /w capture=/w/t/capture-1 -- \
                 --test-threads=1 --color never 'it'\\''s'"
            ),
            "{script}"
        );
    }
}
