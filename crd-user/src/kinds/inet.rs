//! TCP and UDP sockets over IPv4 and IPv6.
//!
//! - Recognised by a sockfs inode of family AF_INET or AF_INET6 carrying TCP or UDP.
//! - Live: [`SocketFacts`] (BPF: `sock_common` addresses and ports; /proc: sock_diag).
//! - `ls` names them as lsof does: `TCP 127.0.0.1:8080 (LISTEN)`, `UDP *:5353`,
//!   `TCP 10.0.0.1:22->10.0.0.2:51234 (ESTABLISHED)`.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{
    FileKind, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Recognise,
    socket::{Family, SockType, SocketFacts, state},
};

pub struct Inet;

/// Which transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    Tcp,
    Udp,
}

/// What an image holds of a TCP or UDP socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InetState {
    pub transport: Transport,
    pub ipv6: bool,
    /// `sk_state` (TCP_* numbering; UDP: CLOSE, or ESTABLISHED when connected).
    pub state: u8,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    /// A listener's backlog.
    pub backlog: u32,
    /// Connections waiting to be accepted on a listener.
    pub pending: u32,
}

impl Transport {
    fn of(facts: &SocketFacts) -> Option<Self> {
        match (facts.sock_type, i32::from(facts.protocol)) {
            (SockType::Stream, libc::IPPROTO_TCP) => Some(Transport::Tcp),
            (SockType::Dgram, libc::IPPROTO_UDP) => Some(Transport::Udp),
            _ => None,
        }
    }
}

impl FileKind for Inet {
    const NAME: &'static str = "inet";
    const HAS_PATH: bool = false;
    type Live = SocketFacts;
    type Saved = InetState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFSOCK
            && matches!(r.family.map(Family::from_raw), Some(Family::Inet | Family::Inet6))
    }

    fn from_bpf(_record: &crd_common::FdRecord, tail: &[u8]) -> Option<SocketFacts> {
        SocketFacts::from_tail(tail).filter(|f| matches!(f.family, Family::Inet | Family::Inet6) && Transport::of(f).is_some())
    }

    fn from_proc(slot: &ProcSlot<'_>) -> SocketFacts {
        slot.socket.cloned().unwrap_or_else(|| SocketFacts::unknown(Family::Inet))
    }

    fn sketch(live: &SocketFacts) -> InetState {
        InetState {
            transport: Transport::of(live).unwrap_or(Transport::Tcp),
            ipv6: live.family == Family::Inet6,
            state: live.state,
            local: live.local,
            remote: live.remote,
            backlog: live.backlog,
            pending: live.pending,
        }
    }

    fn name(saved: &InetState) -> Option<String> {
        let proto = match saved.transport {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        };
        let mut name = format!("{proto} {}", endpoint(saved.local));
        if let Some(remote) = saved.remote {
            name.push_str(&format!("->{}", endpoint(Some(remote))));
        }
        if saved.transport == Transport::Tcp {
            name.push_str(&format!(" ({})", tcp_state_name(saved.state)));
        }
        Some(name)
    }

    fn detail(saved: &InetState) -> Option<String> {
        let family = if saved.ipv6 { "IPv6" } else { "IPv4" };
        Some(match saved.state {
            state::LISTEN => format!("{family} backlog {} pending {}", saved.backlog, saved.pending),
            _ => family.to_string(),
        })
    }

    fn refusal(_saved: &InetState) -> Option<String> {
        super::not_supported("TCP and UDP sockets")
    }

    fn open(saved: &InetState, _args: &OpenArgs<'_>, _store: &mut ObjectStore) -> Result<Opened, KindError> {
        Err(KindError::Other(Self::refusal(saved).unwrap_or_default()))
    }

    fn same(a: &InetState, b: &InetState) -> Result<(), String> {
        if a != b {
            return Err(format!("inet socket {a:?} vs {b:?}"));
        }
        Ok(())
    }
}

/// An address as lsof prints it: `*` for the wildcard address, IPv6 in brackets.
fn endpoint(addr: Option<SocketAddr>) -> String {
    let Some(addr) = addr else { return "*:*".into() };
    let ip = if addr.ip().is_unspecified() {
        "*".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    let port = if addr.port() == 0 { "*".to_string() } else { addr.port().to_string() };
    format!("{ip}:{port}")
}

/// lsof's TCP state names.
fn tcp_state_name(s: u8) -> &'static str {
    match s {
        state::ESTABLISHED => "ESTABLISHED",
        state::SYN_SENT => "SYN_SENT",
        state::SYN_RECV => "SYN_RECV",
        state::FIN_WAIT1 => "FIN_WAIT1",
        state::FIN_WAIT2 => "FIN_WAIT2",
        state::TIME_WAIT => "TIME_WAIT",
        state::CLOSE => "CLOSED",
        state::CLOSE_WAIT => "CLOSE_WAIT",
        state::LAST_ACK => "LAST_ACK",
        state::LISTEN => "LISTEN",
        state::CLOSING => "CLOSING",
        _ => "UNKNOWN",
    }
}
