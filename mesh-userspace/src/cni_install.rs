//! `sockmesh cni-install` / `sockmesh uninstall --cni-conf-dir`: put `sockmesh-cni` into the
//! node's CNI bin dir and chain it at the end of the node's network (the first `.conflist` of
//! the conf dir, which is the one the runtime uses), like istio-cni's node agent; and take both
//! out again. Every write goes through a temporary file and a rename, so the runtime never reads
//! half a file. Idempotent both ways.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

/// The plugin's `type` (and binary name).
pub const PLUGIN: &str = "sockmesh-cni";

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The conflist the runtime uses: the first `*.conflist` by name (libcni's order). A node whose
/// network is a single-plugin `.conf` is refused: it must be turned into a conflist first.
pub fn primary_conflist(conf_dir: &Path) -> io::Result<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(conf_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    names.sort();
    match names.first() {
        Some(p) if p.extension().is_some_and(|e| e == "conflist") => Ok(p.clone()),
        Some(p) => Err(invalid(format!(
            "{} is a single-plugin config: chaining needs a .conflist",
            p.display()
        ))),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no CNI network config in {} yet", conf_dir.display()),
        )),
    }
}

/// `conflist` with our plugin last (replacing an older entry of ours).
pub fn chain(conflist: &Value, entry: &Value) -> io::Result<Value> {
    let mut out = conflist.clone();
    let plugins = out
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| invalid("the conflist has no `plugins` list".into()))?;
    plugins.retain(|p| p["type"] != PLUGIN);
    plugins.push(entry.clone());
    Ok(out)
}

/// `conflist` without our plugin; `None` when it was not there.
pub fn unchain(conflist: &Value) -> Option<Value> {
    let mut out = conflist.clone();
    let plugins = out.get_mut("plugins")?.as_array_mut()?;
    let before = plugins.len();
    plugins.retain(|p| p["type"] != PLUGIN);
    (plugins.len() != before).then_some(out)
}

/// Our entry in the chain. It declares the capability through which containerd (1.4+) and
/// CRI-O pass the pod's annotations (`runtimeConfig`): the opt-in annotation lets the daemon
/// enrol the pod during ADD.
pub fn entry(admin_socket: &Path, log_file: Option<&Path>) -> Value {
    let mut e = json!({
        "type": PLUGIN,
        "adminSocket": admin_socket,
        "timeoutMs": crate::cni::DEFAULT_TIMEOUT_MS,
        "capabilities": { crate::cni::CAP_POD_ANNOTATIONS: true },
    });
    if let Some(l) = log_file {
        e["logFile"] = json!(l);
    }
    e
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_file_name(format!(
        ".{}.sockmesh-tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}

/// Install the binary and chain the plugin; returns the conflist it changed.
pub fn install(
    plugin_binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    admin_socket: &Path,
    log_file: Option<&Path>,
) -> io::Result<PathBuf> {
    let bin = std::fs::read(plugin_binary)?;
    std::fs::create_dir_all(bin_dir)?;
    write_atomic(&bin_dir.join(PLUGIN), &bin, 0o755)?;
    let path = primary_conflist(conf_dir)?;
    let text = std::fs::read_to_string(&path)?;
    let current: Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    let new = chain(&current, &entry(admin_socket, log_file))?;
    if new != current {
        let mut out = serde_json::to_vec_pretty(&new).map_err(|e| invalid(e.to_string()))?;
        out.push(b'\n');
        write_atomic(&path, &out, 0o644)?;
    }
    Ok(path)
}

/// Our entry in `conflist`, if it is chained.
pub fn our_entry(conflist: &Value) -> Option<&Value> {
    conflist["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["type"] == PLUGIN)
}

/// What [`ensure_chained`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Chained {
    /// The primary conflist has our entry (remembered for later).
    Present,
    /// It had not: the entry is back, in this file.
    Rechained(PathBuf),
}

/// The node agent's guard: when the primary conflist of `conf_dir` lost our entry (the node's
/// network agent rewrote it), chain `remembered` (the last entry seen there) or `fallback` back
/// in. Keeps `remembered` up to date.
pub fn ensure_chained(
    conf_dir: &Path,
    remembered: &mut Option<Value>,
    fallback: &Value,
) -> io::Result<Chained> {
    let path = primary_conflist(conf_dir)?;
    let text = std::fs::read_to_string(&path)?;
    let current: Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    if let Some(e) = our_entry(&current) {
        *remembered = Some(e.clone());
        return Ok(Chained::Present);
    }
    let entry = remembered.clone().unwrap_or_else(|| fallback.clone());
    let new = chain(&current, &entry)?;
    let mut out = serde_json::to_vec_pretty(&new).map_err(|e| invalid(e.to_string()))?;
    out.push(b'\n');
    write_atomic(&path, &out, 0o644)?;
    *remembered = Some(entry);
    Ok(Chained::Rechained(path))
}

/// Unchain the plugin from every conflist in `conf_dir` and remove the binary; returns what it
/// changed or removed.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> io::Result<Vec<String>> {
    let mut done = Vec::new();
    if let Ok(entries) = std::fs::read_dir(conf_dir) {
        for p in entries.flatten().map(|e| e.path()) {
            if p.extension().is_none_or(|e| e != "conflist") {
                continue;
            }
            let Ok(v) = std::fs::read_to_string(&p).map(|t| serde_json::from_str::<Value>(&t)) else {
                continue;
            };
            if let Some(new) = v.ok().as_ref().and_then(unchain) {
                let mut out = serde_json::to_vec_pretty(&new).map_err(|e| invalid(e.to_string()))?;
                out.push(b'\n');
                write_atomic(&p, &out, 0o644)?;
                done.push(format!("unchained {PLUGIN} from {}", p.display()));
            }
        }
    }
    let bin = bin_dir.join(PLUGIN);
    match std::fs::remove_file(&bin) {
        Ok(()) => done.push(format!("removed {}", bin.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sockmesh-cni-install-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("net.d")).unwrap();
        d
    }

    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn install_chains_last_once_and_uninstall_restores() {
        let d = tmp("roundtrip");
        let conf = d.join("net.d/10-k8s.conflist");
        std::fs::write(&conf, BRIDGE).unwrap();
        std::fs::write(d.join("net.d/99-later.conflist"), BRIDGE).unwrap();
        let src = d.join("plugin-src");
        std::fs::write(&src, b"#!/bin/true\n").unwrap();
        let sock = Path::new("/run/sockmesh/admin.sock");
        for _ in 0..2 {
            let changed = install(&src, &d.join("bin"), &d.join("net.d"), sock, None).unwrap();
            assert_eq!(changed, conf);
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
        let types: Vec<_> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].clone())
            .collect();
        assert_eq!(types, [json!("bridge"), json!("portmap"), json!(PLUGIN)]);
        assert_eq!(v["plugins"][2]["adminSocket"], "/run/sockmesh/admin.sock");
        assert!(d.join("bin").join(PLUGIN).exists());
        // The other conflist is not the runtime's: untouched.
        assert_eq!(
            std::fs::read_to_string(d.join("net.d/99-later.conflist")).unwrap(),
            BRIDGE
        );
        let done = uninstall(&d.join("bin"), &d.join("net.d")).unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        let back: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(BRIDGE).unwrap());
        assert!(!d.join("bin").join(PLUGIN).exists());
        assert!(uninstall(&d.join("bin"), &d.join("net.d")).unwrap().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_rewritten_conflist_gets_the_remembered_entry_back() {
        let d = tmp("rechain");
        let conf = d.join("net.d/10-k8s.conflist");
        std::fs::write(&conf, BRIDGE).unwrap();
        let src = d.join("plugin-src");
        std::fs::write(&src, b"x").unwrap();
        let sock = Path::new("/x/admin.sock");
        install(
            &src,
            &d.join("bin"),
            &d.join("net.d"),
            sock,
            Some(Path::new("/x/cni.log")),
        )
        .unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
        assert_eq!(
            our_entry(&v).unwrap()["capabilities"][crate::cni::CAP_POD_ANNOTATIONS],
            true
        );
        let fallback = entry(Path::new("/run/sockmesh/admin.sock"), None);
        let mut remembered = None;
        let dir = d.join("net.d");
        assert_eq!(
            ensure_chained(&dir, &mut remembered, &fallback).unwrap(),
            Chained::Present
        );
        // The network agent rewrites its conflist without us.
        std::fs::write(&conf, BRIDGE).unwrap();
        assert_eq!(
            ensure_chained(&dir, &mut remembered, &fallback).unwrap(),
            Chained::Rechained(conf.clone())
        );
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
        // The entry as installed (its admin socket and log file), not the fallback.
        assert_eq!(our_entry(&v).unwrap()["adminSocket"], "/x/admin.sock");
        assert_eq!(our_entry(&v).unwrap()["logFile"], "/x/cni.log");
        assert_eq!(v["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(
            ensure_chained(&dir, &mut remembered, &fallback).unwrap(),
            Chained::Present
        );
        // Never seen: the fallback.
        std::fs::write(&conf, BRIDGE).unwrap();
        let mut none = None;
        ensure_chained(&dir, &mut none, &fallback).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
        assert_eq!(our_entry(&v).unwrap()["adminSocket"], "/run/sockmesh/admin.sock");
        // A half-written conflist is an error, and left alone.
        std::fs::write(&conf, "{").unwrap();
        assert!(ensure_chained(&dir, &mut remembered, &fallback).is_err());
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "{");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn no_network_yet_or_a_single_plugin_conf_is_refused() {
        let d = tmp("refuse");
        let src = d.join("plugin-src");
        std::fs::write(&src, b"x").unwrap();
        let sock = Path::new("/run/sockmesh/admin.sock");
        let e = install(&src, &d.join("bin"), &d.join("net.d"), sock, None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::write(
            d.join("net.d/10-a.conf"),
            r#"{"cniVersion":"1.0.0","type":"bridge"}"#,
        )
        .unwrap();
        assert!(install(&src, &d.join("bin"), &d.join("net.d"), sock, None).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
