//! File kinds: one module per kind, behind one trait ([`FileKind`]), registered in one
//! place (the `registry!` list at the bottom of this file).
//!
//! A kind module owns everything about its kind, as a kind is one file in CRIU
//! (`criu/eventfd.c` and its `file_desc_ops`):
//! - how to recognise it ([`FileKind::recognise`]: inode mode, superblock magic, the
//!   dentry name of anon and shmem files, the device number);
//! - what identifies its object ([`FileKind::IDENTITY`]: the inode, or for anon files
//!   the file's private object, since every anon file sits on one shared inode);
//! - what the BPF record's tail carries for it and how to decode it
//!   ([`FileKind::from_bpf`]), and how the /proc harvester fills the same state from
//!   fdinfo ([`FileKind::from_proc`]);
//! - what it saves in the image ([`FileKind::save`], while the targets are frozen, or
//!   [`FileKind::sketch`] without reading contents), and whether its object is reached
//!   from outside the checkpointed set ([`FileKind::held_outside`]);
//! - how `ls` and `inspect` show it ([`FileKind::detail`]);
//! - how restore makes a description of it ([`FileKind::open`]: the first encounter of
//!   the object creates it, later ones pick it up from the [`ObjectStore`]), or why it
//!   cannot ([`FileKind::refusal`]);
//! - how round-trip tests compare it ([`FileKind::same`]).
//!
//! The registry generates the enums the rest of crd uses: [`Kind`] (which kind),
//! [`Live`] (what a harvest read) and [`Saved`] (what an image holds). Adding a kind is
//! one new module plus one registry line. Kinds sit low in the layering: they know
//! syscalls and ids, not harvesters, graphs or images.
use std::{
    fmt,
    os::fd::{BorrowedFd, OwnedFd, RawFd},
};

use foldhash::{HashMap, HashMapExt};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    sys::SyscallError,
    types::{Access, DeviceId, Fd, ObjRef, Pid, Tgid},
};

/// A kind with no state of its own beyond the object's path, mode and inode (files,
/// directories, devices, and the kinds crd lists but does not make yet): its name, how
/// it is recognised, and how restore makes it, or why not.
macro_rules! stateless_kind {
    (
        $ty:ty, $name:literal,
        has_path: $has_path:literal, same_inode: $same_inode:literal, identity: $identity:expr,
        recognise: |$r:ident| $recognise:expr,
        refusal: $refusal:expr,
        open: |$args:ident| $open:expr $(,)?
    ) => {
        impl $crate::kinds::FileKind for $ty {
            const NAME: &'static str = $name;
            const HAS_PATH: bool = $has_path;
            const SAME_INODE: bool = $same_inode;
            const IDENTITY: $crate::kinds::Identity = $identity;
            type Live = ();
            type Saved = $crate::kinds::regular::ByPath;

            fn recognise($r: &$crate::kinds::Recognise<'_>) -> bool {
                $recognise
            }

            fn from_bpf(_record: &crd_common::FdRecord, _tail: &[u8]) -> Option<()> {
                Some(())
            }

            fn from_proc(_slot: &$crate::kinds::ProcSlot<'_>) {}

            fn sketch(_live: &()) -> Self::Saved {
                $crate::kinds::regular::ByPath
            }

            fn detail(_saved: &Self::Saved) -> Option<String> {
                None
            }

            fn refusal(_saved: &Self::Saved) -> Option<String> {
                $refusal
            }

            fn open(
                saved: &Self::Saved,
                $args: &$crate::kinds::OpenArgs<'_>,
                _store: &mut $crate::kinds::ObjectStore,
            ) -> Result<$crate::kinds::Opened, $crate::kinds::KindError> {
                match Self::refusal(saved) {
                    Some(why) => Err($crate::kinds::KindError::Other(why)),
                    None => $open,
                }
            }

            fn same(_a: &Self::Saved, _b: &Self::Saved) -> Result<(), String> {
                Ok(())
            }
        }
    };
}

pub mod decoding;
pub mod device;
pub mod directory;
pub mod epoll;
pub mod eventfd;
pub mod fanotify;
pub mod fifo;
pub mod inet;
pub mod inotify;
pub mod memfd;
pub mod opaque;
pub mod pidfd;
pub mod pipe;
pub mod regular;
pub mod signalfd;
pub mod socket;
pub mod sockio;
pub mod tcprepair;
pub mod terminal;
pub mod timerfd;
pub mod unix;

/// What identifies the object behind an open file description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// The inode (`file->f_inode`): files, pipes, devices.
    Inode,
    /// The file's private object (`file->private_data`): anon-inode files, which all
    /// share the kernel's one anon inode. The /proc harvester, which sees no pointers,
    /// uses the description instead.
    Private,
}

/// What a harvester knows when it tells kinds apart.
#[derive(Clone, Copy, Debug)]
pub struct Recognise<'a> {
    /// `i_mode`.
    pub mode: u32,
    /// The filesystem's magic, where known (the /proc harvester knows it only for pipes,
    /// anon inodes and what it asks `statfs` about).
    pub fs_magic: Option<u64>,
    /// The dentry's name for anon and shmem files (`[eventfd]`, `memfd:NAME`), where known.
    pub name: Option<&'a str>,
    /// The device a device node stands for.
    pub rdev: DeviceId,
    /// What `/proc/PID/fd/N` links to, where read (the /proc harvester).
    pub link: Option<&'a str>,
    /// A socket's family (`AF_*`), where read.
    pub family: Option<u16>,
}

impl Recognise<'_> {
    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// What /proc shows of one fd, for [`FileKind::from_proc`].
#[derive(Clone, Copy, Debug)]
pub struct ProcSlot<'a> {
    pub tgid: Tgid,
    pub fd: Fd,
    /// `/proc/PID/fdinfo/N`.
    pub fdinfo: &'a str,
    /// `/proc/PID/fd/N`.
    pub link: &'a str,
    /// `st_size`.
    pub size: u64,
    /// The device a device node stands for (`st_rdev`).
    pub rdev: DeviceId,
    /// What sock_diag said of a socket (looked up by inode in the target's network
    /// namespace), where it answered.
    pub socket: Option<&'a socket::SocketFacts>,
}

impl ProcSlot<'_> {
    /// The value of an fdinfo line `name: value`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fdinfo.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
    }
}

/// How many distinct descriptions of one object the checkpointed set holds, to compare
/// with what the kernel counts (linux-cr's leak check).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InsideUse {
    pub readers: u32,
    pub writers: u32,
}

/// A live fd of a frozen target, for [`FileKind::save`] to read contents through.
#[derive(Clone, Copy, Debug)]
pub struct Reach<'a> {
    pub pidfd: BorrowedFd<'a>,
    pub tgid: Tgid,
    pub fd: Fd,
    /// The description's access (a pipe's contents can only be copied from a read end).
    pub access: Access,
    /// Where save leaves the files it found inside the object, in the order its state
    /// names them (the fds in flight in a unix socket's queue, received by peeking):
    /// the harvest identifies each and the graph nests it in the object.
    pub carried: &'a std::cell::RefCell<Vec<OwnedFd>>,
    /// What this checkpoint was asked to save beyond what every checkpoint saves.
    pub options: SaveOptions,
    /// The checkpointed fds by inode, for a kind whose object names files by fd number
    /// when that number may no longer hold them (an epoll's targets).
    pub holders: &'a dyn HolderLookup,
}

/// Every fd of the checkpointed processes by the inode its file opens, and a pidfd of
/// each process: an epoll names each file it watches by the fd number it was
/// registered under, which may have been closed since (the file living on in a `dup`)
/// or belong to another process; save then finds the very description among these
/// (kcmp) and takes it with `pidfd_getfd`.
///
/// Built on first use: most checkpoints hold no epoll, and at 18,000 fds the maps cost
/// a few milliseconds of a whole command that should take fifty.
pub struct Holders<'a> {
    build: Box<dyn Fn() -> HolderIndex<'a> + 'a>,
    index: std::cell::OnceCell<HolderIndex<'a>>,
}

impl<'a> Holders<'a> {
    /// Holders that `build` indexes when first asked for.
    pub fn new(build: impl Fn() -> HolderIndex<'a> + 'a) -> Self {
        Holders { build: Box::new(build), index: std::cell::OnceCell::new() }
    }
}

/// [`Holders`] as a [`Reach`] sees them: the index, borrowed no longer than the reach
/// (which lives shorter than the pidfds the index borrows).
pub trait HolderLookup: std::fmt::Debug {
    fn get(&self) -> &HolderIndex<'_>;
}

impl HolderLookup for Holders<'_> {
    fn get(&self) -> &HolderIndex<'_> {
        self.index.get_or_init(|| (self.build)())
    }
}

impl std::fmt::Debug for Holders<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holders").field("index", &self.index.get()).finish_non_exhaustive()
    }
}

/// The maps of [`Holders`].
#[derive(Clone, Debug, Default)]
pub struct HolderIndex<'a> {
    pub by_inode: HashMap<(DeviceId, u64), Vec<(Tgid, Fd)>>,
    /// By open file description (`FileInfo::id`), for the files a BPF walk of an epoll
    /// named by address.
    pub by_file: HashMap<crate::types::KernelPtr, Vec<(Tgid, Fd)>>,
    pub pidfds: HashMap<Tgid, BorrowedFd<'a>>,
}

/// What a checkpoint saves only when asked, because saving it touches the live object in
/// a way a plain read does not (the kinds read it; the command line sets it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaveOptions {
    /// Established TCP connections: their sequence numbers, queues and options, read by
    /// putting each socket briefly into repair mode (`TCP_REPAIR`, which needs
    /// CAP_NET_ADMIN), as CRIU's `--tcp-established` does. Without it an image holds
    /// only a connection's addresses, and restore refuses it.
    pub tcp_established: bool,
}

/// Another object an object is tied to, named as the saved state knows it; the graph
/// finds it among the harvested objects and nests it in the object's record
/// (linux-cr: a unix socket checkpoints its peer), so restore makes the two together.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tie {
    /// The object of the same kind with this inode number: a connected socket's peer.
    Peer(u64),
    /// The listening object others reach by this name: the listener a unix connection
    /// was accepted from, or is waiting on.
    Listener(socket::UnixName),
    /// The socket bound at this address: the sender of a queued datagram, which restore
    /// sends it from again.
    Address(std::net::SocketAddr),
    /// This end of a pty (its master, or its slave): a pty is one object seen from two
    /// ends, restored together ([`terminal`]).
    Pty(terminal::PtyEnd),
}

/// An object tied to the one restore is making (see [`Tie`]).
#[derive(Clone, Copy, Debug)]
pub struct Tied<'a> {
    pub tie: &'a Tie,
    pub object: ObjRef,
    pub state: &'a Saved,
    /// Its first description, if made already (a listener restore connects to).
    pub fd: Option<RawFd>,
}

/// What [`FileKind::complete`] gets once every description of the image exists.
#[derive(Clone, Copy, Debug)]
pub struct Completion<'a> {
    /// The object's first description.
    pub fd: BorrowedFd<'a>,
    /// Each tied object's first description, with its state (None: not in the image).
    pub tied: &'a [(&'a Tie, Option<(BorrowedFd<'a>, &'a Saved)>)],
    /// The files the object carries, in the order its state names them.
    pub carried: &'a [BorrowedFd<'a>],
}

/// The two steps of [`FileKind::complete`]: every object's contents go in before any
/// object is closed for writing (a socket's queue is refilled by its peer before either
/// end is shut down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Connect what waits on a listener, refill queues (with the files in flight).
    Fill,
    /// Options and shutdowns.
    Seal,
}

/// Why a kind could not save or make an object. The caller adds where (PID, fd, objref).
#[derive(Debug, thiserror::Error)]
pub enum KindError {
    #[error(transparent)]
    Syscall(#[from] SyscallError),
    #[error("{0} no longer exists")]
    Gone(String),
    #[error("{path} is now a {found}, not a {expected}")]
    Changed { path: String, found: &'static str, expected: &'static str },
    #[error("the image records no path for it")]
    NoPath,
    #[error("{0}")]
    Other(String),
}

impl KindError {
    pub fn errno(call: &'static str, e: nix::Error) -> Self {
        KindError::Syscall(SyscallError { call, source: e.into() })
    }
}

/// What restore knows about the description to make.
#[derive(Clone, Copy, Debug)]
pub struct OpenArgs<'a> {
    /// The object's objref (deposits and handles are kept under it).
    pub object: ObjRef,
    /// Whether this is the object's first description in the walk (it must be created).
    pub first: bool,
    pub access: Access,
    /// Open flags of the description (O_APPEND, O_NONBLOCK...), without O_CLOEXEC.
    pub flags: u32,
    pub pos: i64,
    /// The path of a named object.
    pub path: Option<&'a str>,
    /// The objects this one is tied to (see [`Tie`]), in the order its state names them.
    pub tied: &'a [Tied<'a>],
    /// `i_mode` at checkpoint time.
    pub mode: u32,
    pub ino: u64,
    /// Where the restored tasks are, for an object that refers to a task (a pidfd).
    pub stubs: Stubs<'a>,
}

/// The stub standing for each checkpointed task, for the objects that refer to a task
/// rather than to another object (a pidfd's process): the graph ties objects to objects
/// ([`Tie`]), but a task is not an object, and its new PID exists only once its stub has
/// been forked, which happens while restore makes the descriptions. The lookup waits
/// for that stub to start and says why when it cannot (the old PID is not a stub's).
#[derive(Clone, Copy)]
pub struct Stubs<'a>(pub &'a dyn Fn(Pid) -> Result<Pid, String>);

impl Stubs<'_> {
    /// The new PID of the stub restored for `old`.
    pub fn new_pid(&self, old: Pid) -> Result<Pid, KindError> {
        (self.0)(old).map_err(KindError::Other)
    }
}

impl fmt::Debug for Stubs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Stubs")
    }
}

impl OpenArgs<'_> {
    pub fn path(&self) -> Result<&str, KindError> {
        self.path.ok_or(KindError::NoPath)
    }
}

/// A description made by [`FileKind::open`].
pub struct Opened {
    pub fd: OwnedFd,
    /// Fresh from a creating call (pipe2, eventfd, memfd_create) with no status flags
    /// set: restore skips the F_GETFL/F_SETFL round trip when none are wanted.
    pub fresh: bool,
}

/// What restore holds between descriptions of one object: ends deposited by a first
/// encounter (a pipe's other end), and a handle to open more descriptions of an object.
#[derive(Default)]
pub struct ObjectStore {
    deposited: HashMap<(ObjRef, u8), OwnedFd>,
    handles: HashMap<ObjRef, Handle>,
}

/// How restore reaches an object to open another description of it.
pub enum Handle {
    /// An fd restore already holds elsewhere (a deposited end or a made description,
    /// which keep their numbers until the restore is done): no extra fd.
    Held(RawFd),
    /// An fd of its own (a FIFO's read-write keeper).
    Owned(OwnedFd),
}

impl ObjectStore {
    pub fn new() -> Self {
        Self { deposited: HashMap::new(), handles: HashMap::new() }
    }

    /// Leaves `fd` under (`object`, `slot`) for a later description to pick up.
    pub fn deposit(&mut self, object: ObjRef, slot: u8, fd: OwnedFd) {
        self.deposited.insert((object, slot), fd);
    }

    /// Takes what a first encounter deposited under (`object`, `slot`).
    pub fn pick_up(&mut self, object: ObjRef, slot: u8) -> Option<OwnedFd> {
        self.deposited.remove(&(object, slot))
    }

    pub fn set_handle(&mut self, object: ObjRef, handle: Handle) {
        self.handles.insert(object, handle);
    }

    /// The fd number of `object`'s handle.
    pub fn handle(&self, object: ObjRef) -> Option<RawFd> {
        self.handles.get(&object).map(|h| match h {
            Handle::Held(fd) => *fd,
            Handle::Owned(fd) => std::os::fd::AsRawFd::as_raw_fd(fd),
        })
    }

    /// Closes every deposit and handle: once every description exists, nothing else may
    /// hold an object open.
    pub fn clear(&mut self) {
        self.handles.clear();
        self.deposited.clear();
    }
}

/// One file kind. See the module documentation.
pub trait FileKind {
    /// The kind's name in `ls`, `inspect`, errors and the image.
    const NAME: &'static str;
    /// Whether `/proc/PID/fd/N` names the object usefully (not `pipe:[ino]`).
    const HAS_PATH: bool = true;
    /// Whether a restored object is the original inode (reopened by path), so that
    /// round trips compare inode numbers.
    const SAME_INODE: bool = false;
    const IDENTITY: Identity = Identity::Inode;
    /// Whether the object keeps its name (path, device number) through a restore, so
    /// that round trips compare them: a pty comes back under another index.
    const STABLE_NAME: bool = true;
    /// What `inspect` calls the files the object carries (`Object::carried`).
    const CARRIED_LABEL: &'static str = "in flight";
    /// Whether the object holds a reference to each file it carries (a message in
    /// flight does, so the kernel's count of a description includes it; an epoll does
    /// not: it watches files without keeping them open).
    const HOLDS_CARRIED: bool = true;
    /// What a harvest reads of one object.
    type Live: Clone + fmt::Debug + PartialEq + Eq;
    /// What an image holds of one object.
    type Saved: Clone + fmt::Debug + PartialEq + Eq + Serialize + DeserializeOwned;

    fn recognise(r: &Recognise<'_>) -> bool;
    /// What identifies this object, where it depends on the state (a pty master is its
    /// description, since every master opens the one `/dev/ptmx` inode; a slave is its
    /// inode).
    fn identity(_live: &Self::Live) -> Identity {
        Self::IDENTITY
    }
    /// From the BPF record's tail (`TAIL_*` in crd-common); None if the tail lacks what
    /// the kind needs (its fields are missing on this kernel): the fd is then opaque.
    fn from_bpf(record: &crd_common::FdRecord, tail: &[u8]) -> Option<Self::Live>;
    fn from_proc(slot: &ProcSlot<'_>) -> Self::Live;
    /// Whether the object is also open outside the checkpointed set in a way its
    /// descriptions do not show (a pipe end held by another process).
    fn held_outside(_live: &Self::Live, _inside: InsideUse) -> bool {
        false
    }
    /// Whether the state still has to be read from the fd's fdinfo: BPF does not walk
    /// every kernel structure (a pidfd's `struct pid`, an inotify group's marks), so
    /// such a kind's `from_bpf` leaves its state pending and the harvest fills it in
    /// with [`FileKind::from_proc`], as the /proc harvester does
    /// ([`crate::harvest::extras::fill_links`]).
    fn fdinfo_pending(_live: &Self::Live) -> bool {
        false
    }
    /// The saved state without reading contents (`ls`, graft).
    fn sketch(live: &Self::Live) -> Self::Saved;
    /// The saved state with contents, read through `reach` while the targets are frozen.
    fn save(live: &Self::Live, _reach: &Reach<'_>) -> Result<Self::Saved, KindError> {
        Ok(Self::sketch(live))
    }
    /// Whether encoding `saved` reads from the target (contents streamed into the
    /// image): the checkpoint then keeps the targets frozen until the image is written.
    fn streams(_saved: &Self::Saved) -> bool {
        false
    }
    /// How `ls` and `inspect` name the object when it has no path (`TCP *:80 (LISTEN)`);
    /// None: `kind:[ino]`.
    fn name(_saved: &Self::Saved) -> Option<String> {
        None
    }
    /// What `ls` and `inspect` show beside the name (`count=7 semaphore`).
    fn detail(saved: &Self::Saved) -> Option<String>;
    /// The other objects this one is tied to (a socket's peer, its listener).
    fn ties(_saved: &Self::Saved) -> Vec<Tie> {
        Vec::new()
    }
    /// The name others reach this object by, when it is a listener ([`Tie::Listener`]).
    fn listens_at(_saved: &Self::Saved) -> Option<&socket::UnixName> {
        None
    }
    /// The address the object is bound at, for [`Tie::Address`].
    fn bound_at(_saved: &Self::Saved) -> Option<std::net::SocketAddr> {
        None
    }
    /// Which end of which pty the object is, for [`Tie::Pty`].
    fn pty_end(_saved: &Self::Saved) -> Option<terminal::PtyEnd> {
        None
    }
    /// Whether the object is held outside given which ties the graph found in the
    /// checkpointed set (a connected socket whose peer is elsewhere).
    fn outside_unless_tied(_saved: &Self::Saved, _found: &[bool]) -> bool {
        false
    }
    /// The last steps of restore, once every description exists (see [`Stage`]).
    fn complete(_saved: &Self::Saved, _stage: Stage, _done: &Completion<'_>) -> Result<(), KindError> {
        Ok(())
    }
    /// The task the object refers to (a pidfd's process), by its PID at checkpoint time.
    /// The graph marks the object held outside when that task is not checkpointed, and
    /// an image restore then refuses it: such an object cannot be made without its task.
    fn task(_saved: &Self::Saved) -> Option<Pid> {
        None
    }
    /// Why an image restore cannot make this object (None: it can).
    fn refusal(_saved: &Self::Saved) -> Option<String> {
        None
    }
    /// Makes one description of the object (creating the object on its first encounter).
    fn open(saved: &Self::Saved, args: &OpenArgs<'_>, store: &mut ObjectStore) -> Result<Opened, KindError>;
    /// Round trip: the first difference between two saved states.
    fn same(a: &Self::Saved, b: &Self::Saved) -> Result<(), String>;
}

/// A refusal for kinds crd does not make yet: `what` names them ("sockets").
pub fn not_supported(what: &str) -> Option<String> {
    Some(format!("crd does not recreate {what} yet; `crd graft` hands the live one over"))
}

/// Reads a tail struct from the bytes after the common record.
pub fn tail<T: Copy + Default>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length was checked; the tails are plain old data (integers and byte
    // arrays), valid for any bytes, and read_unaligned needs no alignment.
    Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// A NUL-padded name from a BPF record.
pub fn name_of(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

macro_rules! registry {
    ($($variant:ident => $kind:ty,)*) => {
        /// Which kind a file is (one per registered module).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum Kind {
            $($variant,)*
        }

        impl Kind {
            /// Every kind, in recognition order.
            pub const ALL: &'static [Kind] = &[$(Kind::$variant,)*];

            /// The first kind, in registry order, that recognises the file.
            pub fn recognise(r: &Recognise<'_>) -> Kind {
                $(if <$kind>::recognise(r) {
                    return Kind::$variant;
                })*
                Kind::Other
            }

            pub fn name(self) -> &'static str {
                match self { $(Kind::$variant => <$kind>::NAME,)* }
            }

            pub fn has_path(self) -> bool {
                match self { $(Kind::$variant => <$kind>::HAS_PATH,)* }
            }

            pub fn same_inode(self) -> bool {
                match self { $(Kind::$variant => <$kind>::SAME_INODE,)* }
            }

            pub fn stable_name(self) -> bool {
                match self { $(Kind::$variant => <$kind>::STABLE_NAME,)* }
            }

            pub fn identity(self) -> Identity {
                match self { $(Kind::$variant => <$kind>::IDENTITY,)* }
            }

            pub fn carried_label(self) -> &'static str {
                match self { $(Kind::$variant => <$kind>::CARRIED_LABEL,)* }
            }

            pub fn holds_carried(self) -> bool {
                match self { $(Kind::$variant => <$kind>::HOLDS_CARRIED,)* }
            }
        }

        /// What a harvest read of one object, by kind.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Live {
            $($variant(<$kind as FileKind>::Live),)*
        }

        impl Live {
            pub fn kind(&self) -> Kind {
                match self { $(Live::$variant(_) => Kind::$variant,)* }
            }

            /// Decodes `kind`'s state from a BPF record; None: the tail lacks it.
            pub fn from_bpf(kind: Kind, record: &crd_common::FdRecord, tail: &[u8]) -> Option<Live> {
                match kind { $(Kind::$variant => <$kind>::from_bpf(record, tail).map(Live::$variant),)* }
            }

            pub fn from_proc(kind: Kind, slot: &ProcSlot<'_>) -> Live {
                match kind { $(Kind::$variant => Live::$variant(<$kind>::from_proc(slot)),)* }
            }

            pub fn identity(&self) -> Identity {
                match self { $(Live::$variant(live) => <$kind>::identity(live),)* }
            }

            pub fn held_outside(&self, inside: InsideUse) -> bool {
                match self { $(Live::$variant(live) => <$kind>::held_outside(live, inside),)* }
            }

            pub fn fdinfo_pending(&self) -> bool {
                match self { $(Live::$variant(live) => <$kind>::fdinfo_pending(live),)* }
            }

            pub fn sketch(&self) -> Saved {
                match self { $(Live::$variant(live) => Saved::$variant(<$kind>::sketch(live)),)* }
            }

            pub fn save(&self, reach: &Reach<'_>) -> Result<Saved, KindError> {
                match self { $(Live::$variant(live) => <$kind>::save(live, reach).map(Saved::$variant),)* }
            }
        }

        /// What an image holds of one object, by kind. Encoded as (kind name, state), so
        /// an image with a kind this crd does not know is refused by name.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Saved {
            $($variant(<$kind as FileKind>::Saved),)*
        }

        impl Saved {
            pub fn kind(&self) -> Kind {
                match self { $(Saved::$variant(_) => Kind::$variant,)* }
            }

            pub fn detail(&self) -> Option<String> {
                match self { $(Saved::$variant(s) => <$kind>::detail(s),)* }
            }

            pub fn name(&self) -> Option<String> {
                match self { $(Saved::$variant(s) => <$kind>::name(s),)* }
            }

            pub fn ties(&self) -> Vec<Tie> {
                match self { $(Saved::$variant(s) => <$kind>::ties(s),)* }
            }

            pub fn listens_at(&self) -> Option<&socket::UnixName> {
                match self { $(Saved::$variant(s) => <$kind>::listens_at(s),)* }
            }

            pub fn bound_at(&self) -> Option<std::net::SocketAddr> {
                match self { $(Saved::$variant(s) => <$kind>::bound_at(s),)* }
            }

            pub fn pty_end(&self) -> Option<terminal::PtyEnd> {
                match self { $(Saved::$variant(s) => <$kind>::pty_end(s),)* }
            }

            pub fn outside_unless_tied(&self, found: &[bool]) -> bool {
                match self { $(Saved::$variant(s) => <$kind>::outside_unless_tied(s, found),)* }
            }

            pub fn complete(&self, stage: Stage, done: &Completion<'_>) -> Result<(), KindError> {
                match self { $(Saved::$variant(s) => <$kind>::complete(s, stage, done),)* }
            }

            pub fn streams(&self) -> bool {
                match self { $(Saved::$variant(s) => <$kind>::streams(s),)* }
            }

            pub fn refusal(&self) -> Option<String> {
                match self { $(Saved::$variant(s) => <$kind>::refusal(s),)* }
            }

            pub fn task(&self) -> Option<Pid> {
                match self { $(Saved::$variant(s) => <$kind>::task(s),)* }
            }

            pub fn open(&self, args: &OpenArgs<'_>, store: &mut ObjectStore) -> Result<Opened, KindError> {
                match self { $(Saved::$variant(s) => <$kind>::open(s, args, store),)* }
            }

            pub fn same(&self, other: &Saved) -> Result<(), String> {
                match (self, other) {
                    $((Saved::$variant(a), Saved::$variant(b)) => <$kind>::same(a, b),)*
                    (a, b) => Err(format!("{} vs {}", a.kind(), b.kind())),
                }
            }
        }

        impl Serialize for Saved {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeTuple;
                let mut tuple = serializer.serialize_tuple(2)?;
                match self {
                    $(Saved::$variant(state) => {
                        tuple.serialize_element(<$kind>::NAME)?;
                        tuple.serialize_element(state)?;
                    })*
                }
                tuple.end()
            }
        }

        impl<'de> Deserialize<'de> for Saved {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visit;
                impl<'de> serde::de::Visitor<'de> for Visit {
                    type Value = Saved;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a kind name and its state")
                    }

                    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Saved, A::Error> {
                        use serde::de::Error;
                        let name: String =
                            seq.next_element()?.ok_or_else(|| A::Error::invalid_length(0, &self))?;
                        match name.as_str() {
                            $(<$kind>::NAME => Ok(Saved::$variant(
                                seq.next_element()?.ok_or_else(|| A::Error::invalid_length(1, &self))?,
                            )),)*
                            _ => Err(A::Error::custom(decoding::unknown_kind(&name))),
                        }
                    }
                }
                deserializer.deserialize_tuple(2, Visit)
            }
        }
    };
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl Kind {
    pub fn is_pipe_like(self) -> bool {
        matches!(self, Kind::Pipe | Kind::Fifo)
    }

    /// Every socket kind: a socket has no file offset (`ls` leaves the column blank).
    pub fn is_socket(self) -> bool {
        matches!(self, Kind::Unix | Kind::Inet | Kind::Socket)
    }
}

// The registry: one line per kind, in recognition order (the first kind that
// recognises a file takes it). Adding a kind is adding its module (and `pub mod` line
// above) and its line here.
registry! {
    Pipe => pipe::Pipe,
    Fifo => fifo::Fifo,
    Eventfd => eventfd::Eventfd,
    Pidfd => pidfd::Pidfd,
    Inotify => inotify::Inotify,
    Epoll => epoll::Epoll,
    Memfd => memfd::Memfd,
    Timerfd => timerfd::Timerfd,
    Signalfd => signalfd::Signalfd,
    Terminal => terminal::Terminal,
    Regular => regular::Regular,
    Directory => directory::Directory,
    CharDevice => device::CharDevice,
    BlockDevice => device::BlockDevice,
    Unix => unix::Unix,
    Inet => inet::Inet,
    Socket => socket::OtherSocket,
    Fanotify => fanotify::Fanotify,
    Anon => opaque::Anon,
    Other => opaque::Other,
}
