//! `sockmesh-cni`, the chained CNI plugin (CNI spec 1.0), as pure functions: parse the
//! environment and the network config on stdin, decide what to tell the daemon and what to
//! print. `src/bin/sockmesh-cni.rs` wires it to the process and the admin socket; the daemon's
//! admin API accepts the two notices (`cni_add`, `cni_del`, see [`Notice`]).
//!
//! The plugin must never break pod networking: ADD always returns the previous plugin's result
//! unchanged (byte for byte) once its input parses, whether or not the daemon answered. The pod
//! is then picked up by CRI discovery instead. Only malformed input gets a CNI error object.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The CNI versions this plugin speaks (it only passes results on, so every result shape of
/// these versions is fine).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// Longest stdin accepted (a conflist with a big prevResult is a few kB).
pub const MAX_STDIN: usize = 1 << 20;
/// Longest `CNI_ARGS` accepted.
pub const MAX_ARGS: usize = 16 << 10;
/// Default and ceiling of the wait for the daemon's answer.
pub const DEFAULT_TIMEOUT_MS: u64 = 2000;
pub const MAX_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sockmesh/admin.sock";

/// CNI error codes (spec section "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
}

/// A CNI error object (printed on stdout, exit status 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            cni_version: "1.0.0".into(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        match s {
            "ADD" => Ok(Self::Add),
            "DEL" => Ok(Self::Del),
            "CHECK" => Ok(Self::Check),
            "VERSION" => Ok(Self::Version),
            other => Err(CniError::new(
                code::INVALID_ENV,
                "unknown CNI_COMMAND",
                truncate(other, 64),
            )),
        }
    }
}

/// The pod identity the runtime puts in `CNI_ARGS` (containerd, CRI-O:
/// `IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
    pub infra_container_id: Option<String>,
}

/// Parse `CNI_ARGS`: `;`-separated `KEY=VALUE` pairs (empty segments allowed, a pair without `=`
/// or with an empty key is an error, a key given twice is an error). Unknown keys are ignored.
/// Pod names and namespaces are checked to be Kubernetes-shaped; a UID must be a UUID-like
/// string, since the daemon enrols the pod under it.
pub fn parse_args(s: &str) -> Result<PodArgs, CniError> {
    let bad = |why: &str| CniError::new(code::INVALID_ENV, "invalid CNI_ARGS", why.to_string());
    if s.len() > MAX_ARGS {
        return Err(bad("longer than 16 KiB"));
    }
    let mut seen = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(bad(&format!("`{}` is not KEY=VALUE", truncate(pair, 64))));
        };
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(bad(&format!("bad key `{}`", truncate(k, 64))));
        }
        if seen.insert(k, v).is_some() {
            return Err(bad(&format!("`{k}` given twice")));
        }
    }
    let get = |k: &str| seen.get(k).filter(|v| !v.is_empty()).map(|v| v.to_string());
    let args = PodArgs {
        namespace: get("K8S_POD_NAMESPACE"),
        name: get("K8S_POD_NAME"),
        uid: get("K8S_POD_UID"),
        infra_container_id: get("K8S_POD_INFRA_CONTAINER_ID"),
    };
    if let Some(ns) = &args.namespace {
        if !is_dns_label(ns) {
            return Err(bad("K8S_POD_NAMESPACE is not a DNS label"));
        }
    }
    if let Some(n) = &args.name {
        if !is_dns_subdomain(n) {
            return Err(bad("K8S_POD_NAME is not a DNS subdomain"));
        }
    }
    if let Some(u) = &args.uid {
        if !is_uid(u) {
            return Err(bad("K8S_POD_UID is not a UID"));
        }
    }
    Ok(args)
}

/// RFC 1123 label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: up to 253 characters, dot-separated labels.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A pod UID as the daemon's enrolment name accepts it: 1-63 of `[A-Za-z0-9-]` (Kubernetes
/// writes UUIDs; static pods use a hash).
pub fn is_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The network config on stdin: the standard keys this plugin reads, `prevResult` kept raw, and
/// its own keys (`adminSocket`, `timeoutMs`, `logFile`).
#[derive(Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    // Read for validation of the config's shape; the plugin needs neither.
    #[allow(dead_code)]
    #[serde(default)]
    pub name: Option<String>,
    #[allow(dead_code)]
    #[serde(rename = "type", default)]
    pub plugin_type: Option<String>,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Box<RawValue>>,
    #[serde(rename = "adminSocket", default)]
    pub admin_socket: Option<String>,
    #[serde(rename = "timeoutMs", default)]
    pub timeout_ms: Option<u64>,
    #[serde(rename = "logFile", default)]
    pub log_file: Option<String>,
    /// What the runtime fills in for the capabilities the conflist entry declares. Kept as
    /// JSON: a runtime's odd value must not fail the pod's network (see [`pod_annotations`]).
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: Option<serde_json::Value>,
}

/// The capability through which containerd (and CRI-O) hand a plugin the pod's annotations.
pub const CAP_POD_ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";
/// At most this many annotations, of at most this many bytes each, are passed on.
pub const MAX_ANNOTATIONS: usize = 256;
pub const MAX_ANNOTATION_LEN: usize = 64 << 10;

/// The pod annotations in `runtimeConfig` (string values only; anything else is ignored, not
/// an error: the pod's network comes first).
pub fn pod_annotations(conf: &NetConf) -> BTreeMap<String, String> {
    let Some(map) = conf
        .runtime_config
        .as_ref()
        .and_then(|r| r.get(CAP_POD_ANNOTATIONS))
        .and_then(serde_json::Value::as_object)
    else {
        return BTreeMap::new();
    };
    map.iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .filter(|(k, v)| k.len() <= 317 && v.len() <= MAX_ANNOTATION_LEN)
        .take(MAX_ANNOTATIONS)
        .collect()
}

impl NetConf {
    pub fn admin_socket(&self) -> &str {
        self.admin_socket.as_deref().unwrap_or(DEFAULT_ADMIN_SOCKET)
    }
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
            .unwrap_or(DEFAULT_TIMEOUT_MS)
            .clamp(1, MAX_TIMEOUT_MS)
    }
}

pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    if stdin.len() > MAX_STDIN {
        return Err(CniError::new(
            code::DECODE,
            "network config too large",
            "over 1 MiB",
        ));
    }
    let conf: NetConf = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(code::DECODE, "failed to decode the network config", e.to_string()))?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "unsupported cniVersion",
            format!(
                "`{}`; supported: {}",
                truncate(&conf.cni_version, 32),
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if let Some(p) = &conf.admin_socket {
        if p.is_empty() || !p.starts_with('/') || p.len() > 107 {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "adminSocket must be an absolute socket path",
                truncate(p, 128),
            ));
        }
    }
    Ok(conf)
}

/// `cni_add`: a pod sandbox has its network. One type for the plugin's notice and the admin
/// API's request (`admin::Request::CniAdd`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAdd {
    pub sandbox_id: String,
    pub netns: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
    /// The pod's annotations, when the runtime passes them (the plugin's conflist entry
    /// declares the capability `io.kubernetes.cri.pod-annotations`): the opt-in annotation
    /// here lets the daemon enrol the pod before ADD returns.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// `cni_del`: the sandbox's network is being torn down.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniDel {
    pub sandbox_id: String,
    #[serde(default)]
    pub uid: Option<String>,
}

/// What the plugin tells the daemon; the admin API's `cni_add` / `cni_del` requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Notice {
    CniAdd(CniAdd),
    CniDel(CniDel),
}

impl Notice {
    /// One short line for the plugin's log (annotations may be long: only their count).
    pub fn summary(&self) -> String {
        match self {
            Notice::CniAdd(a) => format!(
                "cni_add sandbox={} pod={}/{} uid={} annotations={}",
                truncate(&a.sandbox_id, 64),
                a.namespace.as_deref().unwrap_or("-"),
                a.name.as_deref().unwrap_or("-"),
                a.uid.as_deref().unwrap_or("-"),
                a.annotations.len()
            ),
            Notice::CniDel(d) => format!(
                "cni_del sandbox={} uid={}",
                truncate(&d.sandbox_id, 64),
                d.uid.as_deref().unwrap_or("-")
            ),
        }
    }
}

/// The process inputs: `CNI_*` variables and stdin.
#[derive(Debug, Default, Clone)]
pub struct Invocation {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub stdin: Vec<u8>,
}

/// The outcome of one call: what to print on stdout, and the notice for the daemon.
#[derive(Debug)]
pub struct Plan {
    pub stdout: String,
    pub notice: Option<Notice>,
    pub conf: Option<NetConf>,
}

fn required<'a>(v: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
    v.as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("{name} is not set"), ""))
}

/// Decide one call. Never touches the daemon: the caller sends `notice` (bounded wait) and
/// prints `stdout` whatever the daemon said.
pub fn plan(inv: &Invocation) -> Result<Plan, CniError> {
    let cmd = Command::parse(required(&inv.command, "CNI_COMMAND")?)?;
    if cmd == Command::Version {
        let supported: Vec<String> = SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect();
        let out = serde_json::json!({ "cniVersion": "1.0.0", "supportedVersions": supported });
        return Ok(Plan {
            stdout: out.to_string(),
            notice: None,
            conf: None,
        });
    }
    let conf = parse_conf(&inv.stdin)?;
    let sandbox_id = required(&inv.container_id, "CNI_CONTAINERID")?;
    if sandbox_id.len() > 256 || !sandbox_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CniError::new(
            code::INVALID_ENV,
            "CNI_CONTAINERID is not an id",
            "",
        ));
    }
    required(&inv.ifname, "CNI_IFNAME")?;
    let args = parse_args(inv.args.as_deref().unwrap_or(""))?;
    match cmd {
        Command::Add => {
            let netns = required(&inv.netns, "CNI_NETNS")?;
            if !netns.starts_with('/') || netns.len() > 4096 {
                return Err(CniError::new(code::INVALID_ENV, "CNI_NETNS is not a path", ""));
            }
            // A chained plugin without a previous result has nothing to pass on: an empty
            // result of the config's version.
            let stdout = match conf.prev_result.as_deref().map(RawValue::get) {
                Some(raw) if raw != "null" => raw.to_string(),
                _ => serde_json::json!({ "cniVersion": conf.cni_version }).to_string(),
            };
            let annotations = pod_annotations(&conf);
            Ok(Plan {
                stdout,
                notice: Some(Notice::CniAdd(CniAdd {
                    sandbox_id: sandbox_id.to_string(),
                    netns: netns.to_string(),
                    namespace: args.namespace,
                    name: args.name,
                    uid: args.uid,
                    annotations,
                })),
                conf: Some(conf),
            })
        }
        Command::Del => Ok(Plan {
            stdout: String::new(),
            notice: Some(Notice::CniDel(CniDel {
                sandbox_id: sandbox_id.to_string(),
                uid: args.uid,
            })),
            conf: Some(conf),
        }),
        // Capture is best effort by design: nothing here can make the pod's network wrong.
        Command::Check => Ok(Plan {
            stdout: String::new(),
            notice: None,
            conf: Some(conf),
        }),
        Command::Version => unreachable!("answered above"),
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/cni-1"}],"ips":[{"interface":0,"address":"10.244.77.7/24","gateway":"10.244.77.1"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

    fn inv(cmd: &str, stdin: &str, args: &str) -> Invocation {
        Invocation {
            command: Some(cmd.into()),
            container_id: Some("7666862a3f31".into()),
            netns: Some("/var/run/netns/cni-d80ec876".into()),
            ifname: Some("eth0".into()),
            args: Some(args.into()),
            stdin: stdin.as_bytes().to_vec(),
        }
    }

    const ARGS: &str = "K8S_POD_INFRA_CONTAINER_ID=7666862a3f31;K8S_POD_UID=11111111-2222-3333-4444-555555555555;IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web.v1";

    #[test]
    fn add_passes_prev_result_on_byte_for_byte_and_notifies() {
        let stdin =
            format!(r#"{{"cniVersion":"1.0.0","name":"k8s","type":"sockmesh-cni","prevResult":{PREV}}}"#);
        let p = plan(&inv("ADD", &stdin, ARGS)).unwrap();
        assert_eq!(p.stdout, PREV);
        assert_eq!(
            p.notice,
            Some(Notice::CniAdd(CniAdd {
                sandbox_id: "7666862a3f31".into(),
                netns: "/var/run/netns/cni-d80ec876".into(),
                namespace: Some("default".into()),
                name: Some("web.v1".into()),
                uid: Some("11111111-2222-3333-4444-555555555555".into()),
                annotations: BTreeMap::new(),
            }))
        );
        assert_eq!(p.conf.unwrap().admin_socket(), DEFAULT_ADMIN_SOCKET);
    }

    #[test]
    fn add_without_prev_result_returns_an_empty_result() {
        let p = plan(&inv("ADD", r#"{"cniVersion":"0.4.0","name":"k"}"#, "")).unwrap();
        assert_eq!(p.stdout, r#"{"cniVersion":"0.4.0"}"#);
    }

    #[test]
    fn add_passes_the_pod_annotations_the_runtime_gave() {
        let stdin = format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","type":"sockmesh-cni","capabilities":{{"{CAP_POD_ANNOTATIONS}":true}},
               "runtimeConfig":{{"portMappings":[],"{CAP_POD_ANNOTATIONS}":{{"sockmesh.io/mesh":"enabled","sockmesh.io/inbound-ports":"8080","odd":7}}}},
               "prevResult":{PREV}}}"#
        );
        let p = plan(&inv("ADD", &stdin, ARGS)).unwrap();
        assert_eq!(p.stdout, PREV);
        let Some(Notice::CniAdd(add)) = p.notice else {
            panic!("no cni_add")
        };
        assert_eq!(
            add.annotations.get("sockmesh.io/mesh").map(String::as_str),
            Some("enabled")
        );
        assert_eq!(
            add.annotations
                .get("sockmesh.io/inbound-ports")
                .map(String::as_str),
            Some("8080")
        );
        // A non-string value is dropped, not an error: the pod's network comes first.
        assert!(!add.annotations.contains_key("odd"));
        // A runtime that passes something else under the capability: no annotations, still ADD.
        for rc in [
            r#""runtimeConfig":7"#,
            r#""runtimeConfig":{"io.kubernetes.cri.pod-annotations":[1]}"#,
        ] {
            let stdin = format!(r#"{{"cniVersion":"1.0.0",{rc},"prevResult":{PREV}}}"#);
            let p = plan(&inv("ADD", &stdin, ARGS)).unwrap();
            assert_eq!(p.stdout, PREV);
            assert!(matches!(p.notice, Some(Notice::CniAdd(ref a)) if a.annotations.is_empty()));
        }
        // The wire form: annotations only when there are some.
        let j = serde_json::to_value(Notice::CniAdd(CniAdd::default())).unwrap();
        assert_eq!(j["op"], "cni_add");
        assert!(j.get("annotations").is_none());
    }

    #[test]
    fn del_and_check_print_nothing() {
        let stdin = r#"{"cniVersion":"1.0.0","name":"k","type":"sockmesh-cni"}"#;
        let d = plan(&inv("DEL", stdin, ARGS)).unwrap();
        assert!(d.stdout.is_empty());
        assert!(matches!(d.notice, Some(Notice::CniDel(_))));
        // DEL may come without a netns (the runtime already removed it).
        let mut i = inv("DEL", stdin, ARGS);
        i.netns = None;
        assert!(plan(&i).is_ok());
        let c = plan(&inv("CHECK", stdin, ARGS)).unwrap();
        assert!(c.stdout.is_empty() && c.notice.is_none());
    }

    #[test]
    fn version_lists_the_supported_versions() {
        let p = plan(&Invocation {
            command: Some("VERSION".into()),
            ..Default::default()
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&p.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED_VERSIONS.len()
        );
    }

    #[test]
    fn bad_input_gets_error_objects_with_the_spec_codes() {
        let ok = r#"{"cniVersion":"1.0.0","name":"k"}"#;
        let code_of = |i: Invocation| plan(&i).unwrap_err().code;
        assert_eq!(code_of(inv("ADD", "{", ARGS)), code::DECODE);
        assert_eq!(
            code_of(inv("ADD", r#"{"cniVersion":"9.9.9"}"#, ARGS)),
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(code_of(inv("EXPLODE", ok, ARGS)), code::INVALID_ENV);
        assert_eq!(code_of(inv("ADD", ok, "K8S_POD_NAME")), code::INVALID_ENV);
        assert_eq!(code_of(inv("ADD", ok, "=x")), code::INVALID_ENV);
        assert_eq!(code_of(inv("ADD", ok, "A=1;A=2")), code::INVALID_ENV);
        assert_eq!(code_of(inv("ADD", ok, "K8S_POD_UID=../../x")), code::INVALID_ENV);
        assert_eq!(code_of(inv("ADD", ok, "K8S_POD_NAME=Web")), code::INVALID_ENV);
        let mut no_netns = inv("ADD", ok, ARGS);
        no_netns.netns = None;
        assert_eq!(code_of(no_netns), code::INVALID_ENV);
        assert_eq!(
            code_of(inv("ADD", r#"{"cniVersion":"1.0.0","adminSocket":"rel"}"#, ARGS)),
            code::INVALID_CONFIG
        );
        let e = plan(&inv("ADD", "{", ARGS)).unwrap_err();
        let j: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(j["code"], 6);
        assert!(j["msg"].as_str().unwrap().contains("decode"));
    }

    #[test]
    fn names_with_dots_and_63_characters_parse() {
        let long = "a".repeat(63);
        let a = parse_args(&format!("K8S_POD_NAME={long}.{long};K8S_POD_NAMESPACE={long}")).unwrap();
        assert_eq!(a.namespace.as_deref(), Some(long.as_str()));
        assert!(parse_args(&format!("K8S_POD_NAMESPACE={long}a")).is_err());
    }

    #[test]
    fn timeout_is_bounded() {
        let c = parse_conf(br#"{"cniVersion":"1.0.0","timeoutMs":999999999}"#).unwrap();
        assert_eq!(c.timeout_ms(), MAX_TIMEOUT_MS);
        let c = parse_conf(br#"{"cniVersion":"1.0.0","timeoutMs":0}"#).unwrap();
        assert_eq!(c.timeout_ms(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        // Whatever the runtime hands over, the plugin answers: a plan or an error object.
        #[test]
        fn any_stdin_and_args_give_a_plan_or_an_error(
            cmd in prop::sample::select(vec!["ADD", "DEL", "CHECK", "VERSION", "GC", ""]),
            stdin in prop::collection::vec(any::<u8>(), 0..512),
            args in ".{0,256}",
        ) {
            let i = Invocation { stdin, args: Some(args), ..inv(cmd, "", "") };
            match plan(&i) {
                Ok(p) => prop_assert!(cmd == "VERSION" || p.conf.is_some()),
                Err(e) => prop_assert!(serde_json::to_string(&e).is_ok() && e.code > 0),
            }
        }

        // Structured CNI_ARGS: the K8S_ keys come back as given, in any order, with noise.
        #[test]
        fn k8s_args_round_trip(
            ns in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
            name in "[a-z0-9]{1,20}(\\.[a-z0-9]{1,20}){0,3}",
            uid in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            order in Just(vec![0usize, 1, 2, 3]).prop_shuffle(),
            empty_segments in any::<bool>(),
        ) {
            let pairs = [
                format!("K8S_POD_NAMESPACE={ns}"),
                format!("K8S_POD_NAME={name}"),
                format!("K8S_POD_UID={uid}"),
                "IgnoreUnknown=1".to_string(),
            ];
            let sep = if empty_segments { ";;" } else { ";" };
            let s = order.iter().map(|i| pairs[*i].clone()).collect::<Vec<_>>().join(sep);
            let a = parse_args(&s).unwrap();
            prop_assert_eq!(a.namespace, Some(ns));
            prop_assert_eq!(a.name, Some(name));
            prop_assert_eq!(a.uid, Some(uid));
        }

        // Any JSON value as prevResult comes back exactly as it was sent.
        #[test]
        fn prev_result_round_trips(ip in "[0-9]{1,3}(\\.[0-9]{1,3}){3}/[0-9]{1,2}", extra in "[a-zA-Z ]{0,30}") {
            let prev = format!(r#"{{"cniVersion":"1.0.0", "ips":[{{"address":"{ip}"}}],"x":"{extra}" }}"#);
            let stdin = format!(r#"{{"cniVersion":"1.0.0","prevResult":{prev}}}"#);
            let p = plan(&inv("ADD", &stdin, ARGS)).unwrap();
            prop_assert_eq!(p.stdout, prev);
        }
    }
}
