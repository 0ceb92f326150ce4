//! The access rule: the service does for a client only what `crd` run by that client
//! could do (docs/service.md).
//!
//! The socket tells who the client is (SO_PEERCRED, SO_PEERGROUPS, read once when it
//! connects). A client may list, checkpoint or graft a process only if it could ptrace
//! it itself, by the kernel's own rule (`__ptrace_may_access` and Yama): root with
//! CAP_SYS_PTRACE may (but not at Yama scope 3); anyone else only a process whose real,
//! effective and saved uids all are the client's uid and gids its gid, that is dumpable
//! (its /proc directory is then owned by its euid, else by root), and that Yama allows:
//! scope 1, only the client's descendants; 2 and 3, none. A PR_SET_PTRACER exception
//! a target made is not visible from outside, so the service never grants it: it only
//! ever narrows. A client may restore only an image it owns.
use std::{fs, os::fd::AsFd, os::unix::fs::MetadataExt, path::Path};

use super::identity::FsIdentity;
use crate::{admission::Refused, types::Tgid};

/// Who is on the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (SO_PEERGROUPS).
    pub groups: Vec<u32>,
    /// Root with CAP_SYS_PTRACE in its effective set: may trace anything Yama lets root.
    pub privileged: bool,
}

/// SO_PEERGROUPS, from <asm-generic/socket.h>.
const SO_PEERGROUPS: libc::c_int = 59;

impl Peer {
    /// The credentials of the process at the other end of `socket`.
    pub fn of(socket: &impl AsFd) -> std::io::Result<Self> {
        let creds = nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::PeerCredentials)?;
        let (pid, uid, gid) = (creds.pid(), creds.uid(), creds.gid());
        let privileged = uid == 0 && has_cap_sys_ptrace(pid);
        Ok(Peer { pid, uid, gid, groups: peer_groups(socket), privileged })
    }

    /// Whether the client may trace `tgid`, by the rule above.
    pub fn may_trace(&self, tgid: Tgid) -> Result<(), Refused> {
        let facts = Target::of(tgid, self.pid).ok_or_else(|| {
            Refused(format!("no process with PID {tgid}: check the PID (it may have exited)"))
        })?;
        decide(self, &facts, yama_scope()).map_err(|why| Refused(why.message(self, tgid, &facts)))
    }

    /// The client's file-system identity (images are written with it).
    pub fn identity(&self) -> FsIdentity {
        FsIdentity { uid: self.uid, gid: self.gid, groups: self.groups.clone() }
    }

    /// Whether the client may restore the image at `path`: it owns it (root with
    /// CAP_SYS_PTRACE may restore any). The path is looked at as the client, so the
    /// answer tells nothing of a file the client could not see; a path it cannot see is
    /// left to the restore, which says why as the client.
    pub fn may_restore(&self, path: &Path) -> Result<(), Refused> {
        if self.privileged {
            return Ok(());
        }
        let identity = self.identity();
        let meta = if identity.differs_from_this_process() {
            identity.run(|| fs::metadata(path)).map_err(std::io::Error::from).and_then(|m| m)
        } else {
            fs::metadata(path)
        };
        match meta {
            Ok(meta) if meta.uid() != self.uid => Err(Refused(format!(
                "access denied: the image {} belongs to uid {}, not to uid {}: the service restores only a client's own images",
                path.display(),
                meta.uid(),
                self.uid
            ))),
            _ => Ok(()),
        }
    }
}

/// What the rule looks at in a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Real, effective, saved.
    pub uids: [u32; 3],
    pub gids: [u32; 3],
    /// Owner of /proc/PID: its euid if it is dumpable, else root.
    pub proc_owner: u32,
    /// The client is among its ancestors.
    pub descends_from_client: bool,
}

impl Target {
    fn of(tgid: Tgid, client: i32) -> Option<Self> {
        let status = fs::read_to_string(format!("/proc/{}/status", tgid.0)).ok()?;
        let proc_owner = fs::metadata(format!("/proc/{}", tgid.0)).ok()?.uid();
        Some(Target {
            uids: ids(&status, "Uid:")?,
            gids: ids(&status, "Gid:")?,
            proc_owner,
            descends_from_client: descends_from(tgid, client),
        })
    }
}

/// Why a client may not trace a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    OtherUser,
    NotDumpable,
    Yama(u32),
}

impl Why {
    fn message(self, peer: &Peer, tgid: Tgid, target: &Target) -> String {
        let who = format!("access denied: uid {} may not trace PID {tgid}", peer.uid);
        match self {
            Why::OtherUser => format!(
                "{who} (owned by uid {}): the service does for a client only what the client's own crd could",
                target.uids[1]
            ),
            Why::NotDumpable => {
                format!("{who}: it is not dumpable (PR_SET_DUMPABLE 0): only CAP_SYS_PTRACE may")
            }
            Why::Yama(1) => format!(
                "{who}: kernel.yama.ptrace_scope is 1 and it is not a descendant of the client (PID {})",
                peer.pid
            ),
            Why::Yama(2) => format!("{who}: kernel.yama.ptrace_scope is 2: only CAP_SYS_PTRACE may trace"),
            Why::Yama(scope) => {
                format!("{who}: kernel.yama.ptrace_scope is {scope}: no process may be traced")
            }
        }
    }
}

/// The rule, on facts read beforehand (`yama`: None without Yama).
pub fn decide(peer: &Peer, target: &Target, yama: Option<u32>) -> Result<(), Why> {
    let yama = yama.unwrap_or(0);
    if yama >= 3 {
        return Err(Why::Yama(yama));
    }
    if peer.privileged {
        return Ok(());
    }
    if target.uids.iter().any(|&u| u != peer.uid) || target.gids.iter().any(|&g| g != peer.gid) {
        return Err(Why::OtherUser);
    }
    if target.proc_owner != peer.uid {
        return Err(Why::NotDumpable);
    }
    match yama {
        0 => Ok(()),
        1 if target.descends_from_client => Ok(()),
        scope => Err(Why::Yama(scope)),
    }
}

fn yama_scope() -> Option<u32> {
    fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok()?.trim().parse().ok()
}

/// Whether `ancestor` is among `tgid`'s ancestors (PPid links up to init).
fn descends_from(tgid: Tgid, ancestor: i32) -> bool {
    let mut pid = tgid.0 as i32;
    for _ in 0..4096 {
        let Some(parent) = fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse::<i32>().ok())
        }) else {
            return false;
        };
        if parent == ancestor {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        pid = parent;
    }
    false
}

/// The first three ids (real, effective, saved) of a /proc/PID/status `Uid:` or `Gid:` line.
fn ids(status: &str, key: &str) -> Option<[u32; 3]> {
    let mut values = status.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().map(str::parse);
    Some([values.next()?.ok()?, values.next()?.ok()?, values.next()?.ok()?])
}

fn has_cap_sys_ptrace(pid: i32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    eff & (1 << crate::privilege::Cap::SysPtrace.number()) != 0
}

/// The peer's supplementary groups; none if the kernel does not say (never more than
/// it has).
fn peer_groups(socket: &impl AsFd) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: `groups` has room for `len` bytes, and the kernel writes at most that many
    // and says how many it wrote.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / size_of::<libc::gid_t>());
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32) -> Peer {
        Peer { pid: 100, uid, gid: uid, groups: vec![], privileged: false }
    }

    fn owned_by(uid: u32) -> Target {
        Target { uids: [uid; 3], gids: [uid; 3], proc_owner: uid, descends_from_client: false }
    }

    #[test]
    fn a_user_may_trace_only_its_own_dumpable_processes() {
        assert_eq!(decide(&user(1000), &owned_by(1000), Some(0)), Ok(()));
        assert_eq!(decide(&user(1000), &owned_by(0), Some(0)), Err(Why::OtherUser));
        // A setuid program the user started: its saved uid is root's.
        let setuid = Target { uids: [1000, 1000, 0], ..owned_by(1000) };
        assert_eq!(decide(&user(1000), &setuid, Some(0)), Err(Why::OtherUser));
        let other_group = Target { gids: [1000, 5, 1000], ..owned_by(1000) };
        assert_eq!(decide(&user(1000), &other_group, None), Err(Why::OtherUser));
        let undumpable = Target { proc_owner: 0, ..owned_by(1000) };
        assert_eq!(decide(&user(1000), &undumpable, Some(0)), Err(Why::NotDumpable));
    }

    #[test]
    fn yama_narrows_as_it_does_for_ptrace() {
        let child = Target { descends_from_client: true, ..owned_by(1000) };
        assert_eq!(decide(&user(1000), &child, Some(1)), Ok(()));
        assert_eq!(decide(&user(1000), &owned_by(1000), Some(1)), Err(Why::Yama(1)));
        assert_eq!(decide(&user(1000), &child, Some(2)), Err(Why::Yama(2)));
        let root = Peer { privileged: true, ..user(0) };
        assert_eq!(decide(&root, &owned_by(1000), Some(2)), Ok(()));
        assert_eq!(decide(&root, &owned_by(1000), Some(3)), Err(Why::Yama(3)));
        // Root without CAP_SYS_PTRACE is a user like another.
        assert_eq!(decide(&user(0), &owned_by(1000), Some(0)), Err(Why::OtherUser));
    }

    #[test]
    fn the_refusal_is_one_line_naming_the_process_and_its_owner() {
        let why = decide(&user(65534), &owned_by(0), Some(0)).unwrap_err();
        let line = why.message(&user(65534), Tgid(42), &owned_by(0));
        assert_eq!(
            line,
            "access denied: uid 65534 may not trace PID 42 (owned by uid 0): the service does for a client only what the client's own crd could"
        );
    }

    #[test]
    fn a_process_descends_from_its_parent_and_not_from_a_stranger() {
        let me = std::process::id();
        let parent = std::os::unix::process::parent_id() as i32;
        assert!(descends_from(Tgid(me), parent));
        assert!(!descends_from(Tgid(me), me as i32));
    }
}
