//! CUDA graphs for the resident pass's decode steps (see [`DeviceOps::replay`]): each
//! piece of recordable work (one decoder layer's attention block, on a decode step's
//! fixed buffers) runs as it is the first time its key comes, is recorded the second
//! time (its kernels and its temporaries' graph allocations) and from then on is one
//! graph launch instead of a dozen kernel launches.
//!
//! A key names its fixed buffers and the generation of the latent pools, so a recording
//! is only replayed on the buffers it was made on. Work that cannot be recorded (it
//! uploads or waits for the device; the driver refuses and the capture is spoilt) runs as
//! it is, then and every later time, with a warning.

use super::CudaBackend;
use crate::device::{DeviceResult, ReplayKey, Work};
use kernels_cuda::graph::Recording;
use kernels_cuda::CudaError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Sets of fixed buffers whose recordings are kept (least recently used dropped first);
/// the pass keeps as many sets.
const MAX_IOS: usize = 8;

/// Where one piece of work stands.
enum Step {
    /// Ran once as it is (weights and absorbed copies it reads are on the device now).
    Warm,
    Recorded(Recording),
    /// Recording it failed: it runs as it is.
    Unrecordable,
}

struct IoRecordings {
    generation: u64,
    last_use: u64,
    steps: HashMap<usize, Step>,
}

/// The backend's recordings and what they have done.
pub(super) struct Recordings {
    enabled: AtomicBool,
    ios: Mutex<(u64, HashMap<u64, IoRecordings>)>,
    recorded: AtomicU64,
    replayed: AtomicU64,
    warned: AtomicBool,
}

impl Default for Recordings {
    fn default() -> Self {
        Recordings {
            enabled: AtomicBool::new(true),
            ios: Mutex::new((0, HashMap::new())),
            recorded: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        }
    }
}

/// How many pieces of work were recorded as CUDA graphs, and how many graph launches ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    pub recorded: u64,
    pub replayed: u64,
}

impl CudaBackend {
    /// Turns the recording of decode steps as CUDA graphs on (the default) or off (every
    /// kernel launched one by one, as `--enforce-eager` asks).
    pub fn set_recording(&self, on: bool) {
        self.recordings.enabled.store(on, Ordering::Relaxed);
    }

    pub(super) fn records_decode(&self) -> bool {
        self.recordings.enabled.load(Ordering::Relaxed)
    }

    pub fn graph_stats(&self) -> GraphStats {
        GraphStats {
            recorded: self.recordings.recorded.load(Ordering::Relaxed),
            replayed: self.recordings.replayed.load(Ordering::Relaxed),
        }
    }

    /// [`DeviceOps::replay`](crate::device::DeviceOps::replay) on this GPU.
    pub(super) fn replay_work(&self, key: ReplayKey, work: &mut Work) -> DeviceResult<()> {
        if !self.records_decode() {
            return work();
        }
        let mut guard = self
            .recordings
            .ios
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (uses, ios) = &mut *guard;
        *uses += 1;
        if !ios.contains_key(&key.io) && ios.len() >= MAX_IOS {
            let oldest = ios
                .iter()
                .min_by_key(|(_, io)| io.last_use)
                .map(|(&id, _)| id);
            if let Some(id) = oldest {
                ios.remove(&id);
            }
        }
        let io = ios.entry(key.io).or_insert_with(|| IoRecordings {
            generation: key.generation,
            last_use: 0,
            steps: HashMap::new(),
        });
        io.last_use = *uses;
        if io.generation != key.generation {
            // The pools moved: every recording on these buffers writes the old ones.
            io.steps.clear();
            io.generation = key.generation;
        }
        match io.steps.get(&key.step) {
            None => {
                io.steps.insert(key.step, Step::Warm);
                work()?;
            }
            Some(Step::Unrecordable) => work()?,
            Some(Step::Recorded(r)) => {
                self.check("replaying a decode step's CUDA graph", self.gpu.replay(r))?;
                self.recordings.replayed.fetch_add(1, Ordering::Relaxed);
            }
            Some(Step::Warm) => {
                let step = match self.record(work) {
                    Ok(r) => {
                        self.check("replaying a decode step's CUDA graph", self.gpu.replay(&r))?;
                        self.recordings.recorded.fetch_add(1, Ordering::Relaxed);
                        self.recordings.replayed.fetch_add(1, Ordering::Relaxed);
                        Step::Recorded(r)
                    }
                    Err(why) => {
                        if !self.recordings.warned.swap(true, Ordering::Relaxed) {
                            eprintln!(
                                "warning: a decode step could not be recorded as a CUDA graph \
                                 and runs kernel by kernel: {why}"
                            );
                        }
                        work()?;
                        Step::Unrecordable
                    }
                };
                io.steps.insert(key.step, step);
            }
        }
        Ok(())
    }

    /// Records `work` (queues nothing: the recording is what runs it). A failure inside
    /// it ends the capture and is returned.
    fn record(&self, work: &mut Work) -> Result<Recording, CudaError> {
        let g = &self.gpu;
        g.begin_recording()?;
        let ran = work();
        let recording = g.end_recording();
        match (ran, recording) {
            (Ok(()), Ok(r)) => Ok(r),
            (Ok(()), Err(e)) => Err(e),
            (Err(e), _) => Err(CudaError::Failed(e.to_string())),
        }
    }
}
