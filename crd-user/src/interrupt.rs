//! The one interruption error.
//!
//! Ctrl-C and SIGTERM only raise a flag; crd stops at its next check, cleans up (resumes
//! its targets, kills unfinished stubs) and fails with an error saying so. Each error
//! type that can say "interrupted" says it in its own words, with [`Interrupted`] as
//! its source, however deep it is wrapped (a checkpoint's inside a graft's, a BPF
//! harvest's inside `ls`'s). So a caller, like the `crd` binary choosing exit status
//! 130, finds it in any error's source chain, and a new wrapper cannot hide it.

/// Crd was interrupted (Ctrl-C, SIGTERM) and stopped after cleaning up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

impl Interrupted {
    /// Whether `error` or any of its sources is an [`Interrupted`].
    pub fn caused(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut next = Some(error);
        while let Some(e) = next {
            if e.is::<Interrupted>() {
                return true;
            }
            next = e.source();
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        checkpoint::CheckpointError,
        freeze::FreezeError,
        graft::GraftError,
        harvest::{HarvestError, bpf::BpfError},
        ls::LsError,
        restore::RestoreError,
    };

    #[test]
    fn an_interruption_is_found_however_it_is_wrapped() {
        let wrapped: [(&dyn std::error::Error, &str); 5] = [
            (
                &CheckpointError::Interrupted(Interrupted),
                "interrupted; the target was resumed and no image was written",
            ),
            (&RestoreError::Interrupted(Interrupted), "interrupted; every stub was killed"),
            // A graft's checkpoint, interrupted while freezing.
            (
                &GraftError::Checkpoint(CheckpointError::Freeze(FreezeError::Interrupted(Interrupted))),
                "interrupted; every task was resumed",
            ),
            // `ls`'s BPF harvest, and a checkpoint's.
            (&LsError::Harvest(HarvestError::Bpf(BpfError::Interrupted(Interrupted))), "interrupted"),
            (
                &GraftError::Checkpoint(CheckpointError::Harvest(HarvestError::Interrupted(Interrupted))),
                "interrupted",
            ),
        ];
        for (error, message) in wrapped {
            assert!(Interrupted::caused(error), "{error}");
            assert_eq!(error.to_string(), message);
        }
    }

    #[test]
    fn other_errors_are_not_interruptions() {
        let plain = GraftError::Checkpoint(CheckpointError::Freeze(FreezeError::NoSuchProcess(
            crate::types::Tgid(1),
        )));
        assert!(!Interrupted::caused(&plain));
        assert!(!Interrupted::caused(&LsError::NothingToList));
    }
}
