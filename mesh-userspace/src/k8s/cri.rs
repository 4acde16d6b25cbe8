//! A small CRI client (`runtime.v1.RuntimeService`) over the node's CRI socket: the calls
//! discovery needs, `ListPodSandbox`, verbose `PodSandboxStatus` and `ListContainers`. The gRPC code is generated
//! by build.rs from `proto/cri/api.proto`.

use std::{collections::BTreeMap, path::Path, time::Duration};

pub mod runtime {
    #![allow(clippy::all, dead_code, missing_docs)]
    tonic::include_proto!("runtime.v1");
}

use runtime::runtime_service_client::RuntimeServiceClient;

/// What discovery needs to know about one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    pub id: String,
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub ready: bool,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// From the verbose status (containerd: `info.runtimeSpec.linux.namespaces`).
    pub netns: Option<String>,
    /// From the verbose status (containerd: `info.config.linux.cgroup_parent`).
    pub cgroup_parent: Option<String>,
}

pub struct Cri {
    client: RuntimeServiceClient<tonic::transport::Channel>,
}

impl Cri {
    /// Connect to the CRI socket (a Unix socket path); every call times out after 5 s.
    pub async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let path = socket.to_owned();
        // The URI is required by the API and unused: the connector dials the socket.
        let channel = tonic::transport::Endpoint::try_from("http://cri.invalid")?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await?;
        Ok(Self {
            client: RuntimeServiceClient::new(channel),
        })
    }

    /// Every sandbox the runtime knows (ready or not), without verbose details.
    pub async fn list(&mut self) -> anyhow::Result<Vec<runtime::PodSandbox>> {
        let r = self
            .client
            .list_pod_sandbox(runtime::ListPodSandboxRequest { filter: None })
            .await?;
        Ok(r.into_inner().items)
    }

    /// The containers of every sandbox (created, running or exited): (sandbox id, name, id).
    pub async fn containers(&mut self) -> anyhow::Result<Vec<(String, String, String)>> {
        let r = self
            .client
            .list_containers(runtime::ListContainersRequest { filter: None })
            .await?;
        Ok(r.into_inner()
            .containers
            .into_iter()
            .filter(|c| c.state != runtime::ContainerState::ContainerExited as i32)
            .map(|c| {
                let name = c.metadata.map(|m| m.name).unwrap_or_default();
                (c.pod_sandbox_id, name, c.id)
            })
            .collect())
    }

    /// One sandbox's verbose status; `None` when the runtime no longer knows it.
    pub async fn status(&mut self, id: &str) -> anyhow::Result<Option<Sandbox>> {
        let r = self
            .client
            .pod_sandbox_status(runtime::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_string(),
                verbose: true,
            })
            .await;
        let r = match r {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(s.into()),
        };
        let Some(st) = r.status else {
            return Ok(None);
        };
        let meta = st.metadata.unwrap_or_default();
        let (netns, cgroup_parent) = r.info.get("info").map(|j| verbose_info(j)).unwrap_or_default();
        Ok(Some(Sandbox {
            id: st.id,
            uid: meta.uid,
            namespace: meta.namespace,
            name: meta.name,
            ready: st.state == runtime::PodSandboxState::SandboxReady as i32,
            created_at: st.created_at,
            labels: st.labels.into_iter().collect(),
            annotations: st.annotations.into_iter().collect(),
            netns,
            cgroup_parent,
        }))
    }
}

/// The netns path and cgroup parent from containerd's verbose sandbox info (JSON).
pub fn verbose_info(json: &str) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return (None, None);
    };
    let netns = v["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|n| n["type"] == "network")
                .and_then(|n| n["path"].as_str())
        })
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    let cgroup = v["config"]["linux"]["cgroup_parent"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    (netns, cgroup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbose_info_of_containerd_1_6() {
        let j = r#"{"pid":25871,"config":{"metadata":{"name":"web"},"linux":{"cgroup_parent":"/kubepods/besteffort/pod1111"}},
            "runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-d80e"}]}}}"#;
        assert_eq!(
            verbose_info(j),
            (
                Some("/var/run/netns/cni-d80e".into()),
                Some("/kubepods/besteffort/pod1111".into())
            )
        );
        assert_eq!(verbose_info("{}"), (None, None));
        assert_eq!(verbose_info("not json"), (None, None));
    }
}
