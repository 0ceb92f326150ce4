//! The objref table: every open file description the stubs will need, held by crd
//! until they have pulled their copies with `pidfd_getfd`.
//!
//! Built by walking the graph in order, the linux-cr restart logic literally: each
//! description's first encounter is made by its object's kind ([`Saved::open`]); the
//! first description of an object creates the object (a pipe with `pipe2`, its other end
//! deposited in the [`ObjectStore`] under the object's objref), later ones pick up what
//! was deposited or open another description of it. A later encounter of a description
//! (`CR_FD_OBJREF`) creates nothing: it refers to the entry made at its first encounter.
//! Whatever is still deposited when every description exists is closed, so no stray end
//! keeps a pipe open.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
};

use nix::fcntl::{self, FcntlArg, OFlag};

use crate::{
    graph::{Encounter, Graph},
    kinds::{Kind, KindError, ObjectStore, OpenArgs},
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
    /// fd number in crd) as soon as it exists, so stubs can start pulling.
    pub fn recreate(graph: &Graph, publish: &mut dyn FnMut(ObjRef, RawFd)) -> Result<Self, ObjectError> {
        let mut table = ObjectTable::default();
        let mut store = ObjectStore::new();
        let mut objects: foldhash::HashMap<ObjRef, ()> = foldhash::HashMap::default();
        let index = graph.index();
        for (task, slot) in graph.slots() {
            let Encounter::First { objref, object: desc } = &slot.file else { continue };
            let object_ref = desc.object.objref();
            let object = index.objects.get(&object_ref).ok_or(ObjectError::Inconsistent {
                tgid: task.tgid,
                fd: slot.fd,
                objref: object_ref,
            })?;
            let first = objects.insert(object_ref, ()).is_none();
            let args = OpenArgs {
                object: object_ref,
                first,
                access: desc.access,
                flags: desc.flags,
                pos: desc.pos,
                path: object.path.as_deref(),
                mode: object.mode,
                ino: object.ino,
            };
            let failed = |source| ObjectError::Make {
                tgid: task.tgid,
                fd: slot.fd,
                kind: object.kind(),
                objref: object_ref,
                source,
            };
            let opened = object.state.open(&args, &mut store).map_err(failed)?;
            set_status_flags(&opened.fd, desc.flags, opened.fresh).map_err(|e| failed(e.into()))?;
            publish(*objref, opened.fd.as_raw_fd());
            table.files.insert(*objref, opened.fd);
        }
        // Only the descriptions themselves are needed from here on; FIFO keepers and
        // unclaimed pipe ends go now, so they cannot hold anything open.
        store.clear();
        Ok(table)
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
