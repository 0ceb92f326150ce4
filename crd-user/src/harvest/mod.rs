//! Harvest: kernel → typed records ([`crate::model`]).
//!
//! Two harvesters produce the same [`Harvest`], behind one [`Harvester`] trait chosen in
//! one place ([`harvester`]): [`bpf`] reads each fd table straight from the kernel with
//! BPF iterators; [`procfs`] walks `/proc` (and asks sock_diag about sockets: [`sockets`])
//! and is both the fallback where BPF iterators are unavailable and the oracle the tests
//! compare BPF against. [`extras`] adds, while
//! the targets are still frozen, what neither reads cheaply: paths, and each object's
//! contents (through its kind's `save`).
pub mod bpf;
mod btf_names;
pub mod extras;
pub mod offsets;
pub mod procfs;
pub mod sockets;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::model::{FdInfo, FileInfo, Harvest, ObjectInfo, TaskInfo};
use crate::types::Tgid;

/// Where the records come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// BPF task/task_file iterators.
    Bpf,
    /// /proc/PID/{fd,fdinfo,task} and kcmp(2): slower, needs no BPF.
    Procfs,
    /// BPF, or /proc (with a warning saying why) where this kernel cannot run crd's BPF
    /// programs: no BTF, a missing field or iterator, a verifier that refuses them.
    Auto,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Bpf => "bpf",
            Source::Procfs => "procfs",
            Source::Auto => "auto",
        })
    }
}

/// How to load the BPF harvester.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The kernel BTF to use instead of /sys/kernel/btf/vmlinux (`--btf`).
    pub btf: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum HarvestError {
    #[error(transparent)]
    Bpf(#[from] bpf::BpfError),
    #[error(transparent)]
    Procfs(#[from] procfs::ProcfsError),
    #[error("interrupted")]
    Interrupted(#[source] crate::interrupt::Interrupted),
}

/// What to harvest.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// These processes only.
    Processes(&'a [Tgid]),
    /// Every process crd may inspect ([`all_processes`]).
    All,
}

/// Counters a harvest leaves behind, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HarvestStats {
    pub records: u64,
    /// Times the ring filled and the iteration was paused to drain it.
    pub ring_full: u64,
    /// `read()` calls on the iterators.
    pub reads: u64,
    /// Time inside those calls: the kernel running the iterators and crd's programs
    /// (the rest of a harvest is draining and decoding in userspace).
    pub kernel_time: std::time::Duration,
    /// Epolls whose interest list BPF walked (each item naming its file).
    pub epoll_walks: u64,
    /// Epolls whose walk could not be used (see [`crate::kinds::epoll::WalkEnd`]): their
    /// interest list was read from fdinfo.
    pub epoll_fallbacks: u64,
}

/// A loaded harvester; one load serves many harvests.
pub trait Harvester {
    /// Which source this is (never `Auto`).
    fn source(&self) -> Source;
    /// Reads the fd state of `scope`. The targets are not frozen by this call.
    fn harvest(
        &mut self,
        scope: Scope<'_>,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<(Harvest, HarvestStats), HarvestError>;
}

/// The one place a harvester is chosen: `source`, with `Auto` falling back to /proc
/// (with a warning saying why) where this kernel cannot run crd's BPF programs.
/// `match_all`: the BPF programs report every task (for [`Scope::All`]).
pub fn harvester(
    source: Source,
    match_all: bool,
    options: &LoadOptions,
) -> Result<Box<dyn Harvester>, HarvestError> {
    match source {
        Source::Procfs => Ok(Box::new(procfs::ProcfsHarvester)),
        Source::Bpf => Ok(Box::new(bpf::BpfHarvester::load(match_all, options)?)),
        Source::Auto => match bpf::BpfHarvester::load(match_all, options) {
            Ok(harvester) => Ok(Box::new(harvester)),
            Err(e) if e.is_unsupported() => {
                log::warn!("the BPF harvester cannot run here ({e}); reading /proc instead");
                Ok(Box::new(procfs::ProcfsHarvester))
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// Every process crd may inspect, but crd itself.
///
/// The kernel lets a caller read a process's fd links only with ptrace read access
/// (PTRACE_MODE_READ); a process that refuses it (a protected init, another user's
/// process) is left out whatever the source, so that both sources list the same
/// processes. `/proc/PID/cwd` is behind the same check.
pub fn all_processes() -> Vec<Tgid> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut tgids: Vec<Tgid> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| pid != me && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok())
        .map(Tgid)
        .collect();
    tgids.sort_unstable();
    tgids
}
