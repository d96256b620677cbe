//! grainfs: a FUSE overlay for a directory of file-backed volumes.
//!
//! Layers run one way, top to bottom, as docs/architecture.md lists them (checked by
//! tests/layers.rs). Only `fuse/` touches fuser; everything else is testable on a temp dir
//! without a mount.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod fs;
pub mod fuse;
pub mod ids;
pub mod policy;
pub mod schedule;
pub mod snapshot;
pub mod store;
pub mod sys;
pub mod track;
