//! The accelerator interface the hybrid runtime computes through, and a simulated
//! accelerator that implements it on the CPU.
//!
//! An accelerator has a memory budget (everything placed on it is reserved against it;
//! going over is an error naming what did not fit), an in-order asynchronous queue (work
//! is enqueued and runs while the host does other things; the host waits on a handle
//! when it needs a result), and counts the bytes that cross between host and device.
//! The simulated one runs queued work on its own thread with the CPU kernels, so the
//! hybrid schedule (what runs where, what crosses, what overlaps) is exercised and
//! checked on machines without a GPU.

pub mod cuda;
pub mod hybrid;
pub mod sim;

use std::sync::mpsc;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccelError {
    #[error("{device}: {what} needs {needed} bytes but only {free} of {budget} are free")]
    OutOfMemory {
        device: String,
        what: String,
        needed: u64,
        free: u64,
        budget: u64,
    },
}

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

pub type Job = Box<dyn FnOnce() + Send>;

pub trait Accelerator: Send + Sync {
    fn name(&self) -> &str;
    fn budget_bytes(&self) -> u64;
    fn used_bytes(&self) -> u64;
    /// Reserves device memory for `what`.
    fn reserve(&self, what: &str, bytes: u64) -> Result<(), AccelError>;
    /// Appends work to the device's in-order queue; returns at once.
    fn enqueue(&self, job: Job);
    /// Records a copy from host to device.
    fn copy_to_device(&self, bytes: u64);
    /// Records a copy from device to host.
    fn copy_to_host(&self, bytes: u64);
    fn transfers(&self) -> Transfers;
}

/// The result of queued work, available once the queue reaches it.
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

    /// Waits for the work to finish. `None` if the device dropped it.
    pub fn wait(self) -> Option<T> {
        self.rx.recv().ok()
    }
}

/// Enqueues `f` and returns a handle to its result.
pub fn launch<T: Send + 'static>(
    device: &dyn Accelerator,
    f: impl FnOnce() -> T + Send + 'static,
) -> Pending<T> {
    let (tx, rx) = mpsc::channel();
    device.enqueue(Box::new(move || {
        let _ = tx.send(f());
    }));
    Pending { rx }
}
