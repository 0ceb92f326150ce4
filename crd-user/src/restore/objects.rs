//! The objref table: every open file description the stubs will need, held by crd
//! until they have pulled their copies with `pidfd_getfd`.
//!
//! Built by walking the graph in order, the linux-cr restart logic literally: each
//! description's first encounter is made by its object's kind ([`Saved::open`]); the
//! first description of an object creates the object (a pipe with `pipe2`, its other end
//! deposited in the [`ObjectStore`] under the object's objref), later ones pick up what
//! was deposited or open another description of it. A later encounter of a description
//! (`CR_FD_OBJREF`) creates nothing: it refers to the entry made at its first encounter.
//! An object's record nests the objects it is tied to (a socket's peer, its listener)
//! and the files it carries (fds in flight): the kind's first encounter makes its tied
//! objects with it where it can (`socketpair`), depositing them; carried files are made
//! right after the object that carries them. Once every description exists, each
//! object is completed ([`Saved::complete`]): queues refilled with their files in
//! flight, then options and shutdowns.
//!
//! Whatever is still deposited when every description exists is closed, so no stray end
//! keeps a pipe open.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
};

use nix::fcntl::{self, FcntlArg, OFlag};

use crate::{
    graph::{Encounter, FileDesc, Graph, GraphIndex, Object},
    kinds::{Completion, Kind, KindError, ObjectStore, OpenArgs, Stage, Stubs, Tie, Tied},
    sys::SyscallError,
    types::{Fd, ObjRef, Tgid},
};

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("PID {tgid} fd {fd} ({kind} {objref}): {source}")]
    Make { tgid: Tgid, fd: Fd, kind: Kind, objref: ObjRef, source: KindError },
    #[error("PID {tgid} fd {fd}: {source}")]
    Take { tgid: Tgid, fd: Fd, source: SyscallError },
    #[error("PID {tgid} fd {fd}: the image refers to {objref} before saving it")]
    Inconsistent { tgid: Tgid, fd: Fd, objref: ObjRef },
    #[error("{kind} {objref}: {source}")]
    Complete { kind: Kind, objref: ObjRef, source: KindError },
}

/// Open file descriptions by objref, held by crd for the stubs.
#[derive(Default)]
pub struct ObjectTable {
    files: BTreeMap<ObjRef, OwnedFd>,
}

impl ObjectTable {
    /// A table of descriptions made elsewhere (a graft takes the live ones).
    pub fn insert(&mut self, objref: ObjRef, fd: OwnedFd) {
        self.files.insert(objref, fd);
    }

    /// Recreates every description of an image, telling `publish` where each is (its
    /// fd number in crd) as soon as it exists, so stubs can start pulling. `stubs` finds
    /// the stub of a task, for the descriptions that refer to one (a pidfd).
    pub fn recreate(
        graph: &Graph,
        publish: &mut dyn FnMut(ObjRef, RawFd),
        stubs: Stubs<'_>,
    ) -> Result<Self, ObjectError> {
        let index = graph.index();
        let mut maker = Maker {
            index: &index,
            table: ObjectTable::default(),
            store: ObjectStore::new(),
            first_file: foldhash::HashMap::default(),
            publish,
            stubs,
        };
        for (task, slot) in graph.slots() {
            let Encounter::First { objref, object: desc } = &slot.file else { continue };
            maker.file(task.tgid, slot.fd, *objref, desc)?;
        }
        maker.complete()?;
        let Maker { table, mut store, .. } = maker;
        // Only the descriptions themselves are needed from here on; FIFO keepers and
        // unclaimed pipe ends go now, so they cannot hold anything open.
        store.clear();
        Ok(table)
    }
}

/// One restore's making of descriptions, in the graph's walk order.
struct Maker<'g, 'p> {
    index: &'g GraphIndex<'g>,
    table: ObjectTable,
    store: ObjectStore,
    /// Each object's first description made (an object's fd for its ties).
    first_file: foldhash::HashMap<ObjRef, ObjRef>,
    publish: &'p mut dyn FnMut(ObjRef, RawFd),
    stubs: Stubs<'p>,
}

impl Maker<'_, '_> {
    /// Makes the description `objref` (its first encounter), then the files its object
    /// carries, if this is the object's first encounter. `tgid`/`fd`: where it was
    /// met, for errors.
    fn file(&mut self, tgid: Tgid, fd: Fd, objref: ObjRef, desc: &FileDesc) -> Result<(), ObjectError> {
        let object_ref = desc.object.objref();
        let object = self.index.objects.get(&object_ref).ok_or(ObjectError::Inconsistent {
            tgid,
            fd,
            objref: object_ref,
        })?;
        let first = !self.first_file.contains_key(&object_ref);
        let ties = object.state.ties();
        let mut tied = Vec::with_capacity(ties.len());
        for (tie, encounter) in ties.iter().zip(&object.tied) {
            let Some(encounter) = encounter else { continue };
            let other = encounter.objref();
            let Some(state) = self.index.objects.get(&other).map(|o| &o.state) else {
                return Err(ObjectError::Inconsistent { tgid, fd, objref: other });
            };
            let fd =
                self.first_file.get(&other).and_then(|f| self.table.files.get(f)).map(AsRawFd::as_raw_fd);
            tied.push(Tied { tie, object: other, state, fd });
        }
        let args = OpenArgs {
            object: object_ref,
            first,
            access: desc.access,
            flags: desc.flags,
            pos: desc.pos,
            path: object.path.as_deref(),
            mode: object.mode,
            ino: object.ino,
            tied: &tied,
            stubs: self.stubs,
        };
        let failed = |source| ObjectError::Make { tgid, fd, kind: object.kind(), objref: object_ref, source };
        let opened = object.state.open(&args, &mut self.store).map_err(failed)?;
        set_status_flags(&opened.fd, desc.flags, opened.fresh).map_err(|e| failed(e.into()))?;
        (self.publish)(objref, opened.fd.as_raw_fd());
        self.table.files.insert(objref, opened.fd);
        self.first_file.entry(object_ref).or_insert(objref);
        if let Encounter::First { object: record, .. } = &desc.object {
            self.nested(tgid, fd, record)?;
        }
        Ok(())
    }

    /// Makes the files an object record carries, and those of the objects nested in it
    /// (a socket's peer, recorded inside the socket, carries its own queue's files).
    fn nested(&mut self, tgid: Tgid, fd: Fd, record: &Object) -> Result<(), ObjectError> {
        for carried in &record.carried {
            if let Encounter::First { objref, object: desc } = carried {
                self.file(tgid, fd, *objref, desc)?;
            }
        }
        for tied in record.tied.iter().flatten() {
            if let Encounter::First { object, .. } = tied {
                self.nested(tgid, fd, object)?;
            }
        }
        Ok(())
    }

    /// Completes every object that is tied to others or carries files, stage by stage.
    fn complete(&mut self) -> Result<(), ObjectError> {
        for stage in [Stage::Fill, Stage::Seal] {
            for (objref, object) in self.index.objects.iter() {
                let Some(own) = self.first_file.get(&objref).and_then(|f| self.table.files.get(f)) else {
                    continue;
                };
                let ties = object.state.ties();
                let tied: Vec<(&Tie, Option<(BorrowedFd<'_>, &crate::kinds::Saved)>)> = ties
                    .iter()
                    .zip(&object.tied)
                    .map(|(tie, encounter)| {
                        let other = encounter.as_ref().map(Encounter::objref);
                        let made = other.and_then(|o| {
                            let fd = self.first_file.get(&o).and_then(|f| self.table.files.get(f))?;
                            Some((fd.as_fd(), &self.index.objects.get(&o)?.state))
                        });
                        (tie, made)
                    })
                    .collect();
                let carried: Vec<BorrowedFd<'_>> = object
                    .carried
                    .iter()
                    .filter_map(|c| self.table.files.get(&c.objref()).map(AsFd::as_fd))
                    .collect();
                if carried.len() != object.carried.len() {
                    return Err(ObjectError::Complete {
                        kind: object.kind(),
                        objref,
                        source: KindError::Other("a file it carries was never made".into()),
                    });
                }
                let done = Completion { fd: own.as_fd(), tied: &tied, carried: &carried };
                object.state.complete(stage, &done).map_err(|source| ObjectError::Complete {
                    kind: object.kind(),
                    objref,
                    source,
                })?;
            }
        }
        Ok(())
    }
}

/// Sets the description's status flags exactly (F_SETFL changes only O_APPEND,
/// O_NONBLOCK, O_ASYNC, O_DIRECT and O_NOATIME). `fresh`: made by a creating call, so no
/// status flag is set yet.
fn set_status_flags(fd: &OwnedFd, flags: u32, fresh: bool) -> Result<(), SyscallError> {
    let settable = OFlag::O_APPEND | OFlag::O_NONBLOCK | OFlag::O_ASYNC | OFlag::O_DIRECT | OFlag::O_NOATIME;
    let wanted = OFlag::from_bits_truncate(flags as i32) & settable;
    if fresh && wanted.is_empty() {
        // Already right: saves two fcntl calls per pipe end.
        return Ok(());
    }
    let current = fcntl::fcntl(fd.as_fd(), FcntlArg::F_GETFL)
        .map_err(|e| SyscallError { call: "fcntl(F_GETFL)", source: e.into() })?;
    if current & libc::O_PATH != 0 {
        return Ok(());
    }
    let current = OFlag::from_bits_truncate(current);
    if current & settable != wanted {
        fcntl::fcntl(fd.as_fd(), FcntlArg::F_SETFL((current - settable) | wanted))
            .map_err(|e| SyscallError { call: "fcntl(F_SETFL)", source: e.into() })?;
    }
    Ok(())
}
