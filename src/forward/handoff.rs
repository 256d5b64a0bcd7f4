//! What the hybrid hand-off needs beside the devices: a counter of the bytes that cross
//! between a device and the host (the planner's `handoff_bytes_per_token`, checked by
//! tests and reported by benchmarks), and the in-order host thread that computes the
//! experts deferred to the next layer while the device runs on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

/// Bytes moved between host and device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfers {
    pub host_to_device: u64,
    pub device_to_host: u64,
}

impl Transfers {
    pub fn total(&self) -> u64 {
        self.host_to_device + self.device_to_host
    }
}

/// Counts the hand-off bytes of a pass.
#[derive(Debug, Default)]
pub struct HandoffCounter {
    to_device: AtomicU64,
    to_host: AtomicU64,
}

impl HandoffCounter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn copied_to_device(&self, bytes: u64) {
        self.to_device.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn copied_to_host(&self, bytes: u64) {
        self.to_host.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn transfers(&self) -> Transfers {
        Transfers {
            host_to_device: self.to_device.load(Ordering::Relaxed),
            device_to_host: self.to_host.load(Ordering::Relaxed),
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// One host thread running queued work in order.
pub struct HostWorker {
    queue: Mutex<mpsc::Sender<Job>>,
}

impl HostWorker {
    pub fn new(name: &str) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // Runs jobs in order until the worker is dropped.
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(HostWorker {
            queue: Mutex::new(tx),
        })
    }

    /// Queues `f` and returns a handle to its result at once.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
        let (tx, rx) = mpsc::channel();
        if let Ok(q) = self.queue.lock() {
            // The thread lives as long as the worker; a failed send means it is gone, and
            // the handle reports that.
            let _ = q.send(Box::new(move || {
                let _ = tx.send(f());
            }));
        }
        Pending { rx }
    }
}

/// The result of queued work, there once the queue reaches it.
pub struct Pending<T> {
    rx: mpsc::Receiver<T>,
}

impl<T> Pending<T> {
    /// A result that is already there.
    pub fn ready(value: T) -> Self {
        let (tx, rx) = mpsc::channel();
        let _ = tx.send(value);
        Pending { rx }
    }

    /// Waits for the work to finish. `None` if the worker dropped it.
    pub fn wait(self) -> Option<T> {
        self.rx.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_in_order_and_bytes_are_counted() {
        let w = HostWorker::new("test-worker").expect("worker");
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let handles: Vec<_> = (0..5)
            .map(|i| {
                let o = order.clone();
                w.run(move || {
                    if let Ok(mut o) = o.lock() {
                        o.push(i);
                    }
                    i * 2
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().filter_map(|h| h.wait()).collect();
        assert_eq!(results, vec![0, 2, 4, 6, 8]);
        assert_eq!(*order.lock().expect("lock"), vec![0, 1, 2, 3, 4]);
        assert_eq!(Pending::ready(3).wait(), Some(3));
        let c = HandoffCounter::new();
        c.copied_to_device(7);
        c.copied_to_host(5);
        assert_eq!(c.transfers().total(), 12);
    }
}
