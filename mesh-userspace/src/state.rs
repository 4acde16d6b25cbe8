//! Enrolment state on disk, so a restarted daemon re-adopts its pods and the routing policy
//! applied at runtime. Written atomically (temp file + rename) after every enrol, unenrol and
//! `routes apply`.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{config::PodSpec, routing::RawPolicy};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    #[serde(default)]
    pub external_proxy: bool,
    #[serde(default = "yes")]
    pub capture: bool,
    #[serde(default)]
    pub inbound_ports: Vec<u16>,
    #[serde(default)]
    pub inbound_all_ports: bool,
    #[serde(default)]
    pub inbound_exclude_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colour: Option<String>,
    #[serde(default)]
    pub propagate: bool,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub links: std::collections::BTreeMap<String, Vec<PathBuf>>,
}

fn yes() -> bool {
    true
}

impl From<&PodSpec> for PodState {
    fn from(p: &PodSpec) -> Self {
        Self {
            name: p.name.clone(),
            netns: p.netns.clone(),
            cgroup: p.cgroup.clone(),
            external_proxy: p.external_proxy,
            capture: p.capture,
            inbound_ports: p.inbound_ports.clone(),
            inbound_all_ports: p.inbound_all_ports,
            inbound_exclude_ports: p.inbound_exclude_ports.clone(),
            colour: p.colour.clone(),
            propagate: p.propagate,
            links: p.links.clone(),
        }
    }
}

impl From<PodState> for PodSpec {
    fn from(p: PodState) -> Self {
        Self {
            name: p.name,
            netns: p.netns,
            cgroup: p.cgroup,
            external_proxy: p.external_proxy,
            capture: p.capture,
            inbound_ports: p.inbound_ports,
            inbound_all_ports: p.inbound_all_ports,
            inbound_exclude_ports: p.inbound_exclude_ports,
            colour: p.colour,
            propagate: p.propagate,
            links: p.links,
        }
    }
}

/// A policy applied with `sockmesh routes apply`, and the config file's policy it replaced. A
/// successor resumes `applied` only while the config still says `base`: an edited config wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRouting {
    pub base: RawPolicy,
    pub applied: RawPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub abi_version: u32,
    pub cgroup_root: PathBuf,
    pub pods: Vec<PodState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<AppliedRouting>,
}

/// `Ok(None)` when there is no state file.
pub fn load(path: &Path) -> io::Result<Option<State>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn save(path: &Path, state: &State) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, path)
}

pub fn remove(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_absence() {
        let dir = std::env::temp_dir().join(format!("sockmesh-state-test-{}", std::process::id()));
        let path = dir.join("state.json");
        assert_eq!(load(&path).unwrap(), None);
        let st = State {
            abi_version: 1,
            cgroup_root: "/sys/fs/cgroup/x".into(),
            pods: vec![PodState {
                name: "a".into(),
                netns: "/run/netns/a".into(),
                cgroup: "/sys/fs/cgroup/x/a".into(),
                external_proxy: false,
                capture: true,
                inbound_ports: vec![8080],
                inbound_all_ports: false,
                inbound_exclude_ports: vec![],
                colour: Some("gray".into()),
                propagate: true,
                links: [(
                    "trade".to_owned(),
                    vec![PathBuf::from("/sys/fs/cgroup/cpu/x/trade")],
                )]
                .into(),
            }],
            routing: Some(AppliedRouting {
                base: RawPolicy::default(),
                applied: crate::routing::parse_toml("detect_timeout_ms = 50").unwrap(),
            }),
        };
        save(&path, &st).unwrap();
        assert_eq!(load(&path).unwrap(), Some(st));
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(load(&path).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
