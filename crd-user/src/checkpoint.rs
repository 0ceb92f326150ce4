//! Checkpoint: freeze → harvest → extras → thaw → graph → image.
//!
//! The targets are frozen only for the harvest and the pipe copies; they are resumed
//! (by dropping [`Frozen`]) before the graph is built and the image is written, on every
//! path out of [`checkpoint`].
use std::path::Path;

use crate::{
    Interrupted,
    freeze::{FreezeError, Frozen},
    graph::Graph,
    harvest::{
        Harvest, Source,
        bpf::{self, BpfError, BpfHarvester, HarvestStats, Scope},
        extras::{self, ExtrasError},
        procfs::{self, ProcfsError},
    },
    image::{self, Header, ImageBody, ImageError},
    privilege::{self, PrivilegeError},
    timings::Phases,
    types::Tgid,
};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Procfs(#[from] ProcfsError),
    #[error(transparent)]
    Extras(#[from] ExtrasError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error("interrupted; the target was resumed and no image was written")]
    Interrupted(#[source] Interrupted),
}

/// What to checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    pub root: Tgid,
    /// Include all descendants.
    pub tree: bool,
    pub source: Source,
    /// The kernel BTF file for the BPF harvester (`--btf`); None: the running kernel's.
    pub btf: Option<&'a Path>,
}

/// A finished checkpoint.
pub struct Checkpoint {
    pub body: ImageBody,
    /// BPF harvest counters (zero for procfs).
    pub stats: HarvestStats,
    /// Time per phase: load, freeze, harvest, extras, thaw, graph (and write).
    pub phases: Phases,
}

/// The targets, frozen, and what the harvester read from them.
pub struct FrozenHarvest {
    pub frozen: Frozen,
    pub harvest: Harvest,
    pub stats: HarvestStats,
    /// The source actually used (`auto` resolved).
    pub source: Source,
    pub phases: Phases,
}

/// Freezes `options.root` (and its tree) and harvests it. The targets stay frozen until
/// the returned [`Frozen`] is dropped or thawed. Shared by checkpoint and graft.
pub fn freeze_and_harvest(
    options: Options<'_>,
    interrupted: &dyn Fn() -> bool,
) -> Result<FrozenHarvest, CheckpointError> {
    freeze_and_harvest_with(options, None, interrupted)
}

/// As [`freeze_and_harvest`], with `loaded`, if given, as the (BPF) harvester: one load
/// serves many checkpoints (`crd stress`).
pub fn freeze_and_harvest_with(
    options: Options<'_>,
    loaded: Option<&mut BpfHarvester>,
    interrupted: &dyn Fn() -> bool,
) -> Result<FrozenHarvest, CheckpointError> {
    let mut phases = Phases::start();
    // Load BPF before freezing: the targets stay frozen for as short as possible.
    let (source, mut owned) = match loaded {
        Some(_) => (Source::Bpf, None),
        None => bpf::harvester_for(options.source, false, options.btf).map_err(privilege::explain_bpf)?,
    };
    let mut harvester = loaded.or(owned.as_mut());
    phases.lap("load");
    if interrupted() {
        return Err(CheckpointError::Interrupted(Interrupted));
    }
    let frozen = Frozen::freeze(options.root, options.tree, interrupted).map_err(|e| match e {
        FreezeError::Interrupted(i) => CheckpointError::Interrupted(i),
        e => e.into(),
    })?;
    phases.lap("freeze");
    let tgids: Vec<Tgid> = frozen.processes().collect();
    let (harvest, stats) = match harvester.as_mut() {
        Some(h) => h.harvest(Scope::Processes(&tgids), interrupted).map_err(|e| match e {
            BpfError::Interrupted(i) => CheckpointError::Interrupted(i),
            e => e.into(),
        })?,
        None => (procfs::harvest(&tgids)?, HarvestStats::default()),
    };
    phases.lap("harvest");
    Ok(FrozenHarvest { frozen, harvest, stats, source, phases })
}

/// Checkpoints `options.root` into an image body, leaving the targets running.
/// `interrupted` is polled between steps (Ctrl-C).
pub fn checkpoint(
    options: Options<'_>,
    interrupted: &dyn Fn() -> bool,
) -> Result<Checkpoint, CheckpointError> {
    checkpoint_with(options, None, interrupted)
}

/// As [`checkpoint`], with `loaded`, if given, as the (BPF) harvester.
pub fn checkpoint_with(
    options: Options<'_>,
    loaded: Option<&mut BpfHarvester>,
    interrupted: &dyn Fn() -> bool,
) -> Result<Checkpoint, CheckpointError> {
    let check = || {
        if interrupted() { Err(CheckpointError::Interrupted(Interrupted)) } else { Ok(()) }
    };
    let FrozenHarvest { frozen, mut harvest, stats, source, mut phases } =
        freeze_and_harvest_with(options, loaded, interrupted)?;
    check()?;
    let extras = extras::collect(&mut harvest, &frozen)?;
    phases.lap("extras");
    hold_for_tests(interrupted)?;
    let root = frozen.root();
    frozen.thaw();
    phases.lap("thaw");
    check()?;
    let graph = Graph::build(root, &harvest, &extras);
    phases.lap("graph");
    Ok(Checkpoint { body: ImageBody { header: Header::now(source, options.tree), graph }, stats, phases })
}

/// Checkpoints and writes the image atomically to `output`.
pub fn checkpoint_to_file(
    options: Options<'_>,
    output: &Path,
    interrupted: &dyn Fn() -> bool,
) -> Result<Checkpoint, CheckpointError> {
    let mut done = checkpoint(options, interrupted)?;
    image::write(output, &done.body)?;
    done.phases.lap("write");
    Ok(done)
}

/// Test hook (testing builds only): `CRD_TEST_HOLD_FROZEN_MS=N` keeps the targets frozen
/// N ms after the harvest, so tests can interrupt or kill crd at the worst moment.
/// Ctrl-C still ends the wait.
#[cfg(feature = "testing")]
pub const HOLD_FROZEN_ENV: &str = "CRD_TEST_HOLD_FROZEN_MS";

fn hold_for_tests(interrupted: &dyn Fn() -> bool) -> Result<(), CheckpointError> {
    #[cfg(feature = "testing")]
    if !crate::test_hooks::hold(HOLD_FROZEN_ENV, interrupted) {
        return Err(CheckpointError::Interrupted(Interrupted));
    }
    #[cfg(not(feature = "testing"))]
    let _ = interrupted;
    Ok(())
}
