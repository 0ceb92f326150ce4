//! Unix sockets: stream, datagram and seqpacket; socketpairs, listeners (path and
//! abstract names), connections accepted or still pending, the messages queued in each
//! receive queue, and the fds in flight inside them (SCM_RIGHTS).
//!
//! A connected pair is the seed's nested sharing again: two sockets, each its own inode,
//! each the other's peer. The graph links a socket to its peer as a nested object, so
//! the first encounter of either end makes both (`socketpair`, or connect + accept on a
//! listener of the image) and deposits the other end under its objref.
//!
//! - Recognised by a sockfs inode of family AF_UNIX.
//! - Live: [`SocketFacts`] (BPF: `unix_sock::peer` and `addr`; /proc: sock_diag).
use serde::{Deserialize, Serialize};

use super::{
    FileKind, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Recognise,
    socket::{Family, SockType, SocketFacts, UnixName, state},
};

pub struct Unix;

/// Where a unix socket stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnixStatus {
    /// Neither listening nor connected (a bound or unbound datagram socket, a fresh one).
    Unconnected,
    Listening,
    Connected,
}

impl UnixStatus {
    fn of(facts: &SocketFacts) -> Self {
        match facts.state {
            state::LISTEN => UnixStatus::Listening,
            state::ESTABLISHED => UnixStatus::Connected,
            // A datagram socket connected to another has a peer but no state change.
            _ if facts.peer.is_some() => UnixStatus::Connected,
            _ => UnixStatus::Unconnected,
        }
    }
}

/// What an image holds of a unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixState {
    pub sock_type: SockType,
    pub status: UnixStatus,
    /// `sk_shutdown` bits.
    pub shutdown: u8,
    /// Its own name (getsockname): bound, or for an accepted connection its listener's.
    pub name: UnixName,
    /// The peer's inode number at checkpoint time (for `ls` and `inspect`; the graph
    /// links the peer itself).
    pub peer_ino: Option<u64>,
    /// A listener's backlog.
    pub backlog: u32,
    /// Connections waiting to be accepted on a listener.
    pub pending: u32,
    /// Messages queued for reading, as the harvest counted them.
    pub queued_messages: u32,
}

impl FileKind for Unix {
    const NAME: &'static str = "unix";
    const HAS_PATH: bool = false;
    type Live = SocketFacts;
    type Saved = UnixState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFSOCK && r.family == Some(Family::Unix.raw())
    }

    fn from_bpf(_record: &crd_common::FdRecord, tail: &[u8]) -> Option<SocketFacts> {
        SocketFacts::from_tail(tail).filter(|f| f.family == Family::Unix)
    }

    fn from_proc(slot: &ProcSlot<'_>) -> SocketFacts {
        slot.socket.cloned().unwrap_or_else(|| SocketFacts::unknown(Family::Unix))
    }

    fn sketch(live: &SocketFacts) -> UnixState {
        UnixState {
            sock_type: live.sock_type,
            status: UnixStatus::of(live),
            shutdown: live.shutdown,
            name: live.name.clone(),
            peer_ino: live.peer,
            backlog: live.backlog,
            pending: live.pending,
            queued_messages: live.rqueue,
        }
    }

    fn name(saved: &UnixState) -> Option<String> {
        let name = saved.name.to_string();
        Some(if name.is_empty() { format!("unix type={}", upper(saved.sock_type)) } else { name })
    }

    fn detail(saved: &UnixState) -> Option<String> {
        let mut detail = format!("type={}", upper(saved.sock_type));
        match saved.status {
            UnixStatus::Listening => detail.push_str(&format!(" (LISTEN) backlog {}", saved.backlog)),
            UnixStatus::Connected => detail.push_str(" (CONNECTED)"),
            UnixStatus::Unconnected => {}
        }
        if let Some(ino) = saved.peer_ino {
            detail.push_str(&format!(" ->INO={ino}"));
        }
        if saved.queued_messages != 0 {
            detail.push_str(&format!(" queued {}", saved.queued_messages));
        }
        Some(detail)
    }

    fn refusal(_saved: &UnixState) -> Option<String> {
        super::not_supported("unix sockets")
    }

    fn open(saved: &UnixState, _args: &OpenArgs<'_>, _store: &mut ObjectStore) -> Result<Opened, KindError> {
        Err(KindError::Other(Self::refusal(saved).unwrap_or_default()))
    }

    fn same(a: &UnixState, b: &UnixState) -> Result<(), String> {
        let key = |s: &UnixState| (s.sock_type, s.status, s.shutdown, s.name.clone(), s.backlog);
        if key(a) != key(b) {
            return Err(format!("unix socket {a:?} vs {b:?}"));
        }
        Ok(())
    }
}

/// lsof's type names: STREAM, DGRAM, SEQPACKET.
pub(super) fn upper(t: SockType) -> String {
    t.to_string().to_uppercase()
}
