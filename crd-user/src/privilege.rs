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
//! refusal; crd never refuses on its own guess.
use std::fs;

use crate::{
    checkpoint::CheckpointError,
    freeze::FreezeError,
    harvest::{HarvestError, bpf::BpfError},
    types::Tgid,
};

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

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot load crd's BPF programs: crd lacks {missing}; run it as root, or use --source procfs")]
    Bpf { missing: String },
    #[error(
        "not allowed to trace PID {tgid} (owned by uid {uid}): crd lacks CAP_SYS_PTRACE; run it as root, or checkpoint your own processes"
    )]
    Ptrace { tgid: Tgid, uid: String },
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

/// A harvester load error, with the missing capabilities named if that is why it failed.
pub fn explain_harvest(e: HarvestError) -> CheckpointError {
    if let HarvestError::Bpf(BpfError::NotPermitted(_)) = &e {
        let lacking = missing(&[Cap::Bpf, Cap::Perfmon]);
        if !lacking.is_empty() {
            return PrivilegeError::Bpf { missing: list(&lacking) }.into();
        }
    }
    e.into()
}

/// A freeze error, with the missing capability named if that is why it failed.
pub fn explain_freeze(e: FreezeError) -> CheckpointError {
    if let FreezeError::NotPermitted(tgid) = &e
        && !missing(&[Cap::SysPtrace]).is_empty()
    {
        let uid = fs::metadata(format!("/proc/{}", tgid.0))
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m).to_string())
            .unwrap_or_else(|_| "?".into());
        return PrivilegeError::Ptrace { tgid: *tgid, uid }.into();
    }
    e.into()
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
}
