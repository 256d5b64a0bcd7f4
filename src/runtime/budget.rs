//! A device's memory budget: what a plan puts on a GPU is reserved against the memory it
//! has before anything is uploaded, so a plan that does not fit is refused at start with
//! the item that did not fit, not mid-request.

use crate::model::{Ffn, Model};
use crate::placement::{Holding, Plan};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    #[error("{device}: {what} needs {needed} bytes but only {free} of {budget} are free")]
    OutOfMemory {
        device: String,
        what: String,
        needed: u64,
        free: u64,
        budget: u64,
    },
}

/// The bytes reserved on one device against its budget.
pub struct DeviceBudget {
    name: String,
    budget: u64,
    used: AtomicU64,
}

impl DeviceBudget {
    pub fn new(name: &str, budget_bytes: u64) -> Self {
        DeviceBudget {
            name: name.to_string(),
            budget: budget_bytes,
            used: AtomicU64::new(0),
        }
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Reserves `bytes` for `what`; an error names it when they do not fit.
    pub fn reserve(&self, what: &str, bytes: u64) -> Result<(), BudgetError> {
        let mut current = self.used.load(Ordering::SeqCst);
        loop {
            let free = self.budget.saturating_sub(current);
            if bytes > free {
                return Err(BudgetError::OutOfMemory {
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
}

/// Reserves on `device` what a one-GPU hybrid plan puts on its GPU: the plan's items for
/// GPU 0 other than routed experts (weights and KV cache, as the plan sized them), then
/// the routed experts `model.apply_plan` marked for a GPU, at their stored size.
pub fn reserve_hybrid_share(
    model: &Model,
    plan: &Plan,
    device: &DeviceBudget,
) -> Result<(), BudgetError> {
    if let Some(gpu) = plan.gpus.first() {
        for item in gpu
            .holds
            .iter()
            .filter(|i| i.kind != Holding::RoutedExperts)
        {
            device.reserve(&item.describe(), item.bytes)?;
        }
    }
    let expert_bytes: u64 = model
        .layers
        .iter()
        .filter_map(|l| match &l.ffn {
            Ffn::Moe(moe) => Some(moe.experts.iter()),
            Ffn::Dense(_) => None,
        })
        .flatten()
        .filter(|e| e.gpu.is_some())
        .map(|e| e.stored_bytes() as u64)
        .sum();
    device.reserve("routed experts placed on the device", expert_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_the_budget_naming_what_did_not_fit() {
        let d = DeviceBudget::new("gpu0", 100);
        assert!(d.reserve("a", 60).is_ok());
        let err = d.reserve("b", 50).expect_err("over budget");
        assert!(err
            .to_string()
            .contains("gpu0: b needs 50 bytes but only 40 of 100 are free"));
        assert_eq!((d.used_bytes(), d.budget_bytes()), (60, 100));
    }
}
