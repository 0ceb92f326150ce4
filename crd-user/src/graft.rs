//! Graft: hand the live open files of a process (tree) to new stubs — the very same
//! descriptions, pulled with `pidfd_getfd` while the originals are frozen, so peers
//! outside stay connected and offsets stay shared. A seamless hand-over of fds to a new
//! program (`--exec`).
//!
//! It shares the stub machinery with restore ([`crate::restore::run`]); only where the
//! descriptions come from differs: taken from the live process, never made, so every
//! kind can be grafted, even those an image cannot recreate.
use std::os::fd::{AsRawFd, RawFd};

use crate::{
    checkpoint::{CheckpointError, FrozenHarvest, Options, freeze_and_harvest},
    graph::{Encounter, Graph, SavedStates},
    restore::{
        self, ExecRequest, RestoreError, Restored,
        exec::Exec,
        objects::{ObjectError, ObjectTable},
        plan::{self, Mode},
    },
    sys,
    types::ObjRef,
};

/// Why a graft failed: freezing and harvesting the live process, or making the stubs.
#[derive(Debug, thiserror::Error)]
pub enum GraftError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
}

/// Hands the live open files of `options.root` (and with `options.tree` its
/// descendants) to new stubs.
pub fn graft(
    options: Options,
    exec: Option<ExecRequest<'_>>,
    interrupted: &dyn Fn() -> bool,
) -> Result<Restored, GraftError> {
    let exec = Exec::new(exec)?;
    let root = options.root;
    let FrozenHarvest { frozen, harvest, .. } = freeze_and_harvest(options, interrupted)?;
    let graph = Graph::build(root, &harvest, SavedStates::default());
    let plan = plan::plan(&graph, Mode::Graft).map_err(RestoreError::from)?;
    // A graft takes the live descriptions (a pidfd keeps referring to its process):
    // nothing is opened on a stub.
    let take = |publish: &mut dyn FnMut(ObjRef, RawFd), _stubs: crate::kinds::Stubs<'_>| {
        let objects = take_live(&graph, &frozen, publish)?;
        frozen.thaw();
        Ok(objects)
    };
    let mut restored = restore::run(&plan, take, exec.as_ref(), interrupted)?;
    // Old TIDs of a graft are the live originals.
    restored.tasks =
        graph.tasks.iter().map(|t| t.pid).zip(restored.tasks.iter().map(|(_, new)| *new)).collect();
    Ok(restored)
}

/// Takes every description of a live, frozen process tree: the very same objects,
/// published as soon as each is held.
fn take_live(
    graph: &Graph,
    frozen: &crate::freeze::Frozen,
    publish: &mut dyn FnMut(ObjRef, RawFd),
) -> Result<ObjectTable, ObjectError> {
    let mut table = ObjectTable::default();
    for (task, slot) in graph.slots() {
        let Encounter::First { objref, .. } = &slot.file else { continue };
        let pidfd = frozen.pidfd(task.tgid).ok_or(ObjectError::Inconsistent {
            tgid: task.tgid,
            fd: slot.fd,
            objref: *objref,
        })?;
        let fd = sys::pidfd_getfd(pidfd, slot.fd).map_err(|source| ObjectError::Take {
            tgid: task.tgid,
            fd: slot.fd,
            source,
        })?;
        publish(*objref, fd.as_raw_fd());
        table.insert(*objref, fd);
    }
    Ok(table)
}
