//! The pure core: the desired catalog built from targets and their live ports (`desired`),
//! and the plan that turns the current catalog into it without touching what workersd does
//! not own (`plan`).

pub mod desired;
pub mod plan;

pub use desired::{
    DesiredCatalog, DesiredRx, DesiredState, desired_catalog, desired_channel, instance_id,
};
pub use plan::{Op, Plan, apply, is_owned_by, plan, row_key};
