//! Per-route request counters: requests, failures by reason and a latency histogram, labelled
//! (service, route, subset) on the Prometheus endpoint.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex,
    },
    time::Duration,
};

use serde::Serialize;

/// Upper bounds of the latency histogram, in seconds (Prometheus `le`).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered (whatever its status: an application error is still an answer).
    Answered,
    /// The proxy answered for it (HTTP 502/504, a Bolt or Dubbo error response) or closed the
    /// connection; the reason is a short stable label (`timeout`, `upstream_connect`, ...).
    Failed(&'static str),
}

/// Counters of one (service, route, subset).
#[derive(Debug)]
pub struct RouteStats {
    pub service: String,
    pub route: String,
    pub subset: String,
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_sum_us: AtomicU64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteStatsView {
    pub service: String,
    pub route: String,
    pub subset: String,
    pub requests: u64,
    pub retries: u64,
    pub failures: BTreeMap<String, u64>,
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS`] (the last is `+Inf` = `requests`).
    pub latency_buckets: Vec<u64>,
    pub latency_sum_seconds: f64,
}

impl RouteStats {
    pub fn new(service: &str, route: &str, subset: &str) -> Self {
        Self {
            service: service.to_owned(),
            route: route.to_owned(),
            subset: subset.to_owned(),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            failures: Mutex::new(BTreeMap::new()),
            buckets: Default::default(),
            latency_sum_us: AtomicU64::new(0),
        }
    }

    /// Count one finished request.
    pub fn record(&self, outcome: Outcome, latency: Duration) {
        self.requests.fetch_add(1, Relaxed);
        if let Outcome::Failed(reason) = outcome {
            *self
                .failures
                .lock()
                .expect("stats lock")
                .entry(reason)
                .or_default() += 1;
        }
        let secs = latency.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&le| secs <= le) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_sum_us.fetch_add(latency.as_micros() as u64, Relaxed);
    }

    /// Count one retry (an extra attempt of a request already counted once).
    pub fn record_retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    pub fn view(&self) -> RouteStatsView {
        let mut cumulative = 0;
        let latency_buckets = self
            .buckets
            .iter()
            .map(|b| {
                cumulative += b.load(Relaxed);
                cumulative
            })
            .collect();
        RouteStatsView {
            service: self.service.clone(),
            route: self.route.clone(),
            subset: self.subset.clone(),
            requests: self.requests.load(Relaxed),
            retries: self.retries.load(Relaxed),
            failures: self
                .failures
                .lock()
                .expect("stats lock")
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            latency_buckets,
            latency_sum_seconds: self.latency_sum_us.load(Relaxed) as f64 / 1e6,
        }
    }

    /// Add counts that another generation of the daemon recorded for this route (an upgrade's
    /// carry-over): `buckets` per latency bucket, not cumulative.
    pub(crate) fn add_counts(
        &self,
        requests: u64,
        retries: u64,
        failures: &[(&'static str, u64)],
        buckets: &[u64],
        latency_sum_us: u64,
    ) {
        self.requests.fetch_add(requests, Relaxed);
        self.retries.fetch_add(retries, Relaxed);
        if !failures.is_empty() {
            let mut f = self.failures.lock().expect("stats lock");
            for (k, v) in failures {
                *f.entry(k).or_default() += v;
            }
        }
        for (b, n) in self.buckets.iter().zip(buckets) {
            b.fetch_add(*n, Relaxed);
        }
        self.latency_sum_us.fetch_add(latency_sum_us, Relaxed);
    }

    /// Carry another instance's counts over (same labels, previous policy generation).
    pub(crate) fn absorb(&self, old: &RouteStats) {
        self.requests.fetch_add(old.requests.load(Relaxed), Relaxed);
        self.retries.fetch_add(old.retries.load(Relaxed), Relaxed);
        {
            let old_f = old.failures.lock().expect("stats lock");
            let mut f = self.failures.lock().expect("stats lock");
            for (k, v) in old_f.iter() {
                *f.entry(k).or_default() += v;
            }
        }
        for (b, o) in self.buckets.iter().zip(old.buckets.iter()) {
            b.fetch_add(o.load(Relaxed), Relaxed);
        }
        self.latency_sum_us
            .fetch_add(old.latency_sum_us.load(Relaxed), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_failures_by_reason() {
        let s = RouteStats::new("svc", "r", "v1");
        s.record(Outcome::Answered, Duration::from_micros(300));
        s.record(Outcome::Answered, Duration::from_millis(3));
        s.record(Outcome::Failed("timeout"), Duration::from_secs(20));
        let v = s.view();
        assert_eq!(v.requests, 3);
        assert_eq!(v.latency_buckets[0], 1);
        assert_eq!(v.latency_buckets[3], 2); // <= 5 ms
        assert_eq!(*v.latency_buckets.last().unwrap(), 2); // 20 s is beyond the last bound
        assert_eq!(v.failures.get("timeout"), Some(&1));
        let t = RouteStats::new("svc", "r", "v1");
        t.absorb(&s);
        assert_eq!(t.view(), v);
    }
}
