//! Kubernetes: `cargo xtask image` (the node agent's OCI image) and the checks of
//! `deploy/kubernetes` (rendered by `kubectl kustomize`, validated by PyPI kubernetes-validate
//! in a venv at [`K8S_VENV`] that bootstrap installs for the test purposes).
//!
//! The image is built `FROM scratch` with buildah in a private storage under `target/image`
//! (the machine's container storage is never touched): the release `sockmesh` and
//! `sockmesh-cni`, the shared libraries `ldd` lists for them and the ELF interpreter. It is
//! written as a docker-archive that `ctr -n k8s.io images import` (containerd) and
//! `podman load` read.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use crate::{bootstrap, build_ebpf, exec, workspace_root};

/// The kustomize base, relative to the workspace root.
pub const DEPLOY_DIR: &str = "deploy/kubernetes";
/// The Grafana dashboard, relative to the workspace root.
#[cfg_attr(not(test), allow(dead_code))]
pub const DASHBOARD: &str = "deploy/grafana/sockmesh-dashboard.json";
/// The manifests' checker venv, relative to the workspace root.
pub const K8S_VENV: &str = "target/k8s-venv";
pub const K8S_VENV_PIP: &[&str] = &["kubernetes-validate==1.37.0"];
/// The Kubernetes versions the manifests are claimed (and checked) for.
#[cfg_attr(not(test), allow(dead_code))]
pub const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0"];
/// The image name the kustomization refers to.
pub const IMAGE: &str = "localhost/sockmesh:dev";
/// Where `cargo xtask image` writes the archive, relative to the workspace root.
pub const IMAGE_ARCHIVE: &str = "target/image/sockmesh-image.tar";

/// `cargo xtask image [--tag NAME:TAG] [--out FILE]`
#[derive(Debug, Args)]
pub struct Options {
    /// Image name and tag
    #[arg(long, default_value = IMAGE)]
    pub tag: String,
    /// The docker-archive to write (default target/image/sockmesh-image.tar)
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(opts: Options) -> Result<()> {
    let root = workspace_root();
    bootstrap::require_root("cargo xtask image (buildah)")?;
    bootstrap::ensure(&[bootstrap::Purpose::Build])?;
    if exec::find_in_path("buildah", &exec::child_path()).is_none() {
        bail!("buildah is missing: `apt-get install buildah` (or `cargo xtask bootstrap --for test`)");
    }
    build_ebpf::build(&root)?;
    let out = opts.out.unwrap_or_else(|| root.join(IMAGE_ARCHIVE));
    let archive = build_image(&root, &opts.tag, &out)?;
    println!(
        "wrote {} ({}): `ctr -n k8s.io images import {}`",
        archive.display(),
        opts.tag,
        archive.display()
    );
    Ok(())
}

/// The release binaries and the image archive; returns the archive path.
pub fn build_image(root: &Path, tag: &str, out: &Path) -> Result<PathBuf> {
    exec::run(exec::cargo(root).args(["build", "--release", "-p", "mesh-userspace", "--bins"]))?;
    let release = root.join("target/release");
    let bins = [release.join("sockmesh"), release.join("sockmesh-cni")];
    let work = root.join("target/image");
    let storage = [
        "--root",
        &path_str(&work.join("storage"))?,
        "--runroot",
        &path_str(&work.join("run"))?,
    ]
    .map(str::to_string);
    let buildah = |args: &[&str]| -> Result<String> {
        let out = exec::capture(
            exec::command("buildah")
                .args(&storage)
                .args(["--storage-driver", "vfs"])
                .args(args),
        )?;
        Ok(out.trim().to_string())
    };
    let ctr = buildah(&["from", "scratch"])?;
    let result = (|| -> Result<()> {
        let mnt = PathBuf::from(buildah(&["mount", &ctr])?);
        let bin_dir = mnt.join("usr/local/bin");
        std::fs::create_dir_all(&bin_dir)?;
        for d in ["run/sockmesh", "tmp", "etc/sockmesh", "var"] {
            std::fs::create_dir_all(mnt.join(d))?;
        }
        // /var/run -> /run as on a distribution: runtimes hand out /var/run/netns/... paths.
        let _ = std::os::unix::fs::symlink("/run", mnt.join("var/run"));
        for bin in &bins {
            let name = bin.file_name().expect("binary name");
            std::fs::copy(bin, bin_dir.join(name)).with_context(|| format!("copy {}", bin.display()))?;
            for lib in shared_libraries(bin)? {
                let dest = mnt.join(lib.strip_prefix("/").unwrap_or(&lib));
                std::fs::create_dir_all(dest.parent().expect("a library has a directory"))?;
                // Follows symlinks: the file lands at the path the loader asks for.
                std::fs::copy(&lib, &dest).with_context(|| format!("copy {}", lib.display()))?;
            }
        }
        std::fs::write(mnt.join("etc/passwd"), "root:x:0:0:root:/:/nonexistent\n")?;
        buildah(&["umount", &ctr])?;
        buildah(&[
            "config",
            "--entrypoint",
            r#"["/usr/local/bin/sockmesh"]"#,
            "--cmd",
            "run",
            "--label",
            "org.opencontainers.image.title=sockmesh",
            &ctr,
        ])?;
        buildah(&["commit", "-q", &ctr, tag])?;
        if let Some(d) = out.parent() {
            std::fs::create_dir_all(d)?;
        }
        let _ = std::fs::remove_file(out);
        buildah(&[
            "push",
            "-q",
            tag,
            &format!("docker-archive:{}:{tag}", path_str(out)?),
        ])?;
        Ok(())
    })();
    let _ = buildah(&["rm", &ctr]);
    result?;
    Ok(out.to_path_buf())
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The libraries and the interpreter `ldd` lists for `bin`.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let text = exec::capture(exec::command("ldd").arg(bin))?;
    Ok(parse_ldd(&text))
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and `/lib64/ld-linux-x86-64.so.2 (0x...)`.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// `kubectl kustomize deploy/kubernetes` (the host tests).
#[cfg_attr(not(test), allow(dead_code))]
pub fn render(root: &Path) -> Result<String> {
    exec::capture(
        exec::command("kubectl")
            .arg("kustomize")
            .arg(root.join(DEPLOY_DIR)),
    )
}

/// The venv's `kubernetes-validate`.
pub fn validator(root: &Path) -> PathBuf {
    root.join(K8S_VENV).join("bin").join("kubernetes-validate")
}

/// A venv at [`K8S_VENV`] with [`K8S_VENV_PIP`] (bootstrap, test purposes); returns 1 when it
/// installed it.
pub fn ensure_venv(root: &Path) -> Result<usize> {
    if validator(root).is_file() {
        return Ok(0);
    }
    let venv = root.join(K8S_VENV);
    println!(
        "installing a Python venv at {} with {}: validates deploy/kubernetes offline",
        venv.display(),
        K8S_VENV_PIP.join(" ")
    );
    let python = venv.join("bin").join("python");
    if !python.is_file() {
        exec::run(exec::command("python3").arg("-m").arg("venv").arg(&venv))
            .context("`python3 -m venv` failed (apt-get install python3-venv)")?;
    }
    exec::run(
        exec::command(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .args(K8S_VENV_PIP),
    )?;
    Ok(1)
}

/// Validate `yaml` strictly for `version`; the validator's output on failure (the host tests).
#[cfg_attr(not(test), allow(dead_code))]
pub fn validate(root: &Path, yaml: &Path, version: &str) -> Result<()> {
    let out = std::process::Command::new(validator(root))
        .args(["--strict", "--quiet", "-k", version])
        .arg(yaml)
        .output()
        .context("run kubernetes-validate")?;
    if !out.status.success() {
        bail!(
            "kubernetes-validate --strict -k {version} {} failed:\n{}{}",
            yaml.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without kubectl or the venv the check cannot run: loud skip, but a failure under CI.
    fn tools_or_skip(root: &Path) -> bool {
        let have = exec::find_in_path("kubectl", &exec::child_path()).is_some() && validator(root).is_file();
        if !have {
            let msg = format!(
                "SKIPPED: deploy/kubernetes checks need kubectl and {} (`cargo xtask bootstrap --for test`)",
                validator(root).display()
            );
            assert!(std::env::var_os("CI").is_none(), "{msg} (CI is set: failing)");
            eprintln!("\n{}\n{msg}\n{}\n", "=".repeat(msg.len()), "=".repeat(msg.len()));
        }
        have
    }

    #[test]
    fn manifests_render_and_validate_for_every_claimed_version() {
        let root = workspace_root();
        if !tools_or_skip(&root) {
            return;
        }
        let yaml = render(&root).unwrap();
        for kind in [
            "kind: Namespace",
            "kind: ServiceAccount",
            "kind: ConfigMap",
            "kind: DaemonSet",
        ] {
            assert!(yaml.contains(kind), "rendered manifests lack {kind}");
        }
        // The image is what `cargo xtask image` builds; the init container chains the plugin.
        assert!(yaml.contains(&format!("image: {IMAGE}")), "{yaml}");
        assert!(yaml.contains("cni-install"));
        let dir = root.join("target/k8s-check");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rendered.yaml");
        std::fs::write(&file, &yaml).unwrap();
        for v in KUBERNETES_VERSIONS {
            validate(&root, &file, v).unwrap();
        }
        // The check can fail: a misspelt field is caught in strict mode.
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, yaml.replace("mountPropagation:", "mountPropogation:")).unwrap();
        assert!(
            validate(&root, &bad, "1.35.0").is_err(),
            "strict validation missed a misspelt field"
        );
    }

    #[test]
    fn the_config_map_is_a_valid_node_config_with_kubernetes_on() {
        let text = std::fs::read_to_string(workspace_root().join(DEPLOY_DIR).join("sockmesh.toml")).unwrap();
        assert!(text.contains("[kubernetes]") && text.contains("sigterm_keeps_state = true"));
        assert!(text.contains("admin_socket = \"/run/sockmesh/admin.sock\""));
    }

    #[test]
    fn the_dashboard_uses_only_metrics_the_daemon_exports() {
        let root = workspace_root();
        let dash = std::fs::read_to_string(root.join(DASHBOARD)).unwrap();
        let exported = std::fs::read_to_string(root.join("mesh-userspace/src/metrics.rs")).unwrap();
        let mut seen = 0;
        for (i, _) in dash.match_indices("sockmesh_") {
            let name: String = dash[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = name.trim_end_matches("_bucket");
            assert!(
                exported.contains(base),
                "the dashboard queries {name}, which metrics.rs does not export"
            );
            seen += 1;
        }
        assert!(seen >= 8, "only {seen} metric references in the dashboard");
    }

    #[test]
    fn ldd_output_parses() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }
}
