//! Writing an image as the client: the service is root, the client may not be, and a
//! root service must not let a user write an image where that user could not.
//!
//! Linux keeps a file-system identity per thread (fsuid, fsgid, and the supplementary
//! groups, when set with the raw system calls rather than glibc's process-wide
//! wrappers). The worker thread takes on the client's for the one call that writes the
//! image: the kernel then checks every path step as the client's own `crd` would have
//! (dropping CAP_DAC_OVERRIDE and the other file capabilities while fsuid is not 0),
//! and the image is created owned by the client. Everything else (ptrace, BPF,
//! /proc) keeps the service's identity. The old identity is restored when the write
//! returns, on every path.
use std::path::Path;

use crate::{
    commands::ImageWriter,
    image::{self, ImageBody, ImageError},
};

/// The file-system identity to write as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsIdentity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl FsIdentity {
    /// Runs `f` on this thread with this file-system identity, and the thread's own
    /// identity back afterwards. `f` must not yield to other work on the thread (no
    /// `.await` inside): it runs as the client until it returns.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, nix::errno::Errno> {
        let _as = Assumed::take(self)?;
        Ok(f())
    }

    /// Whether this process must take on the identity to act as the client: it is
    /// root and the client is not.
    pub fn differs_from_this_process(&self) -> bool {
        let me = nix::unistd::geteuid().as_raw();
        me == 0 && self.uid != me
    }
}

/// Writes images as the client: with its file-system identity, or as the service is when
/// the client is the service's own user (or the service cannot change identity: it is
/// not root, and then only its own user can reach its socket).
pub struct AsClient(pub Option<FsIdentity>);

impl AsClient {
    /// How to write for a client with these ids.
    pub fn new(identity: FsIdentity) -> Self {
        Self(identity.differs_from_this_process().then_some(identity))
    }
}

impl ImageWriter for AsClient {
    fn write(&self, path: &Path, body: &ImageBody) -> Result<(), ImageError> {
        let Some(identity) = &self.0 else { return image::write(path, body) };
        let name = path.display().to_string();
        identity
            .run(|| image::write(path, body))
            .map_err(|e| ImageError::Write { path: name, source: std::io::Error::from(e) })?
    }
}

/// This thread's file-system identity while it is held; the old one when dropped.
struct Assumed {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

impl Assumed {
    fn take(to: &FsIdentity) -> Result<Self, nix::errno::Errno> {
        let old = Assumed {
            // setfsuid/setfsgid return the previous value whatever they are given; an
            // invalid id (-1) changes nothing.
            // SAFETY: both only read this thread's credentials when given -1.
            uid: unsafe { libc::setfsuid(u32::MAX) } as u32,
            // SAFETY: as above.
            gid: unsafe { libc::setfsgid(u32::MAX) } as u32,
            groups: nix::unistd::getgroups()?.into_iter().map(|g| g.as_raw()).collect(),
        };
        // `old` restores this thread's identity if a step below fails. Groups and gid
        // first, so there is no moment with the client's uid and the service's groups.
        set_thread_groups(&to.groups)?;
        set_fsgid(to.gid)?;
        set_fsuid(to.uid)?;
        Ok(old)
    }
}

impl Drop for Assumed {
    fn drop(&mut self) {
        let _ = set_fsuid(self.uid);
        let _ = set_fsgid(self.gid);
        let _ = set_thread_groups(&self.groups);
    }
}

/// setfsuid, checked: it reports no error, so the new value is read back.
fn set_fsuid(uid: u32) -> Result<(), nix::errno::Errno> {
    // SAFETY: setfsuid changes only this thread's credentials.
    unsafe { libc::setfsuid(uid) };
    // SAFETY: -1 only reads them.
    if unsafe { libc::setfsuid(u32::MAX) } as u32 == uid { Ok(()) } else { Err(nix::errno::Errno::EPERM) }
}

fn set_fsgid(gid: u32) -> Result<(), nix::errno::Errno> {
    // SAFETY: setfsgid changes only this thread's credentials.
    unsafe { libc::setfsgid(gid) };
    // SAFETY: -1 only reads them.
    if unsafe { libc::setfsgid(u32::MAX) } as u32 == gid { Ok(()) } else { Err(nix::errno::Errno::EPERM) }
}

/// setgroups for this thread only: the raw system call, not glibc's wrapper, which
/// changes every thread of the process.
fn set_thread_groups(groups: &[libc::gid_t]) -> Result<(), nix::errno::Errno> {
    // SAFETY: the kernel reads `groups.len()` gids from a live slice.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc == 0 { Ok(()) } else { Err(nix::errno::Errno::last()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_written_as_the_client_and_only_where_it_may() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let body = ImageBody {
            header: image::Header::now(crate::harvest::Source::Procfs.into(), false),
            graph: crate::Graph::build(crate::types::Tgid(1), &Default::default(), Default::default()),
        };
        let nobody = FsIdentity { uid: 65534, gid: 65534, groups: vec![] };
        // The writes run on a thread of their own so the test's thread keeps root's identity.
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("root-only");
        std::fs::create_dir(&closed).unwrap();
        std::fs::set_permissions(&closed, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let (refused, written) = std::thread::scope(|s| {
            s.spawn(|| {
                let writer = AsClient(Some(nobody.clone()));
                let refused = writer.write(&closed.join("a.img"), &body);
                let written = writer.write(&open.join("a.img"), &body);
                // The thread is root again afterwards.
                // SAFETY: -1 only reads this thread's fsuid.
                assert_eq!(unsafe { libc::setfsuid(u32::MAX) }, 0);
                (refused.is_err(), written.map_err(|e| e.to_string()))
            })
            .join()
            .unwrap()
        });
        assert!(refused, "nobody may not write into a directory only root may write");
        written.expect("nobody may write into a world-writable directory");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(open.join("a.img")).unwrap().uid(), 65534);
    }
}
