//! Checkpoint: freeze → harvest → extras (each kind saves its objects) → graph → thaw →
//! image.
//!
//! The targets are frozen only for the harvest and the saving of contents; they are
//! resumed (by dropping [`Frozen`]) on every path out of [`checkpoint`]. When the image
//! streams contents from the targets' objects (a memfd's bytes are read while the image
//! is written, never held twice in memory), [`checkpoint_to_file`] keeps them frozen
//! until the image is written, so what it holds is one moment's state.
use std::path::Path;

use crate::{
    admission::Admission,
    freeze::{FreezeError, Frozen},
    graph::Graph,
    harvest::{
        self, Harvest, HarvestError, HarvestStats, Harvester, LoadOptions, Scope, Source,
        extras::{self, ExtrasError},
    },
    image::{self, Header, ImageBody, ImageError},
    interrupt::Interrupted,
    kinds::SaveOptions,
    timings::Phases,
    types::Tgid,
};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(transparent)]
    Harvest(HarvestError),
    #[error(transparent)]
    Extras(#[from] ExtrasError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("interrupted; the target was resumed and no image was written")]
    Interrupted(#[source] Interrupted),
    #[error(
        "{0} (--strict: no image was written; without --strict the image lists them and restore refuses them)"
    )]
    Strict(String),
}

impl From<HarvestError> for CheckpointError {
    fn from(e: HarvestError) -> Self {
        match e {
            HarvestError::Interrupted(i) => CheckpointError::Interrupted(i),
            e => CheckpointError::Harvest(e),
        }
    }
}

/// What to checkpoint.
#[derive(Clone, Debug)]
pub struct Options {
    pub root: Tgid,
    /// Include all descendants.
    pub tree: bool,
    pub source: Source,
    /// How to load the BPF harvester.
    pub load: LoadOptions,
    /// Refuse to write an image that restore could not recreate in full (an fd of a
    /// kind crd does not make: a netlink socket, an epoll...), naming every such fd.
    pub strict: bool,
    /// What to save beyond what every checkpoint saves (`--tcp-established`).
    pub save: SaveOptions,
    /// Which processes may be frozen: the kernel's rule when crd runs as the user who
    /// asked, the client's when the service runs it ([`crate::admission`]).
    pub admission: Admission,
}

impl Options {
    pub fn new(root: Tgid, tree: bool, source: Source) -> Self {
        Self {
            root,
            tree,
            source,
            load: LoadOptions::default(),
            save: SaveOptions::default(),
            strict: false,
            admission: Admission::Kernel,
        }
    }
}

/// A finished checkpoint.
pub struct Checkpoint {
    pub body: ImageBody,
    /// BPF harvest counters (zero for procfs).
    pub stats: HarvestStats,
    /// Time per phase: load, freeze, harvest, extras, graph, thaw (and write).
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
    options: Options,
    interrupted: &dyn Fn() -> bool,
) -> Result<FrozenHarvest, CheckpointError> {
    freeze_and_harvest_with(options, None, interrupted)
}

/// As [`freeze_and_harvest`], with `loaded`, if given, as the harvester: one load
/// serves many checkpoints.
pub fn freeze_and_harvest_with(
    options: Options,
    loaded: Option<&mut dyn Harvester>,
    interrupted: &dyn Fn() -> bool,
) -> Result<FrozenHarvest, CheckpointError> {
    let mut phases = Phases::start();
    // Load BPF before freezing: the targets stay frozen for as short as possible.
    let mut owned: Option<Box<dyn Harvester>> = None;
    let harvester: &mut dyn Harvester = match loaded {
        Some(h) => h,
        None => owned.insert(harvest::harvester(options.source, false, &options.load)?).as_mut(),
    };
    phases.lap("load");
    if interrupted() {
        return Err(CheckpointError::Interrupted(Interrupted));
    }
    let frozen = Frozen::freeze_admitting(options.root, options.tree, &options.admission, interrupted)
        .map_err(|e| match e {
            FreezeError::Interrupted(i) => CheckpointError::Interrupted(i),
            e => e.into(),
        })?;
    phases.lap("freeze");
    let tgids: Vec<Tgid> = frozen.processes().collect();
    let (harvest, stats) = harvester.harvest(Scope::Processes(&tgids), interrupted)?;
    phases.lap("harvest");
    Ok(FrozenHarvest { frozen, harvest, stats, source: harvester.source(), phases })
}

/// Checkpoints `options.root` into an image body, leaving the targets running.
/// `interrupted` is polled between steps (Ctrl-C).
pub fn checkpoint(options: Options, interrupted: &dyn Fn() -> bool) -> Result<Checkpoint, CheckpointError> {
    checkpoint_with(options, None, None, interrupted)
}

/// Where a checkpoint's image goes.
///
/// A path is written by [`image::write`]; the service wraps that write so it is made
/// with its client's file-system identity (`crate::serve`).
pub trait ImageSink {
    fn write(&self, body: &ImageBody) -> Result<(), ImageError>;
}

impl ImageSink for &Path {
    fn write(&self, body: &ImageBody) -> Result<(), ImageError> {
        image::write(self, body)
    }
}

/// As [`checkpoint`], with `loaded`, if given, as the harvester, and the image written
/// to `output` (if given) before the targets are resumed when it streams their contents.
pub fn checkpoint_with(
    options: Options,
    loaded: Option<&mut dyn Harvester>,
    output: Option<&dyn ImageSink>,
    interrupted: &dyn Fn() -> bool,
) -> Result<Checkpoint, CheckpointError> {
    let check = || {
        if interrupted() { Err(CheckpointError::Interrupted(Interrupted)) } else { Ok(()) }
    };
    let (tree, save, strict) = (options.tree, options.save, options.strict);
    let FrozenHarvest { frozen, mut harvest, stats, source, mut phases } =
        freeze_and_harvest_with(options, loaded, interrupted)?;
    check()?;
    let extras = extras::collect(&mut harvest, &frozen, save)?;
    phases.lap("extras");
    hold_for_tests(interrupted)?;
    check()?;
    let root = frozen.root();
    let graph = Graph::build(root, &harvest, extras.saved);
    phases.lap("graph");
    if strict && let Some(line) = unrestorable(&graph) {
        return Err(CheckpointError::Strict(line));
    }
    let body = ImageBody { header: Header::now(source.into(), tree), graph };
    let streams = body.graph.streams_contents();
    if let Some(output) = output
        && streams
    {
        output.write(&body)?;
        phases.lap("write");
    }
    frozen.thaw();
    phases.lap("thaw");
    if let Some(output) = output
        && !streams
    {
        check()?;
        output.write(&body)?;
        phases.lap("write");
    }
    Ok(Checkpoint { body, stats, phases })
}

/// Every fd whose object restore could not make, grouped by why, on one line (None:
/// the image would restore in full).
fn unrestorable(graph: &Graph) -> Option<String> {
    let index = graph.index();
    let mut refused: Vec<(String, Vec<String>)> = Vec::new();
    for (task, slot) in graph.slots() {
        let Some((_, objref, object)) = index.open(slot.file.objref()) else { continue };
        let Some(why) = object.state.refusal() else { continue };
        let at = format!("PID {} fd {} ({} {objref} {})", task.tgid, slot.fd, object.kind(), object.name());
        match refused.iter_mut().find(|(reason, _)| *reason == why) {
            Some((_, fds)) => fds.push(at),
            None => refused.push((why, vec![at])),
        }
    }
    if refused.is_empty() {
        return None;
    }
    let clauses: Vec<String> =
        refused.into_iter().map(|(why, fds)| format!("{}: {why}", fds.join(", "))).collect();
    Some(clauses.join("; "))
}

/// Checkpoints and writes the image atomically to `output`.
pub fn checkpoint_to_file(
    options: Options,
    output: &Path,
    interrupted: &dyn Fn() -> bool,
) -> Result<Checkpoint, CheckpointError> {
    checkpoint_with(options, None, Some(&output), interrupted)
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
