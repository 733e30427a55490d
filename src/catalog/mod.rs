//! The pure core: the desired catalog built from live endpoints, and the plan that turns the
//! current catalog into it.

pub mod plan;
