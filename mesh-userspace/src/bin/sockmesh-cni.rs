//! `sockmesh-cni`: the chained CNI plugin that tells the node's sockmesh daemon about pod
//! sandboxes (src/cni.rs holds the logic). Installed into the node's CNI bin dir and appended
//! to its conflist by the DaemonSet's init container (`sockmesh cni-install`).
//!
//! ADD: pass `prevResult` on unchanged and send `cni_add` (sandbox id, netns, pod
//! namespace/name/UID) to the daemon, waiting at most `timeoutMs`. DEL: send `cni_del`. A daemon
//! that is down or slow is logged and ignored: CRI discovery enrols the pod later. Only
//! malformed input fails, with a CNI error object on stdout.

#[path = "../cni.rs"]
mod cni;

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    process::ExitCode,
    time::{Duration, Instant},
};

fn main() -> ExitCode {
    let var = |k: &str| std::env::var(k).ok();
    let mut stdin = Vec::new();
    let command = var("CNI_COMMAND");
    // Bounded: a runtime never sends more than a network config with a result.
    let _ = std::io::stdin()
        .take(cni::MAX_STDIN as u64 + 1)
        .read_to_end(&mut stdin);
    let inv = cni::Invocation {
        command,
        container_id: var("CNI_CONTAINERID"),
        netns: var("CNI_NETNS"),
        ifname: var("CNI_IFNAME"),
        args: var("CNI_ARGS"),
        stdin,
    };
    let plan = match cni::plan(&inv) {
        Ok(p) => p,
        Err(e) => {
            log(None, &format!("refused: {e}"));
            println!("{}", serde_json::to_string(&e).unwrap_or_default());
            return ExitCode::FAILURE;
        }
    };
    if let (Some(notice), Some(conf)) = (&plan.notice, &plan.conf) {
        let start = Instant::now();
        let r = notify(
            conf.admin_socket(),
            notice,
            Duration::from_millis(conf.timeout_ms()),
        );
        let ms = start.elapsed().as_millis();
        match r {
            Ok(()) => log(
                conf.log_file.as_deref(),
                &format!("{}: daemon answered in {ms} ms", notice.summary()),
            ),
            Err(e) => log(
                conf.log_file.as_deref(),
                &format!(
                    "{}: daemon not told ({e}) after {ms} ms; discovery will catch up",
                    notice.summary()
                ),
            ),
        }
    }
    if !plan.stdout.is_empty() {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(plan.stdout.as_bytes());
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
    ExitCode::SUCCESS
}

/// One request, one answer line, every step within `timeout` in all.
fn notify(socket: &str, notice: &cni::Notice, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer within {} ms", timeout.as_millis()))
    };
    let s = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
    s.set_write_timeout(Some(left()?)).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(notice).map_err(|e| e.to_string())?;
    line.push(b'\n');
    (&s).write_all(&line).map_err(|e| format!("send: {e}"))?;
    s.set_read_timeout(Some(left()?)).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new((&s).take(64 * 1024))
        .read_line(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&answer).map_err(|e| format!("bad answer `{}`: {e}", answer.trim()))?;
    if v["ok"] == true {
        Ok(())
    } else {
        Err(format!("daemon said: {}", v["error"]))
    }
}

/// Append a line to `logFile` if the config names one, else to stderr (the runtime logs it).
fn log(file: Option<&str>, msg: &str) {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let line = format!("{ts:.3} sockmesh-cni[{}]: {msg}\n", std::process::id());
    if let Some(path) = file {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
            return;
        }
    }
    let _ = std::io::stderr().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice() -> cni::Notice {
        cni::Notice::CniDel(cni::CniDel {
            sandbox_id: "abc".into(),
            uid: None,
        })
    }

    fn socket(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("sockmesh-cni-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn a_silent_daemon_costs_at_most_the_timeout() {
        let path = socket("silent");
        // Accepts (the kernel does, through the backlog) but never answers.
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let start = Instant::now();
        let r = notify(path.to_str().unwrap(), &notice(), Duration::from_millis(300));
        assert!(r.is_err());
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn an_absent_daemon_fails_at_once_and_an_answer_is_read() {
        let path = socket("absent");
        assert!(notify(path.to_str().unwrap(), &notice(), Duration::from_secs(5)).is_err());
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert!(line.contains(r#""op":"cni_del""#), "{line}");
            (&s).write_all(b"{\"ok\":true}\n").unwrap();
        });
        notify(path.to_str().unwrap(), &notice(), Duration::from_secs(5)).unwrap();
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
