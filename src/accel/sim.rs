//! A simulated accelerator: a memory budget, an in-order queue run by one worker thread,
//! and transfer counters. A real GPU uses the same queue and accounting (see
//! [`super::cuda`]); only the work enqueued on it differs.

use super::{AccelError, Accelerator, Job, Transfers};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

pub struct SimDevice {
    name: String,
    budget: u64,
    used: AtomicU64,
    h2d: AtomicU64,
    d2h: AtomicU64,
    queue: Mutex<mpsc::Sender<Job>>,
}

impl SimDevice {
    pub fn new(name: &str, budget_bytes: u64) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("{name}-queue"))
            .spawn(move || {
                // Runs jobs in order until the device is dropped.
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(SimDevice {
            name: name.to_string(),
            budget: budget_bytes,
            used: AtomicU64::new(0),
            h2d: AtomicU64::new(0),
            d2h: AtomicU64::new(0),
            queue: Mutex::new(tx),
        })
    }
}

impl Accelerator for SimDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn budget_bytes(&self) -> u64 {
        self.budget
    }

    fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    fn reserve(&self, what: &str, bytes: u64) -> Result<(), AccelError> {
        let mut current = self.used.load(Ordering::SeqCst);
        loop {
            let free = self.budget.saturating_sub(current);
            if bytes > free {
                return Err(AccelError::OutOfMemory {
                    device: self.name.clone(),
                    what: what.to_string(),
                    needed: bytes,
                    free,
                    budget: self.budget,
                });
            }
            match self.used.compare_exchange(
                current,
                current + bytes,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => current = now,
            }
        }
    }

    fn enqueue(&self, job: Job) {
        if let Ok(q) = self.queue.lock() {
            // The worker lives as long as the device; a failed send means it is gone and
            // the job's result handle reports that.
            let _ = q.send(job);
        }
    }

    fn copy_to_device(&self, bytes: u64) {
        self.h2d.fetch_add(bytes, Ordering::Relaxed);
    }

    fn copy_to_host(&self, bytes: u64) {
        self.d2h.fetch_add(bytes, Ordering::Relaxed);
    }

    fn transfers(&self) -> Transfers {
        Transfers {
            host_to_device: self.h2d.load(Ordering::Relaxed),
            device_to_host: self.d2h.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::launch;
    use super::*;

    #[test]
    fn budget_queue_order_and_counters() {
        let d = SimDevice::new("sim0", 100).expect("device");
        assert!(d.reserve("a", 60).is_ok());
        let err = d.reserve("b", 50).expect_err("over budget");
        assert!(err
            .to_string()
            .contains("b needs 50 bytes but only 40 of 100 are free"));
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let handles: Vec<_> = (0..5)
            .map(|i| {
                let o = order.clone();
                launch(&d, move || {
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
        d.copy_to_device(7);
        d.copy_to_host(5);
        assert_eq!(d.transfers().total(), 12);
    }
}
