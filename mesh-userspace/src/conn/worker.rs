//! The proxy's workers: thread-per-core. Each worker is an OS thread (`sockmesh-w<i>`, pinned
//! to one CPU when the affinity mask allows) running its own current-thread tokio runtime.
//! Every pod listener has an accept loop on every worker; a connection stays on the worker that
//! accepted it for its whole life, and so do its upstream connections: the HTTP and Bolt/Dubbo
//! pools are per worker ([`PerWorker`]), so no request or byte crosses threads on the hot path.
//! The control plane (admin, metrics, links, Kubernetes, upgrades) runs on a runtime of its own
//! and reaches the workers through their [`Handle`]s ([`Workers`]).
//!
//! Unit tests run without workers: everything then runs on the test's own runtime and uses the
//! first slot of each [`PerWorker`].

use std::{
    cell::Cell,
    future::Future,
    io,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    time::Duration,
};

use tokio::{runtime::Handle, task::JoinHandle};
use tracing::{debug, warn};

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// This thread's worker index, when it is a proxy worker.
pub fn current() -> Option<usize> {
    CURRENT.with(|c| c.get())
}

/// One value per worker. A thread that is not a worker (the control plane, a unit test's
/// runtime) uses the first.
pub struct PerWorker<T>(Box<[T]>);

impl<T> PerWorker<T> {
    pub fn new(n: usize, mut f: impl FnMut(usize) -> T) -> Self {
        Self((0..n.max(1)).map(&mut f).collect())
    }

    /// The value of the worker running this code.
    pub fn here(&self) -> &T {
        &self.0[current().unwrap_or(0) % self.0.len()]
    }

    pub fn all(&self) -> &[T] {
        &self.0
    }
}

impl<T: Default> Default for PerWorker<T> {
    fn default() -> Self {
        Self::new(1, |_| T::default())
    }
}

/// A counter alone on its cache line (each worker writes its own).
#[derive(Default)]
#[repr(align(64))]
struct Counter(AtomicU64);

/// Handles on the running workers, and their accept counters.
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    accepted: PerWorker<Counter>,
    /// `reuseport_listeners`: a pod's listening address is an `SO_REUSEPORT` group of one
    /// socket per worker (`proxy.rs`), not one socket every worker accepts on.
    groups: bool,
}

impl Default for Workers {
    /// No workers (unit tests): work runs on the caller's runtime.
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Workers {
    pub fn new(handles: Vec<Handle>) -> Self {
        let n = handles.len();
        Self {
            handles,
            next: AtomicUsize::new(0),
            accepted: PerWorker::new(n, |_| Counter::default()),
            groups: true,
        }
    }

    /// `reuseport_listeners = false`: one listening socket per address, accepted on by every
    /// worker.
    pub fn with_listener_groups(mut self, on: bool) -> Self {
        self.groups = on;
        self
    }

    /// How many sockets a new listening address gets: one per worker in an `SO_REUSEPORT`
    /// group, or `None`: one socket without `SO_REUSEPORT` (`reuseport_listeners = false`).
    pub fn group_size(&self) -> Option<usize> {
        self.groups.then(|| self.count())
    }

    /// How many workers serve connections (1 without workers: the caller's runtime).
    pub fn count(&self) -> usize {
        self.handles.len().max(1)
    }

    /// Run `f(i)`'s future on worker `i`, for every worker (or once on the current runtime
    /// without workers). `f` runs on the calling thread inside the worker's runtime context,
    /// so what it registers (a listener) belongs to that worker.
    pub fn spawn_each<F, Fut>(&self, mut f: F) -> Vec<JoinHandle<Fut::Output>>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        if self.handles.is_empty() {
            return vec![tokio::spawn(f(0))];
        }
        self.handles
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let _in = h.enter();
                h.spawn(f(i))
            })
            .collect()
    }

    /// Run `f()`'s future on worker `i` (modulo the count; the current runtime without
    /// workers). `f` runs inside that worker's runtime context, so a listener it registers
    /// belongs to that worker's reactor.
    pub fn spawn_on<F, Fut>(&self, i: usize, f: F) -> JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        if self.handles.is_empty() {
            return tokio::spawn(f());
        }
        let h = &self.handles[i % self.handles.len()];
        let _in = h.enter();
        h.spawn(f())
    }

    /// Run a future on the next worker in turn (a connection handed over by an upgrade).
    pub fn spawn_any<Fut>(&self, fut: Fut) -> JoinHandle<Fut::Output>
    where
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        if self.handles.is_empty() {
            return tokio::spawn(fut);
        }
        let i = self.next.fetch_add(1, Relaxed) % self.handles.len();
        self.handles[i].spawn(fut)
    }

    /// Count a connection accepted by the worker running this code.
    pub fn note_accepted(&self) {
        self.accepted.here().0.fetch_add(1, Relaxed);
    }

    /// Connections accepted so far, per worker.
    pub fn accepted(&self) -> Vec<u64> {
        self.accepted.all().iter().map(|c| c.0.load(Relaxed)).collect()
    }
}

/// The running worker threads; [`Threads::stop`] ends them.
pub struct Threads {
    threads: Vec<(std::thread::JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>,
}

/// Start `n` workers. With `pin`, worker `i` is pinned to the `i`-th CPU of the process's
/// affinity mask when there are at least `n` of them (best effort: a failure is logged, never
/// fatal).
pub fn start(n: usize, pin: bool) -> io::Result<(Threads, Vec<Handle>)> {
    let cpus = allowed_cpus();
    let pin = pin && cpus.len() >= n;
    let mut threads = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let cpu = cpus.get(i).copied().filter(|_| pin);
        let t = std::thread::Builder::new()
            .name(format!("sockmesh-w{i}"))
            .spawn(move || {
                CURRENT.with(|c| c.set(Some(i)));
                if let Some(cpu) = cpu {
                    match pin_to(cpu) {
                        Ok(()) => debug!(worker = i, cpu, "worker pinned"),
                        Err(e) => warn!(worker = i, cpu, "worker not pinned: {e}"),
                    }
                }
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                let _ = rt.block_on(stopped);
                rt.shutdown_timeout(Duration::from_millis(500));
            })?;
        let handle = rx
            .recv()
            .map_err(|_| io::Error::other(format!("worker {i} did not start")))??;
        threads.push((t, stop));
        handles.push(handle);
    }
    Ok((Threads { threads }, handles))
}

impl Threads {
    /// End the workers (their remaining tasks are dropped) and wait for the threads.
    pub fn stop(self) {
        let threads: Vec<_> = self
            .threads
            .into_iter()
            .map(|(t, stop)| {
                let _ = stop.send(());
                t
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pin the calling thread to `cpu`.
fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: as above; the set is a local the kernel only reads.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_its_own_tasks_and_counts_its_own_accepts() {
        let (threads, handles) = start(2, true).unwrap();
        let workers = std::sync::Arc::new(Workers::new(handles));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let seen = rt.block_on(async {
            let w = workers.clone();
            let hs = workers.spawn_each(move |_| {
                let w = w.clone();
                async move {
                    w.note_accepted();
                    (current(), std::thread::current().name().map(str::to_owned))
                }
            });
            let mut seen = Vec::new();
            for h in hs {
                seen.push(h.await.unwrap());
            }
            seen
        });
        assert_eq!(
            seen,
            vec![
                (Some(0), Some("sockmesh-w0".to_string())),
                (Some(1), Some("sockmesh-w1".to_string()))
            ]
        );
        assert_eq!(workers.accepted(), vec![1, 1]);
        // Not a worker: the first slot.
        assert_eq!(current(), None);
        let per = PerWorker::new(2, |i| i);
        assert_eq!(*per.here(), 0);
        threads.stop();
    }
}
