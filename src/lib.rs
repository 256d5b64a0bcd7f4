//! kimi-hybrid: an inference runtime for the Kimi K2 / DeepSeek-V3 model family.
//!
//! Layers, from the bottom: `config` (what the checkpoint says), `weights` (mapped
//! tensors in their stored formats), `model` (the model as data and maths), `placement`
//! (the planner), `device` (what the pass needs from a device; the CPU device with its
//! kernel sets, and the CUDA devices), `forward` (the one forward pass over its devices),
//! `runtime` (a plan made into a running layout), `generate` (one sequence's decode
//! loop), `engine` (batching and the paged cache), `server` (the HTTP APIs), `inspect`
//! (what a checkpoint holds).

pub mod bench;
pub mod config;
pub mod demo;
pub mod device;
pub mod engine;
pub mod files;
pub mod forward;
pub mod generate;
pub mod inspect;
pub mod model;
pub mod placement;
pub mod runtime;
pub mod server;
pub mod tokenizer;
pub mod topology;
pub mod weights;
