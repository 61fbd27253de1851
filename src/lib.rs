//! lockstep: a staged rollout controller that locks IAM users to trusted networks.
//!
//! The library holds the functional core (configuration, the perimeter rule, evidence
//! aggregation, the planner and the guard) and the edges behind small traits (AWS, the store,
//! the clock). The `lockstep` binary is the imperative shell around it.

pub mod config;
pub mod evidence;
pub mod perimeter;
pub mod trail;
