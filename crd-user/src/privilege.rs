//! Privilege: when the kernel says no, say which capability crd lacks.
//!
//! crd needs CAP_BPF and CAP_PERFMON to load its iterators (`--source bpf`; CAP_SYS_ADMIN
//! stands in for both), and CAP_SYS_PTRACE to freeze and read another user's processes
//! (ptrace, /proc/PID/fdinfo and `pidfd_getfd` all make the kernel's ptrace access
//! check, which crd never works around). Its own processes need no capability with
//! `--source procfs`. crd does not need CAP_CHECKPOINT_RESTORE: it sets no PIDs and
//! reads no map_files.
//!
//! The capabilities are only consulted *after* the kernel refused, to explain the
//! refusal; crd never refuses on its own guess. The diagnosis is made where the error is
//! built ([`PtraceRefusal::of`] in the freeze), so no later layer replaces the hint.
use std::fs;

use crate::types::Tgid;

/// A Linux capability crd may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    SysPtrace,
    SysAdmin,
    Perfmon,
    Bpf,
    CheckpointRestore,
}

impl Cap {
    /// The capability's number (linux/capability.h).
    pub fn number(self) -> u32 {
        match self {
            Cap::SysPtrace => 19,
            Cap::SysAdmin => 21,
            Cap::Perfmon => 38,
            Cap::Bpf => 39,
            Cap::CheckpointRestore => 40,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
            Cap::CheckpointRestore => "CAP_CHECKPOINT_RESTORE",
        }
    }

    /// Whether the kernel accepts CAP_SYS_ADMIN in its place (bpf_capable,
    /// perfmon_capable, checkpoint_restore_ns_capable).
    fn sys_admin_will_do(self) -> bool {
        matches!(self, Cap::Perfmon | Cap::Bpf | Cap::CheckpointRestore)
    }
}

/// Why the kernel's ptrace access check refused crd, lacking CAP_SYS_PTRACE, a process:
/// the message of [`FreezeError::NotPermitted`](crate::freeze::FreezeError::NotPermitted).
///
/// The kernel lets a tracer without CAP_SYS_PTRACE attach only to a process whose user
/// and group ids (real, effective, saved) all equal its own, that is dumpable, and that
/// Yama (`kernel.yama.ptrace_scope`) allows: 1 only a descendant, 2 none, 3 none even
/// with the capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtraceRefusal {
    pub tgid: Tgid,
    /// The process's effective uid, if /proc still shows it.
    pub uid: Option<u32>,
    pub reason: PtraceReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PtraceReason {
    /// Another user's (or group's) process: only CAP_SYS_PTRACE would do.
    OtherUser,
    /// crd's user's own process, but Yama restricts ptrace to this scope.
    Yama(u32),
    /// crd's user's own process, not dumpable (PR_SET_DUMPABLE 0) or protected by a
    /// security module.
    Guarded,
}

impl PtraceRefusal {
    /// Diagnoses the refusal to trace `tgid` from /proc: whose it is, and Yama's scope.
    pub fn of(tgid: Tgid) -> Self {
        let status = fs::read_to_string(format!("/proc/{}/status", tgid.0)).unwrap_or_default();
        let (uids, gids) = (ids(&status, "Uid:"), ids(&status, "Gid:"));
        // PTRACE_ATTACH compares the tracer's real ids.
        let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
        let own = uids.is_some_and(|u| u.iter().all(|&id| id == uid))
            && gids.is_some_and(|g| g.iter().all(|&id| id == gid));
        let yama =
            fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok().and_then(|s| s.trim().parse().ok());
        Self { tgid, uid: uids.map(|[_, effective, _]| effective), reason: PtraceReason::of(own, yama) }
    }
}

impl PtraceReason {
    /// The reason, from whether the process is crd's user's own and Yama's scope (None:
    /// no Yama).
    pub fn of(own: bool, yama_scope: Option<u32>) -> Self {
        match yama_scope {
            _ if !own => PtraceReason::OtherUser,
            Some(scope) if scope > 0 => PtraceReason::Yama(scope),
            _ => PtraceReason::Guarded,
        }
    }
}

impl std::fmt::Display for PtraceRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not allowed to trace PID {} (owned by uid ", self.tgid)?;
        match self.uid {
            Some(uid) => write!(f, "{uid}): ")?,
            None => f.write_str("?): ")?,
        }
        match self.reason {
            PtraceReason::OtherUser => {
                f.write_str("crd lacks CAP_SYS_PTRACE; run it as root, or checkpoint your own processes")
            }
            PtraceReason::Yama(1) => f.write_str(
                "kernel.yama.ptrace_scope is 1: without CAP_SYS_PTRACE crd may trace only its own \
                 descendants, even of its own user; run crd as root, or set kernel.yama.ptrace_scope to 0",
            ),
            PtraceReason::Yama(2) => {
                f.write_str("kernel.yama.ptrace_scope is 2: only CAP_SYS_PTRACE may trace; run crd as root")
            }
            PtraceReason::Yama(scope) => write!(
                f,
                "kernel.yama.ptrace_scope is {scope}: no process may be traced, even by root, until reboot"
            ),
            PtraceReason::Guarded => f.write_str(
                "crd lacks CAP_SYS_PTRACE, which even the owner needs for a process that is not \
                 dumpable (PR_SET_DUMPABLE 0) or that a security module protects; run crd as root",
            ),
        }
    }
}

/// The first three ids (real, effective, saved) of a /proc/PID/status `Uid:` or `Gid:` line.
fn ids(status: &str, key: &str) -> Option<[u32; 3]> {
    let mut values = status.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().map(str::parse);
    Some([values.next()?.ok()?, values.next()?.ok()?, values.next()?.ok()?])
}

/// This process's effective capability set (CapEff of /proc/self/status).
pub fn effective() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Which of `needs` this process lacks (in the order given), per its effective set.
/// Empty if the set cannot be read.
pub fn missing(needs: &[Cap]) -> Vec<Cap> {
    let Some(eff) = effective() else { return Vec::new() };
    let has = |cap: Cap| eff & (1u64 << cap.number()) != 0;
    let covered = |cap: Cap| has(cap) || (cap.sys_admin_will_do() && has(Cap::SysAdmin));
    needs.iter().copied().filter(|&c| !covered(c)).collect()
}

/// "CAP_A", "CAP_A and CAP_B", "CAP_A, CAP_B and CAP_C".
pub fn list(caps: &[Cap]) -> String {
    let names: Vec<&str> = caps.iter().map(|c| c.name()).collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_read_as_english() {
        assert_eq!(list(&[Cap::Bpf]), "CAP_BPF");
        assert_eq!(list(&[Cap::Bpf, Cap::Perfmon]), "CAP_BPF and CAP_PERFMON");
        assert_eq!(
            list(&[Cap::Bpf, Cap::Perfmon, Cap::SysPtrace]),
            "CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE"
        );
    }

    #[test]
    fn the_effective_set_is_readable() {
        assert!(effective().is_some());
    }

    fn refusal(own: bool, yama: Option<u32>) -> String {
        let refusal = PtraceRefusal { tgid: Tgid(42), uid: Some(1000), reason: PtraceReason::of(own, yama) };
        // As the user reads it: through the checkpoint (and graft) errors that wrap it.
        let wrapped = crate::graft::GraftError::Checkpoint(crate::checkpoint::CheckpointError::Freeze(
            crate::freeze::FreezeError::NotPermitted(refusal.clone()),
        ));
        assert_eq!(wrapped.to_string(), refusal.to_string(), "no layer replaces the diagnosis");
        refusal.to_string()
    }

    #[test]
    fn a_ptrace_refusal_says_whose_process_and_what_yama_allows() {
        let prefix = "not allowed to trace PID 42 (owned by uid 1000): ";
        // Another user's process: the capability is the answer, whatever Yama says.
        for yama in [None, Some(0), Some(1), Some(2)] {
            assert_eq!(
                refusal(false, yama),
                format!("{prefix}crd lacks CAP_SYS_PTRACE; run it as root, or checkpoint your own processes")
            );
        }
        // The user's own process: Yama's scope is the hint.
        assert_eq!(
            refusal(true, Some(1)),
            format!(
                "{prefix}kernel.yama.ptrace_scope is 1: without CAP_SYS_PTRACE crd may trace only its own \
                 descendants, even of its own user; run crd as root, or set kernel.yama.ptrace_scope to 0"
            )
        );
        assert!(refusal(true, Some(2)).contains("kernel.yama.ptrace_scope is 2: only CAP_SYS_PTRACE"));
        assert!(refusal(true, Some(3)).contains("kernel.yama.ptrace_scope is 3: no process may be traced"));
        // Without Yama (or at scope 0) an own process is refused for being guarded.
        for yama in [None, Some(0)] {
            assert!(refusal(true, yama).contains("not dumpable (PR_SET_DUMPABLE 0)"), "{yama:?}");
        }
    }

    #[test]
    fn ids_are_read_from_a_status_line() {
        let status = "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t5\t5\t5\t5\n";
        assert_eq!(ids(status, "Uid:"), Some([1000, 1001, 1002]));
        assert_eq!(ids(status, "Gid:"), Some([5, 5, 5]));
        assert_eq!(ids("Uid:\t1\tx\t1\n", "Uid:"), None);
        assert_eq!(ids("", "Uid:"), None);
    }

    #[test]
    fn crd_s_own_process_is_its_own() {
        let me = PtraceRefusal::of(Tgid(std::process::id()));
        assert_eq!(me.uid, Some(nix::unistd::geteuid().as_raw()));
        assert_ne!(me.reason, PtraceReason::OtherUser);
    }
}
