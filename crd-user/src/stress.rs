//! `crd stress` (hidden, for the load test): many checkpoint → encode → decode →
//! restore → kill cycles in one process, with the BPF harvester loaded once, sampling
//! crd's own fd count and RSS after every cycle so a leak shows as growth.
use std::{fs, os::fd::AsFd, path::Path, time::Instant};

use nix::sys::{
    signal::{Signal, kill},
    wait::{WaitPidFlag, waitpid},
};
use serde::Serialize;

use crate::{
    checkpoint::{CheckpointError, Options, checkpoint_with},
    harvest::{self, LoadOptions, Source},
    image::{self, ImageError},
    restore::{self, RestoreError},
    sys,
    types::{Pid, Tgid},
};

#[derive(Debug, thiserror::Error)]
pub enum StressError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cycle {cycle}: the restored tree differs from the image: {difference}")]
    Differs { cycle: usize, difference: String },
    #[error("cycle {cycle}: stub {pid} did not die")]
    Lingering { cycle: usize, pid: Pid },
    #[error("interrupted after {cycles} cycles; every stub was killed")]
    Interrupted { cycles: usize, source: crate::interrupt::Interrupted },
}

/// crd's own resources after one cycle.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub cycle: usize,
    /// Entries in /proc/self/fd.
    pub fds: usize,
    /// Resident set size, KiB (/proc/self/statm).
    pub rss_kib: u64,
}

/// What `crd stress` prints (as JSON).
#[derive(Debug, Serialize)]
pub struct Report {
    pub cycles: usize,
    /// Tasks and fds in each image.
    pub tasks: usize,
    pub fds: usize,
    pub image_bytes: usize,
    pub elapsed_ms: u128,
    pub samples: Vec<Sample>,
    /// The BPF objects crd held at the end (so a test can check they go with it).
    pub bpf: BpfIds,
}

/// IDs of the BPF objects behind crd's own fds (from /proc/self/fdinfo).
#[derive(Debug, Default, Serialize)]
pub struct BpfIds {
    pub progs: Vec<u64>,
    pub maps: Vec<u64>,
    pub links: Vec<u64>,
}

impl BpfIds {
    fn of_this_process() -> Self {
        let mut ids = BpfIds::default();
        let Ok(dir) = fs::read_dir("/proc/self/fdinfo") else { return ids };
        for entry in dir.flatten() {
            let Ok(info) = fs::read_to_string(entry.path()) else { continue };
            for line in info.lines() {
                let (key, value) = line.split_once(':').unwrap_or_default();
                let Ok(id) = value.trim().parse() else { continue };
                match key {
                    "prog_id" => ids.progs.push(id),
                    "map_id" => ids.maps.push(id),
                    "link_id" => ids.links.push(id),
                    _ => {}
                }
            }
        }
        for list in [&mut ids.progs, &mut ids.maps, &mut ids.links] {
            list.sort_unstable();
            list.dedup();
        }
        ids
    }
}

/// How often the restored tree is checked against the image (a second checkpoint).
const VERIFY_EVERY: usize = 100;

/// Runs `cycles` cycles on `root` (with `tree`, its descendants too); `btf`: see
/// [`crate::harvest::LoadOptions`].
pub fn run(
    root: Tgid,
    tree: bool,
    cycles: usize,
    btf: Option<&Path>,
    interrupted: &dyn Fn() -> bool,
) -> Result<Report, StressError> {
    let started = Instant::now();
    let load = LoadOptions { btf: btf.map(Path::to_path_buf) };
    let mut harvester = harvest::harvester(Source::Bpf, false, &load).map_err(CheckpointError::from)?;
    let options = Options { load: load.clone(), ..Options::new(root, tree, Source::Bpf) };
    let mut report = Report {
        cycles,
        tasks: 0,
        fds: 0,
        image_bytes: 0,
        elapsed_ms: 0,
        samples: Vec::new(),
        bpf: BpfIds::default(),
    };
    for cycle in 0..cycles {
        if interrupted() {
            return Err(StressError::Interrupted { cycles: cycle, source: crate::interrupt::Interrupted });
        }
        let done = checkpoint_with(options.clone(), Some(harvester.as_mut()), None, interrupted)?;
        let bytes = image::encode(&done.body)?;
        let body = image::decode(&bytes, "(in memory)")?;
        let restored = restore::restore_image(&body.graph, false, None, interrupted)?;
        let verdict = if cycle % VERIFY_EVERY == 0 || cycle + 1 == cycles {
            let stubs =
                Options { load: load.clone(), ..Options::new(Tgid(restored.root.0), true, Source::Bpf) };
            checkpoint_with(stubs, Some(harvester.as_mut()), None, interrupted)
                .map_err(StressError::from)
                .and_then(|again| {
                    body.graph.same_shape(&again.body.graph).map_err(|difference| StressError::Differs {
                        cycle,
                        difference: difference.to_string(),
                    })
                })
        } else {
            Ok(())
        };
        kill_stubs(&restored, cycle)?;
        verdict?;
        report.tasks = body.graph.tasks.len();
        report.fds = body.graph.slots().count();
        report.image_bytes = bytes.len();
        report.samples.push(Sample { cycle, fds: own_fds(), rss_kib: own_rss_kib() });
    }
    report.elapsed_ms = started.elapsed().as_millis();
    report.bpf = BpfIds::of_this_process();
    Ok(report)
}

/// Kills every stub and waits until each is gone (the root is crd's child: reaped here).
fn kill_stubs(restored: &restore::Restored, cycle: usize) -> Result<(), StressError> {
    let pidfds: Vec<_> =
        restored.tasks.iter().filter_map(|(_, new)| Some((*new, sys::pidfd_open(*new).ok()?))).collect();
    for (_, new) in &restored.tasks {
        let _ = kill(nix::unistd::Pid::from_raw(new.0 as i32), Signal::SIGKILL);
    }
    let _ = waitpid(nix::unistd::Pid::from_raw(restored.root.0 as i32), Some(WaitPidFlag::__WALL));
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    for (pid, pidfd) in &pidfds {
        while !sys::pidfd_exited(pidfd.as_fd()) {
            if Instant::now() > deadline {
                return Err(StressError::Lingering { cycle, pid: *pid });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    Ok(())
}

fn own_fds() -> usize {
    fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn own_rss_kib() -> u64 {
    let pages = fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    pages * page / 1024
}
