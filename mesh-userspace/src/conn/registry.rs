//! The registry of live proxied connections (relayed and L7), as `status` shows them.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Instant,
};

use serde::Serialize;

use super::Direction;

/// One live proxied connection, as `status` shows it.
#[derive(Debug)]
pub struct ConnEntry {
    pub id: u64,
    pub pod: String,
    pub direction: Direction,
    pub client: SocketAddr,
    pub original_dst: SocketAddr,
    pub upstream_local: Mutex<Option<SocketAddr>>,
    pub bytes_to_upstream: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub started: Instant,
}

#[derive(Debug, Serialize, Clone)]
pub struct ConnView {
    pub id: u64,
    pub pod: String,
    pub direction: Direction,
    pub client: String,
    pub original_dst: String,
    pub upstream_local: Option<String>,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    pub age_ms: u64,
}

/// Live connections, for status.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    conns: Mutex<BTreeMap<u64, Arc<ConnEntry>>>,
}

impl Registry {
    pub(crate) fn add(
        &self,
        pod: &str,
        direction: Direction,
        client: SocketAddr,
        original_dst: SocketAddr,
    ) -> Arc<ConnEntry> {
        let id = self.next_id.fetch_add(1, Relaxed) + 1;
        let e = Arc::new(ConnEntry {
            id,
            pod: pod.to_string(),
            direction,
            client,
            original_dst,
            upstream_local: Mutex::new(None),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            started: Instant::now(),
        });
        self.conns.lock().expect("registry lock").insert(id, e.clone());
        e
    }

    pub(crate) fn remove(&self, id: u64) {
        self.conns.lock().expect("registry lock").remove(&id);
    }

    pub fn len(&self) -> usize {
        self.conns.lock().expect("registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<ConnView> {
        self.conns
            .lock()
            .expect("registry lock")
            .values()
            .map(|e| ConnView {
                id: e.id,
                pod: e.pod.clone(),
                direction: e.direction,
                client: e.client.to_string(),
                original_dst: e.original_dst.to_string(),
                upstream_local: e.upstream_local.lock().expect("conn lock").map(|a| a.to_string()),
                bytes_to_upstream: e.bytes_to_upstream.load(Relaxed),
                bytes_to_client: e.bytes_to_client.load(Relaxed),
                age_ms: e.started.elapsed().as_millis() as u64,
            })
            .collect()
    }
}
