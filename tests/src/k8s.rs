//! A Kubernetes node without an API server: a private containerd (CRI) with runc and a CNI
//! chain (`bridge` + `host-local` from Debian's containernetworking-plugins, then `sockmesh-cni`
//! chained by `sockmesh cni-install`), and a small CRI client through which the test plays the
//! kubelet (RunPodSandbox, CreateContainer, StartContainer, StopPodSandbox, RemovePodSandbox).
//!
//! Everything is test-owned and removed by [`KubeNode`]'s `Drop`, even after a panic: the
//! containerd root, state dir and socket under a temp dir, the CNI dirs, the bridge
//! `smk8s<n>`, the pods' network namespaces, and the cgroup subtree `sockmesh-k8s-<pid>-<n>`
//! (the pods' `kubepods` root, in cgroup v2 and in every v1 hierarchy runc used). The node's
//! system containerd config and state are never read or written.
//!
//! Images come from no registry: one busybox-static image built `FROM scratch` with buildah in a
//! private storage serves as the sandbox (pause) image and as the app image; `ctr images import`
//! loads it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    cgroup::{remove_subtree, try_cgroup2_mount},
    process::{run_host, GuardedChild},
    util::{eventually, sockmesh_bin, unique, workspace_root, TempDir},
};

pub mod runtime {
    #![allow(clippy::all, dead_code, missing_docs)]
    tonic::include_proto!("runtime.v1");
}

use runtime::{runtime_service_client::RuntimeServiceClient as Client, *};

/// The one test image (busybox-static): sandbox image and app image.
pub const IMAGE: &str = "sockmesh-test.local/busybox:1";
/// `sockmesh-cni`, next to `SOCKMESH_BIN`.
pub fn cni_bin() -> PathBuf {
    sockmesh_bin().with_file_name("sockmesh-cni")
}

/// What a test needs installed; `None` when everything is there.
pub fn missing_tools() -> Option<String> {
    let mut missing = Vec::new();
    for t in ["containerd", "runc", "ctr", "buildah"] {
        if which(t).is_none() {
            missing.push(t.to_string());
        }
    }
    for p in ["/usr/lib/cni/bridge", "/usr/lib/cni/host-local", "/bin/busybox"] {
        if !Path::new(p).exists() {
            missing.push(p.to_string());
        }
    }
    if !cni_bin().exists() {
        missing.push(cni_bin().display().to_string());
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}

/// The test image archive, built once per workspace (target/k8s-e2e/busybox.tar).
fn image_archive() -> Result<PathBuf> {
    let dir = workspace_root().join("target/k8s-e2e");
    let out = dir.join("busybox.tar");
    if out.exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir)?;
    let storage = [
        "--root".to_string(),
        dir.join("storage").display().to_string(),
        "--runroot".to_string(),
        dir.join("run").display().to_string(),
        "--storage-driver".to_string(),
        "vfs".to_string(),
    ];
    let buildah = |args: &[&str]| -> Result<String> {
        let mut c = Command::new("buildah");
        c.args(&storage).args(args);
        let o = run_host(c, Duration::from_secs(120))?;
        if !o.status.success() {
            bail!("buildah {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let ctr = buildah(&["from", "scratch"])?;
    let r = (|| -> Result<()> {
        let mnt = PathBuf::from(buildah(&["mount", &ctr])?);
        for d in ["bin", "tmp", "www", "etc", "proc", "sys", "dev", "run"] {
            std::fs::create_dir_all(mnt.join(d))?;
        }
        std::fs::copy("/bin/busybox", mnt.join("bin/busybox"))?;
        for a in ["sh", "sleep", "httpd", "wget", "cat", "ip"] {
            std::os::unix::fs::symlink("busybox", mnt.join("bin").join(a))?;
        }
        std::fs::write(mnt.join("www/index.html"), "hello from a CRI pod\n")?;
        std::fs::write(mnt.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
        buildah(&["umount", &ctr])?;
        buildah(&[
            "config",
            "--entrypoint",
            r#"["/bin/busybox","sleep","2147483647"]"#,
            &ctr,
        ])?;
        buildah(&["commit", "-q", &ctr, IMAGE])?;
        let tmp = dir.join("busybox.tar.tmp");
        let _ = std::fs::remove_file(&tmp);
        buildah(&[
            "push",
            "-q",
            IMAGE,
            &format!("docker-archive:{}:{IMAGE}", tmp.display()),
        ])?;
        std::fs::rename(&tmp, &out)?;
        Ok(())
    })();
    let _ = buildah(&["rm", &ctr]);
    r?;
    Ok(out)
}

/// A pod the test created: its sandbox id, UID, IP and netns.
#[derive(Debug, Clone)]
pub struct KPod {
    pub id: String,
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub ip: String,
    pub netns: String,
    /// When `RunPodSandbox` was called.
    pub created: Instant,
    /// The same, in milliseconds since the epoch (to compare with the daemon's log).
    pub created_unix_ms: u64,
}

pub struct KubeNode {
    rt: tokio::runtime::Runtime,
    client: Option<Client<tonic::transport::Channel>>,
    containerd: Option<GuardedChild>,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub bridge: String,
    /// `/<name>`: the cgroup parent of every pod (the kubelet's `kubepods`).
    pub kubepods_rel: String,
    /// `<cgroup2 mount>/<name>`: the attach root.
    pub kubepods: PathBuf,
    netns_seen: Vec<String>,
}

impl KubeNode {
    /// Starts containerd with the CNI chain `bridge` + `host-local` (no sockmesh-cni yet: the
    /// test installs it with `sockmesh cni-install`, the DaemonSet's init container).
    pub fn start() -> Result<KubeNode> {
        let archive = image_archive()?;
        let n = unique();
        let dir = TempDir::new("k8s")?;
        let name = format!("sockmesh-k8s-{}-{n}", std::process::id());
        let cg2 = try_cgroup2_mount()?;
        let kubepods = cg2.join(&name);
        std::fs::create_dir_all(&kubepods)?;
        let subnet = 100 + (std::process::id() % 50) as u8 + (n % 50) as u8;
        let bridge = format!("smk8s{}", n % 1000);
        let cni_bin_dir = dir.join("cni/bin");
        let cni_conf_dir = dir.join("cni/net.d");
        std::fs::create_dir_all(&cni_bin_dir)?;
        std::fs::create_dir_all(&cni_conf_dir)?;
        for p in ["bridge", "host-local", "loopback"] {
            std::fs::copy(Path::new("/usr/lib/cni").join(p), cni_bin_dir.join(p))?;
        }
        std::fs::write(
            cni_conf_dir.join("10-test.conflist"),
            serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "sockmesh-test",
                "plugins": [{
                    "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                    "ipam": { "type": "host-local", "ranges": [[{ "subnet": format!("10.244.{subnet}.0/24") }]],
                              "dataDir": dir.join("cni/ipam") }
                }]
            })
            .to_string(),
        )?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
plugin_dir = ""
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                socket = socket.display(),
                opt = dir.join("opt").display(),
                bin = cni_bin_dir.display(),
                conf = cni_conf_dir.display(),
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        let child = GuardedChild::new(cmd.spawn().context("spawn containerd")?, "containerd")
            .with_term_grace(Duration::from_secs(5));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut node = KubeNode {
            rt,
            client: None,
            containerd: Some(child),
            dir,
            socket,
            cni_bin_dir,
            cni_conf_dir,
            bridge,
            kubepods_rel: format!("/{name}"),
            kubepods,
            netns_seen: Vec::new(),
        };
        eventually(Duration::from_secs(20), || {
            anyhow::ensure!(node.socket.exists(), "no containerd socket yet");
            node.connect()
        })
        .map_err(|e| anyhow!("{e:#}\ncontainerd log:\n{}", node.log()))?;
        node.ctr(&["images", "import", &archive.display().to_string()])?;
        Ok(node)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn connect(&mut self) -> Result<()> {
        let path = self.socket.clone();
        let ch = self.rt.block_on(async move {
            tonic::transport::Endpoint::try_from("http://cri.invalid")?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(60))
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
        })?;
        let mut c = Client::new(ch);
        self.rt.block_on(c.version(VersionRequest::default()))?;
        self.client = Some(c);
        Ok(())
    }

    fn client(&self) -> (&tokio::runtime::Runtime, Client<tonic::transport::Channel>) {
        (&self.rt, self.client.clone().expect("connected in start"))
    }

    /// `ctr -n k8s.io` against this containerd.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io"])
            .args(args);
        let o = run_host(c, Duration::from_secs(120))?;
        if !o.status.success() {
            bail!("ctr {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// RunPodSandbox as the kubelet does it (pod cgroup created first, cgroupfs driver).
    pub fn run_pod(
        &mut self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
    ) -> Result<KPod> {
        let uid = uuid();
        let parent = format!("{}/besteffort/pod{uid}", self.kubepods_rel);
        std::fs::create_dir_all(try_cgroup2_mount()?.join(parent.trim_start_matches('/')))?;
        let log_dir = self.dir.join(format!("logs/{namespace}_{name}_{uid}"));
        std::fs::create_dir_all(&log_dir)?;
        let config = self.sandbox_config(namespace, name, &uid, &parent, labels, annotations, &log_dir);
        let created = Instant::now();
        let created_unix_ms = unix_ms();
        let (rt, mut c) = self.client();
        let id = rt
            .block_on(c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .with_context(|| format!("RunPodSandbox {namespace}/{name}"))?
            .into_inner()
            .pod_sandbox_id;
        let st = rt
            .block_on(c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: true,
            }))?
            .into_inner();
        let ip = st
            .status
            .as_ref()
            .and_then(|s| s.network.as_ref())
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        let netns = st
            .info
            .get("info")
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
            .and_then(|v| {
                v["runtimeSpec"]["linux"]["namespaces"]
                    .as_array()?
                    .iter()
                    .find(|n| n["type"] == "network")?["path"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_default();
        self.netns_seen.push(netns.clone());
        Ok(KPod {
            id,
            uid,
            namespace: namespace.into(),
            name: name.into(),
            ip,
            netns,
            created,
            created_unix_ms,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn sandbox_config(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        parent: &str,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
        log_dir: &Path,
    ) -> PodSandboxConfig {
        let mut l: HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert("io.kubernetes.pod.name".into(), name.into());
        l.insert("io.kubernetes.pod.namespace".into(), namespace.into());
        l.insert("io.kubernetes.pod.uid".into(), uid.into());
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: String::new(),
            log_directory: log_dir.display().to_string(),
            labels: l,
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: parent.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// CreateContainer + StartContainer of `IMAGE` running `command` in the pod.
    pub fn start_container(&mut self, pod: &KPod, name: &str, command: &[&str]) -> Result<String> {
        let config = self.sandbox_config(
            &pod.namespace,
            &pod.name,
            &pod.uid,
            &format!("{}/besteffort/pod{}", self.kubepods_rel, pod.uid),
            &[],
            &[],
            &self
                .dir
                .join(format!("logs/{}_{}_{}", pod.namespace, pod.name, pod.uid)),
        );
        let (rt, mut c) = self.client();
        let id = rt
            .block_on(c.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: IMAGE.into(),
                        ..Default::default()
                    }),
                    command: command.iter().map(|s| s.to_string()).collect(),
                    log_path: format!("{name}.log"),
                    linux: Some(LinuxContainerConfig::default()),
                    ..Default::default()
                }),
                sandbox_config: Some(config),
            }))
            .with_context(|| format!("CreateContainer {name}"))?
            .into_inner()
            .container_id;
        rt.block_on(c.start_container(StartContainerRequest {
            container_id: id.clone(),
        }))
        .with_context(|| format!("StartContainer {name}"))?;
        Ok(id)
    }

    /// Runs a Kubernetes pod template (`spec.template` of a rendered DaemonSet, as JSON) the way
    /// the kubelet would: a sandbox (host network when `hostNetwork`), every init container to
    /// a successful exit (30 s each), then the containers. `hostPath` volumes go through `host`
    /// (the test's stand-ins for node paths), `configMap` volumes are `config_map_dir`.
    /// Returns the pod and its containers' ids by name.
    pub fn run_template(
        &mut self,
        namespace: &str,
        name: &str,
        template: &serde_json::Value,
        host: &dyn Fn(&str) -> PathBuf,
        config_map_dir: &Path,
    ) -> Result<(KPod, HashMap<String, String>)> {
        let spec = &template["spec"];
        let host_network = spec["hostNetwork"].as_bool().unwrap_or(false);
        let labels: Vec<(String, String)> = template["metadata"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let uid = uuid();
        let parent = format!("{}/burstable/pod{uid}", self.kubepods_rel);
        std::fs::create_dir_all(try_cgroup2_mount()?.join(parent.trim_start_matches('/')))?;
        let log_dir = self.dir.join(format!("logs/{namespace}_{name}_{uid}"));
        std::fs::create_dir_all(&log_dir)?;
        let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut config = self.sandbox_config(namespace, name, &uid, &parent, &l, &[], &log_dir);
        let ns_opts = NamespaceOption {
            network: if host_network {
                NamespaceMode::Node as i32
            } else {
                NamespaceMode::Pod as i32
            },
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        };
        if let Some(linux) = config.linux.as_mut() {
            linux.security_context = Some(LinuxSandboxSecurityContext {
                namespace_options: Some(ns_opts.clone()),
                ..Default::default()
            });
        }
        let created = Instant::now();
        let created_unix_ms = unix_ms();
        let (rt, mut c) = self.client();
        let id = rt
            .block_on(c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }))
            .with_context(|| format!("RunPodSandbox {namespace}/{name} from the template"))?
            .into_inner()
            .pod_sandbox_id;
        let pod = KPod {
            id: id.clone(),
            uid,
            namespace: namespace.into(),
            name: name.into(),
            ip: String::new(),
            netns: String::new(),
            created,
            created_unix_ms,
        };
        let volumes: HashMap<String, serde_json::Value> = spec["volumes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| (v["name"].as_str().unwrap_or("").to_string(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut ids = HashMap::new();
        let empty = vec![];
        let init = spec["initContainers"].as_array().unwrap_or(&empty);
        let main = spec["containers"].as_array().unwrap_or(&empty);
        for (is_init, ctr) in init
            .iter()
            .map(|c| (true, c))
            .chain(main.iter().map(|c| (false, c)))
        {
            let cname = ctr["name"].as_str().unwrap_or("c").to_string();
            let strings = |v: &serde_json::Value| -> Vec<String> {
                v.as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                    .unwrap_or_default()
            };
            let mut mounts = Vec::new();
            for m in ctr["volumeMounts"].as_array().unwrap_or(&empty) {
                let vol = &volumes[m["name"].as_str().unwrap_or("")];
                let host_path = if let Some(p) = vol["hostPath"]["path"].as_str() {
                    host(p)
                } else if vol.get("configMap").is_some() {
                    config_map_dir.to_path_buf()
                } else if vol.get("emptyDir").is_some() {
                    // The pod's own directory, as the kubelet's under its pod dir.
                    let d = self
                        .dir
                        .join(format!("pods/{}/{}", pod.uid, m["name"].as_str().unwrap_or("")));
                    std::fs::create_dir_all(&d)?;
                    d
                } else {
                    bail!("volume {vol} is neither hostPath, configMap nor emptyDir");
                };
                let propagation = match m["mountPropagation"].as_str() {
                    Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
                    Some("Bidirectional") => MountPropagation::PropagationBidirectional,
                    _ => MountPropagation::PropagationPrivate,
                };
                mounts.push(Mount {
                    container_path: m["mountPath"].as_str().unwrap_or("").into(),
                    host_path: host_path.display().to_string(),
                    readonly: m["readOnly"].as_bool().unwrap_or(false),
                    propagation: propagation as i32,
                    ..Default::default()
                });
            }
            let sc = &ctr["securityContext"];
            let security = LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: strings(&sc["capabilities"]["add"]),
                    drop_capabilities: strings(&sc["capabilities"]["drop"]),
                    ..Default::default()
                }),
                privileged: sc["privileged"].as_bool().unwrap_or(false),
                namespace_options: Some(ns_opts.clone()),
                run_as_user: sc["runAsUser"].as_i64().map(|value| Int64Value { value }),
                readonly_rootfs: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
                no_new_privs: !sc["allowPrivilegeEscalation"].as_bool().unwrap_or(true),
                seccomp: Some(SecurityProfile {
                    profile_type: match sc["seccompProfile"]["type"].as_str() {
                        Some("Unconfined") => security_profile::ProfileType::Unconfined as i32,
                        _ => security_profile::ProfileType::RuntimeDefault as i32,
                    },
                    ..Default::default()
                }),
                ..Default::default()
            };
            let envs = ctr["env"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .filter_map(|e| {
                    Some(KeyValue {
                        key: e["name"].as_str()?.into(),
                        value: e["value"].as_str()?.into(),
                    })
                })
                .collect();
            let cid = rt
                .block_on(c.create_container(CreateContainerRequest {
                    pod_sandbox_id: id.clone(),
                    config: Some(ContainerConfig {
                        metadata: Some(ContainerMetadata {
                            name: cname.clone(),
                            attempt: 0,
                        }),
                        image: Some(ImageSpec {
                            image: ctr["image"].as_str().unwrap_or("").into(),
                            ..Default::default()
                        }),
                        command: strings(&ctr["command"]),
                        args: strings(&ctr["args"]),
                        envs,
                        mounts,
                        log_path: format!("{cname}.log"),
                        linux: Some(LinuxContainerConfig {
                            security_context: Some(security),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    sandbox_config: Some(config.clone()),
                }))
                .with_context(|| format!("CreateContainer {cname} from the template"))?
                .into_inner()
                .container_id;
            rt.block_on(c.start_container(StartContainerRequest {
                container_id: cid.clone(),
            }))
            .with_context(|| format!("StartContainer {cname}"))?;
            if is_init {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let st = rt
                        .block_on(c.container_status(ContainerStatusRequest {
                            container_id: cid.clone(),
                            verbose: false,
                        }))?
                        .into_inner()
                        .status
                        .unwrap_or_default();
                    if st.state == ContainerState::ContainerExited as i32 {
                        anyhow::ensure!(
                            st.exit_code == 0,
                            "init container {cname} exited {}: {}",
                            st.exit_code,
                            std::fs::read_to_string(log_dir.join(format!("{cname}.log"))).unwrap_or_default()
                        );
                        break;
                    }
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "init container {cname} still runs after 30s"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            ids.insert(cname, cid);
        }
        Ok((pod, ids))
    }

    /// StopContainer: SIGTERM, SIGKILL after `grace` (the kubelet's termination grace period).
    pub fn stop_container(&self, id: &str, grace: i64) -> Result<()> {
        let (rt, mut c) = self.client();
        rt.block_on(c.stop_container(StopContainerRequest {
            container_id: id.into(),
            timeout: grace,
        }))?;
        Ok(())
    }

    /// The exit code of a stopped container.
    pub fn exit_code(&self, id: &str) -> Result<i32> {
        let (rt, mut c) = self.client();
        let st = rt
            .block_on(c.container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }))?
            .into_inner()
            .status
            .unwrap_or_default();
        anyhow::ensure!(
            st.state == ContainerState::ContainerExited as i32,
            "container {id} has not exited"
        );
        Ok(st.exit_code)
    }

    /// ExecSync in a container (10 s timeout): exit code and stdout+stderr.
    pub fn exec(&self, container_id: &str, cmd: &[&str]) -> Result<(i32, String)> {
        let (rt, mut c) = self.client();
        let r = rt
            .block_on(c.exec_sync(ExecSyncRequest {
                container_id: container_id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 10,
            }))
            .with_context(|| format!("ExecSync {cmd:?}"))?
            .into_inner();
        Ok((
            r.exit_code,
            format!(
                "{}{}",
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            ),
        ))
    }

    /// A container's log (CRI format lines) so far.
    pub fn container_log(&self, pod: &KPod, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!(
            "logs/{}_{}_{}/{name}.log",
            pod.namespace, pod.name, pod.uid
        )))
        .unwrap_or_default()
    }

    /// StopPodSandbox (CNI DEL) + RemovePodSandbox.
    pub fn remove_pod(&mut self, pod: &KPod) -> Result<()> {
        let (rt, mut c) = self.client();
        rt.block_on(c.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        }))
        .context("StopPodSandbox")?;
        rt.block_on(c.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        }))
        .context("RemovePodSandbox")?;
        Ok(())
    }

    fn teardown(&mut self) {
        if self.client.is_some() {
            let (rt, mut c) = self.client();
            if let Ok(r) = rt.block_on(c.list_pod_sandbox(ListPodSandboxRequest::default())) {
                for p in r.into_inner().items {
                    let _ = rt.block_on(c.stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: p.id.clone(),
                    }));
                    let _ =
                        rt.block_on(c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: p.id }));
                }
            }
        }
        self.client = None;
        if let Some(mut c) = self.containerd.take() {
            c.stop();
        }
        // Shims of this containerd (they outlive it): by their -address argument.
        crate::sweep::kill_processes_naming(std::slice::from_ref(&self.socket));
        // Mounts under our dir (rootfs, shm) deepest first, then our pods' netns.
        crate::sweep::detach_mounts_below(self.dir.path());
        for n in self.netns_seen.iter().filter(|n| !n.is_empty()) {
            if let Ok(c) = std::ffi::CString::new(n.as_str()) {
                // SAFETY: a valid C string; MNT_DETACH on a path we own.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        for n in self.netns_seen.iter().filter(|n| !n.is_empty()) {
            let _ = std::fs::remove_file(n);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = remove_subtree(&self.kubepods, Duration::from_secs(10));
        // runc also made the pods' cgroups in every v1 hierarchy.
        let name = self.kubepods_rel.trim_start_matches('/');
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let top = h.path().join(name);
            if top.is_dir() {
                let _ = remove_subtree(&top, Duration::from_secs(5));
            }
        }
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.teardown()));
    }
}

/// A random-enough UUID (v4 layout) from the clock, the pid and a counter.
pub fn uuid() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let x = t ^ ((std::process::id() as u128) << 64) ^ ((unique() as u128) << 96);
    let h = format!("{x:032x}");
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// The pod UIDs `sockmesh status` lists.
pub fn enrolled(status: &serde_json::Value) -> Vec<String> {
    status["pods"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Milliseconds since the epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A daemon log without its colour codes.
pub fn plain_log(log: &str) -> String {
    let mut plain = String::new();
    let mut in_escape = false;
    for ch in log.chars() {
        match (in_escape, ch) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
}

/// The value of `field=` on the first line of a daemon log that mentions `uid` and `message`.
pub fn log_field(log: &str, uid: &str, message: &str, field: &str) -> Option<u64> {
    plain_log(log)
        .lines()
        .find(|l| l.contains(uid) && l.contains(message))?
        .split(&format!("{field}="))
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A sandbox's first-connection wait: for diagnostics.
pub fn elapsed_ms(since: Instant) -> u128 {
    since.elapsed().as_millis()
}
