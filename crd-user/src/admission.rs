//! Admission: which processes a command may freeze or list on behalf of whoever asked.
//!
//! Run by a user, crd needs no rule of its own: the kernel's ptrace access check decides
//! ([`Admission::Kernel`]). Run by the service for a client ([`crate::serve`]), crd is
//! root and the kernel would let it touch anything, so the service admits only the
//! processes the client could trace itself ([`Admission::Only`]), checked before each
//! process is seized (the root and every descendant a `--tree` finds) or listed.
use std::sync::Arc;

use crate::types::Tgid;

/// Why a process was not admitted: one line naming it and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The rule a command's targets must pass.
#[derive(Clone, Default)]
pub enum Admission {
    /// Whatever the kernel lets crd do (crd runs as the user who asked).
    #[default]
    Kernel,
    /// Only processes this rule admits (the service, for a client).
    Only(Arc<dyn Fn(Tgid) -> Result<(), Refused> + Send + Sync>),
}

impl Admission {
    /// Whether `tgid` may be frozen or listed.
    pub fn check(&self, tgid: Tgid) -> Result<(), Refused> {
        match self {
            Admission::Kernel => Ok(()),
            Admission::Only(rule) => rule(tgid),
        }
    }

    /// Whether every process passes (no per-process check is needed).
    pub fn admits_everyone(&self) -> bool {
        matches!(self, Admission::Kernel)
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Admission::Kernel => "Admission::Kernel",
            Admission::Only(_) => "Admission::Only(..)",
        })
    }
}
