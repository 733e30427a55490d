//! Sources say where workers may live. Each publishes complete snapshots of its targets; the
//! pipeline diffs snapshots, so a source never has to compute changes itself.

pub mod file;
pub mod kubernetes;

use crate::model::Target;
use std::sync::Arc;

/// A complete set of targets from one source at one moment.
pub type TargetSnapshot = Arc<Vec<Target>>;
