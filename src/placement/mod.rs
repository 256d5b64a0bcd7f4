//! Placement: which device holds every tensor and every (layer, expert).
//!
//! `plan(model, profile, workload, stats) -> Plan` is a pure function; the runtime obeys
//! the plan and never decides placement itself. The plan's JSON form (`plan --json`,
//! schema `kimi-hybrid-plan/1`) is what `serve --plan` loads: see `report.rs` for the
//! field list.

pub mod detect;
pub mod model_desc;
pub mod planner;
pub mod profile;
pub mod report;
pub mod stats;

pub use model_desc::ModelDesc;
pub use planner::{plan, Holding, Item, Plan, PlanLayout};
pub use profile::{Profile, Workload};
pub use stats::ExpertStats;
