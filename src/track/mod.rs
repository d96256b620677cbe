//! Change tracking (in progress, issue 3): the building blocks of the per-volume change map.
//!
//! `bitmap` holds the dirty blocks of a volume, `counters` the per-partition write counters,
//! the access-pattern rule and the rate smoothing. Both are lock-free on the write path and
//! allocation-free except when a volume grows. They are not yet wired into the write path,
//! persisted, or published; see DESIGN.md "Write path" and "Tracking that survives a crash".

pub mod bitmap;
pub mod counters;
