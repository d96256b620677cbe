//! What the integration tests share, one file per kind of support: `cli` the binary as tests
//! run it (and the small snapshot geometry), `loopfs` a filesystem on a loop device (ext4, XFS with
//! reflink), `mount` the real-mount fixture, `overlay` the FUSE-free one (`OverlayFs` and `Tracker` on a temp dir), `noise` the
//! seeded generator of bytes and decisions, `posix` the mount-versus-plain-dir comparison and the
//! libc wrappers of the `posix_*` tests. Every test binary compiles all of it (`mod common;`),
//! so items one binary does not use are allowed to be dead there. Nothing here asserts a
//! property of grainfs by itself: the tests do.
#![allow(dead_code, unused_imports)]

pub mod cli;
pub mod loopfs;
pub mod mount;
pub mod noise;
pub mod overlay;
pub mod posix;

pub use cli::*;
pub use mount::*;
pub use noise::{Noise, Rng};
pub use overlay::{Overlay, ROOT, STORE};
