//! The instruction counter behind `cargo xtask instructions`: sequential 1 KiB HTTP/1.1 GETs
//! over one keep-alive connection, either through an in-process proxy (`proxied`) or from the
//! same client straight to the same upstream (`direct`), everything on one current-thread
//! runtime (as a proxy worker runs).
//!
//! Run under `valgrind --tool=callgrind --toggle-collect='*instructions*measured_phase*'`, only
//! the measured requests are counted (the set-up and the warm-up are not); the proxied count
//! minus the direct count, over the requests, is the proxy's instructions per request. It is
//! `#[ignore]`d: it counts nothing by itself, the xtask reads callgrind's totals.
//!
//! - `SOCKMESH_INSTR_MODE`: `proxied` (default) or `direct`;
//! - `SOCKMESH_INSTR_REQUESTS`: measured requests (default 2000), after
//!   [`WARM_UP`] requests that fill the pools and caches.

use super::*;

/// Requests before the measured ones.
pub const WARM_UP: usize = 200;
/// The response body size.
const BODY_BYTES: usize = 1024;

static BODY: [u8; BODY_BYTES] = [b'x'; BODY_BYTES];

/// An HTTP/1.1 upstream answering every request with [`BODY`].
async fn upstream_1k() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(&BODY))))
                });
                let _ = hs::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// `n` sequential GETs on `c`; every one must be a 200 with the whole body.
async fn requests(c: &mut hc::http1::SendRequest<Body>, n: usize) {
    for _ in 0..n {
        c.ready().await.unwrap();
        let resp = c.send_request(get("/").body(empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!((status, body.len()), (StatusCode::OK, BODY_BYTES));
    }
}

/// The requests callgrind counts (`--toggle-collect` names this function): everything the
/// runtime runs meanwhile (client, proxy, upstream tasks) runs inside this `block_on`.
#[inline(never)]
fn measured_phase(rt: &tokio::runtime::Runtime, c: &mut hc::http1::SendRequest<Body>, n: usize) {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(600), requests(c, n)).await })
        .expect("the measured requests finish within 10 minutes");
}

#[test]
#[ignore = "counts instructions under callgrind: `cargo xtask instructions`"]
fn instructions_per_request() {
    let mode = std::env::var("SOCKMESH_INSTR_MODE").unwrap_or_else(|_| "proxied".into());
    let n: usize = std::env::var("SOCKMESH_INSTR_REQUESTS")
        .ok()
        .map(|v| v.parse().expect("SOCKMESH_INSTR_REQUESTS is a number"))
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_proxy, mut client) = rt.block_on(async {
        let up = upstream_1k().await;
        let (proxy, target) = match mode.as_str() {
            "proxied" => {
                let p = proxy(one_endpoint(up), HttpVersion::Http1, VIP).await;
                let addr = p.addr;
                (Some(p), addr)
            }
            "direct" => (None, up),
            other => panic!("SOCKMESH_INSTR_MODE is `proxied` or `direct`, not `{other}`"),
        };
        let mut c = h1_client(target).await;
        tokio::time::timeout(BOUND, requests(&mut c, WARM_UP))
            .await
            .expect("the warm-up finishes in time");
        (proxy, c)
    });
    measured_phase(&rt, &mut client, n);
    if let Some(p) = &_proxy {
        // Every request went through the proxy on one upstream connection.
        assert_eq!(p.shared.l7.http.connections(), 1);
    }
    println!("{mode}: {n} requests measured after {WARM_UP}");
}
