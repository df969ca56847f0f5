//! nassync: a local, cached view of a NAS share over FUSE.
//!
//! Layers, from the kernel down (docs/ARCHITECTURE.md):
//! [`fuse`] (thin adapter) -> [`fs`] (core: inodes, handles, metadata
//! cache) -> [`data`] (block caches, readahead) -> [`backend`] (the NAS).

pub mod backend;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod control;
pub mod data;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod killpriv;
pub mod mount;
pub mod mountinfo;
pub mod options;
mod parallel;
pub mod pin;
pub mod stats;
pub mod utab;
pub mod writeback;
