//! Named pipes (FIFOs): a pipe reached by a path. Harvested and saved like a pipe
//! (capacity, queued bytes); restored by opening the path: the first encounter opens a
//! read-write *keeper* (so no open blocks, and the queue has a home while the ends are
//! opened), refills the queue, and every description is then opened by path.
use nix::{fcntl, fcntl::OFlag, sys::stat::Mode};

use super::{
    FileKind, Handle, InsideUse, KindError, ObjectStore, OpenArgs, Opened, Reach, Recognise,
    pipe::{self, PipeLive, PipeState},
    regular,
};

pub struct Fifo;

impl FileKind for Fifo {
    const NAME: &'static str = "fifo";
    const SAME_INODE: bool = true;
    type Live = PipeLive;
    type Saved = PipeState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFIFO
    }

    fn from_bpf(_record: &crd_common::FdRecord, tail: &[u8]) -> Option<PipeLive> {
        pipe::from_tail(tail)
    }

    fn from_proc(_slot: &super::ProcSlot<'_>) -> PipeLive {
        PipeLive::default()
    }

    fn held_outside(live: &PipeLive, inside: InsideUse) -> bool {
        pipe::held_outside(live, inside)
    }

    fn sketch(live: &PipeLive) -> PipeState {
        pipe::sketch(live)
    }

    fn save(live: &PipeLive, reach: &Reach<'_>) -> Result<PipeState, KindError> {
        pipe::save(live, reach)
    }

    fn detail(saved: &PipeState) -> Option<String> {
        pipe::detail(saved)
    }

    fn open(saved: &PipeState, args: &OpenArgs<'_>, store: &mut ObjectStore) -> Result<Opened, KindError> {
        let path = args.path()?;
        if args.first {
            let flags = OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
            let keeper = fcntl::open(path, flags, Mode::empty()).map_err(|e| regular::open_error(path, e))?;
            regular::check_type(&keeper, path, args, Self::NAME)?;
            pipe::fill(&keeper, saved, false)?;
            store.set_handle(args.object, Handle::Owned(keeper));
        }
        // The keeper is a reader and a writer, so this open never blocks.
        let flags = pipe::access_flags(args.access) | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = fcntl::open(path, flags, Mode::empty()).map_err(|e| KindError::errno("open", e))?;
        Ok(Opened { fd, fresh: false })
    }

    fn same(a: &PipeState, b: &PipeState) -> Result<(), String> {
        pipe::same(a, b)
    }
}
