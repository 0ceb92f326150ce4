//! crd checkpoints the open-file state of Linux processes with BPF iterators.
//!
//! Data flows left to right, one module per step:
//!
//! ```text
//! freeze ─▶ harvest::{bpf, procfs} ─▶ harvest::extras ─▶ graph ─▶ image ─▶ inspect
//! ```
//!
//! - [`freeze`] stops the targets invisibly (PTRACE_SEIZE + INTERRUPT) and always
//!   resumes them.
//! - [`harvest`] turns kernel state into typed records: [`harvest::bpf`] with the
//!   `crd-ebpf` iterators, [`harvest::procfs`] from /proc as fallback and oracle.
//! - [`graph`] builds linux-cr's objref graph: shared objects saved once, then referenced.
//! - [`image`] is graph ⇄ bytes: versioned, checksummed, written atomically.
//! - [`checkpoint`] runs the whole pipeline.
//!
//! Test scaffolding (`fixture`, `stress`, `test_hooks` and the hooks' environment
//! variables) exists only with the `testing` feature: the product reads no test hook.
pub mod admission;
pub mod checkpoint;
pub mod commands;
pub mod demo;
pub mod error_text;
#[cfg(feature = "testing")]
pub mod fixture;
pub mod freeze;
pub mod graft;
pub mod graph;
pub mod harvest;
pub mod image;
pub mod inspect;
pub mod interrupt;
pub mod kinds;
pub mod ls;
pub mod model;
pub mod pretty_json;
pub mod privilege;
pub mod restore;
pub mod serve;
#[cfg(feature = "testing")]
pub mod stress;
pub mod sys;
#[cfg(feature = "testing")]
pub mod test_hooks;
pub mod timings;
pub mod types;

pub use checkpoint::{CheckpointError, Options, checkpoint, checkpoint_to_file};
pub use graph::Graph;
pub use harvest::Source;
pub use image::ImageBody;
pub use interrupt::Interrupted;
