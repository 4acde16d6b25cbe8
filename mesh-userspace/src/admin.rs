//! The admin API: newline-delimited JSON over a Unix socket (mode 0600). One request per line,
//! one response per line. The CLI's `enroll`, `unenroll` and `status` are its clients.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
};
use tracing::warn;

use crate::daemon::Daemon;

/// Longest request line accepted (a pod spec is a few hundred bytes; a routing policy of a
/// thousand services fits easily).
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Enroll {
        name: String,
        netns: String,
        cgroup: String,
        #[serde(default)]
        external_proxy: bool,
        #[serde(default = "yes")]
        capture: bool,
        #[serde(default)]
        inbound_ports: Vec<u32>,
        #[serde(default)]
        inbound_all_ports: bool,
        #[serde(default)]
        inbound_exclude_ports: Vec<u32>,
        #[serde(default)]
        colour: Option<String>,
        #[serde(default)]
        propagate: bool,
        /// Dual links: link name → cgroup directories of its apps in this pod.
        #[serde(default)]
        links: std::collections::BTreeMap<String, Vec<String>>,
    },
    Unenroll {
        name: String,
    },
    /// From `sockmesh-cni` ADD: a pod sandbox has its network (the plugin's `cni::Notice`).
    CniAdd(crate::cni::CniAdd),
    /// From `sockmesh-cni` DEL.
    CniDel(crate::cni::CniDel),
    /// Stop the daemon; `keep_state` leaves links, maps and enrolment pinned for a successor.
    Stop {
        #[serde(default)]
        keep_state: bool,
    },
    Status,
    /// `sockmesh upgrade`: start `binary` as the next generation and hand over to it.
    Upgrade {
        binary: std::path::PathBuf,
    },
    /// The live routing policy with per-route counters.
    Routes,
    /// Replace the whole routing policy.
    RoutesApply {
        policy: crate::routing::RawPolicy,
    },
    /// `sockmesh switch`: `to` a link (or `back` to the previous one), or `abort`, `pause` or
    /// `resume` the switch in progress; none of them: the links' view.
    Switch {
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        back: bool,
        #[serde(default)]
        abort: bool,
        #[serde(default)]
        pause: bool,
        #[serde(default)]
        resume: bool,
        #[serde(default)]
        over_ms: u64,
        #[serde(default = "one")]
        steps: u32,
    },
    /// Mark an endpoint of the kernel-routed services down (it leaves the kernel's weighted
    /// choice) or up again.
    KernelEndpoint {
        address: SocketAddr,
        up: bool,
    },
    /// Colour an app's inbound connection (`ColourKernel::set_inbound`): for a proxy outside
    /// the daemon, and for tests. `local`/`remote` as the app's accepted socket sees them.
    ColourInbound {
        local: SocketAddr,
        remote: SocketAddr,
        colour: u32,
    },
    /// Forget an inbound connection's colour (`ColourKernel::clear_inbound`).
    ColourClear {
        local: SocketAddr,
        remote: SocketAddr,
    },
    /// An app socket's colour ledger (`ColourKernel::ledger`), and with `offset` the colour
    /// there (`ColourKernel::ledger_colour`). `local`/`remote` as the app socket sees them.
    ColourLedger {
        netns_cookie: u64,
        local: SocketAddr,
        remote: SocketAddr,
        #[serde(default)]
        offset: Option<u64>,
    },
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

impl Response {
    fn ok() -> Self {
        Self {
            ok: true,
            error: None,
            status: None,
        }
    }
    fn err(e: impl ToString) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            status: None,
        }
    }
}

/// Bind the socket (replacing a stale one), mode 0600.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A live daemon answers; a stale socket file does not.
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another daemon is serving {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(l: UnixListener, daemon: Arc<Daemon>) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            // One connection carries a few requests; cap what a client may send in all.
            let mut lines = tokio::io::BufReader::new(r.take(MAX_REQUEST as u64)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => handle(&daemon, req).await,
                    Err(e) => Response::err(format!("bad request: {e}")),
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn handle(daemon: &Arc<Daemon>, req: Request) -> Response {
    match req {
        Request::Enroll {
            name,
            netns,
            cgroup,
            external_proxy,
            capture,
            inbound_ports,
            inbound_all_ports,
            inbound_exclude_ports,
            colour,
            propagate,
            links,
        } => {
            if let Some(c) = &colour {
                if let Err(e) = crate::config::check_pod_colour(c, &daemon.policy()) {
                    return Response::err(format!("colour: {e}"));
                }
            }
            let inbound_exclude_ports =
                match crate::config::check_inbound_ports(&inbound_exclude_ports, daemon.outbound_port()) {
                    Ok(p) => p,
                    Err(e) => return Response::err(format!("inbound_exclude_ports: {e}")),
                };
            let inbound_ports =
                match crate::config::check_inbound_ports(&inbound_ports, daemon.outbound_port()) {
                    Ok(p) => p,
                    Err(e) => return Response::err(format!("inbound_ports: {e}")),
                };
            let spec = crate::config::PodSpec {
                capture,
                inbound_ports,
                inbound_all_ports,
                inbound_exclude_ports,
                name,
                netns: netns.into(),
                cgroup: cgroup.into(),
                external_proxy,
                colour,
                propagate,
                links: links
                    .into_iter()
                    .map(|(k, v)| (k, v.into_iter().map(Into::into).collect()))
                    .collect(),
            };
            match daemon.enroll(spec) {
                Ok(()) => Response::ok(),
                Err(e) => {
                    warn!("enroll refused: {e}");
                    Response::err(e)
                }
            }
        }
        Request::Unenroll { name } => match daemon.unenroll(&name).await {
            Ok(()) => Response::ok(),
            Err(e) => Response::err(e),
        },
        // An opted-in pod is enrolled before this answers (the plugin's ADD waits for it).
        Request::CniAdd(add) => match crate::k8s::cni_add(daemon, add).await {
            Ok(()) => Response::ok(),
            Err(e) => Response::err(e),
        },
        Request::CniDel(del) => cni_notice(crate::cni::Notice::CniDel(del)),
        Request::Stop { keep_state } => {
            daemon.request_stop(keep_state);
            Response::ok()
        }
        Request::Switch {
            to,
            back,
            abort,
            pause,
            resume,
            over_ms,
            steps,
        } => match daemon.switch(to, back, abort, pause, resume, over_ms, steps) {
            Ok(v) => Response {
                ok: true,
                error: None,
                status: Some(v),
            },
            Err(e) => {
                warn!("switch refused: {e}");
                Response::err(e)
            }
        },
        Request::Upgrade { binary } => match crate::upgrade::old::start(&binary).await {
            Ok(v) => Response {
                ok: true,
                error: None,
                status: Some(v),
            },
            Err(e) => Response::err(e),
        },
        Request::Status => Response {
            ok: true,
            error: None,
            status: Some(daemon.status()),
        },
        Request::Routes => Response {
            ok: true,
            error: None,
            status: Some(daemon.routes()),
        },
        Request::ColourInbound {
            local,
            remote,
            colour,
        } => match daemon.colour().set_inbound(local, remote, colour) {
            Ok(()) => Response::ok(),
            Err(e) => Response::err(e),
        },
        Request::ColourClear { local, remote } => {
            daemon.colour().clear_inbound(local, remote);
            Response::ok()
        }
        Request::ColourLedger {
            netns_cookie,
            local,
            remote,
            offset,
        } => {
            let colour = daemon.colour();
            if let Err(e) = colour.status() {
                return Response::err(format!("colour propagation unavailable: {e}"));
            }
            let ledger = colour.ledger(netns_cookie, local, remote);
            Response {
                ok: true,
                error: None,
                status: Some(serde_json::json!({
                    "ledger": ledger.as_ref().map(ledger_json),
                    "colour": offset.and_then(|o| colour.ledger_colour(netns_cookie, local, remote, o)),
                })),
            }
        }
        Request::KernelEndpoint { address, up } => match daemon.set_kernel_endpoint(address, up) {
            Ok(w) => Response {
                ok: true,
                error: None,
                status: Some(serde_json::json!({ "table": w })),
            },
            Err(e) => Response::err(format!("kernel tables: {e}")),
        },
        Request::RoutesApply { policy } => match daemon.apply_routes(policy) {
            Ok(generation) => Response {
                ok: true,
                error: None,
                status: Some(serde_json::json!({ "generation": generation })),
            },
            Err(e) => {
                warn!("routing policy refused: {e}");
                Response::err(format!("invalid policy: {e}"))
            }
        },
    }
}

/// Queue a CNI DEL notice for discovery; answered at once (the plugin must not wait on the CRI).
fn cni_notice(n: crate::cni::Notice) -> Response {
    match crate::k8s::notify(n) {
        Ok(()) => Response::ok(),
        Err(e) => Response::err(e),
    }
}

/// A ledger as JSON: the kept changes oldest first.
fn ledger_json(l: &mesh_common::colour::Ledger) -> serde_json::Value {
    use mesh_common::colour::LEDGER_SLOTS;
    let n = l.changes as usize;
    let kept = n.min(LEDGER_SLOTS);
    let changes: Vec<_> = (n - kept..n)
        .map(|k| {
            let s = &l.slots[k % LEDGER_SLOTS];
            serde_json::json!({ "offset": s.offset, "colour": s.colour })
        })
        .collect();
    serde_json::json!({
        "sent_bytes": l.sent_bytes,
        "last_colour": l.last_colour,
        "changes_total": l.changes,
        "changes": changes,
    })
}

/// Client side: send one request, read one response.
pub fn call(path: &Path, req: &Request) -> anyhow::Result<Response> {
    let s = UnixStream::connect(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the daemon at {}: {e} (is `sockmesh run` up?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = &s;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line)?;
    let mut r = BufReader::new(&s);
    let mut resp = String::new();
    r.read_line(&mut resp)?;
    if resp.is_empty() {
        anyhow::bail!("the daemon closed the admin connection without answering");
    }
    Ok(serde_json::from_str(&resp)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r: Request =
            serde_json::from_str(r#"{"op":"enroll","name":"a","netns":"/n","cgroup":"/c"}"#).unwrap();
        assert_eq!(
            r,
            Request::Enroll {
                name: "a".into(),
                netns: "/n".into(),
                cgroup: "/c".into(),
                external_proxy: false,
                capture: true,
                inbound_ports: vec![],
                inbound_all_ports: false,
                inbound_exclude_ports: vec![],
                colour: None,
                propagate: false,
                links: Default::default(),
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
    }

    /// What `sockmesh-cni` sends is what the admin API reads.
    #[test]
    fn cni_notices_are_admin_requests() {
        let add = crate::cni::CniAdd {
            sandbox_id: "abc".into(),
            netns: "/var/run/netns/cni-1".into(),
            namespace: Some("default".into()),
            name: Some("web.v1".into()),
            uid: Some("11111111-2222-3333-4444-555555555555".into()),
            annotations: [("sockmesh.io/mesh".to_string(), "enabled".to_string())].into(),
        };
        let wire = serde_json::to_string(&crate::cni::Notice::CniAdd(add.clone())).unwrap();
        let r: Request = serde_json::from_str(&wire).unwrap();
        assert_eq!(r, Request::CniAdd(add));
        // An older plugin's notice (no annotations) still reads.
        let r: Request =
            serde_json::from_str(r#"{"op":"cni_add","sandbox_id":"abc","netns":"/run/netns/x"}"#).unwrap();
        assert!(matches!(r, Request::CniAdd(ref a) if a.annotations.is_empty() && a.uid.is_none()));
        let del = crate::cni::CniDel {
            sandbox_id: "abc".into(),
            uid: None,
        };
        let wire = serde_json::to_string(&crate::cni::Notice::CniDel(del.clone())).unwrap();
        let r: Request = serde_json::from_str(&wire).unwrap();
        assert_eq!(r, Request::CniDel(del));
    }
}
