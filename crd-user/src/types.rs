//! Small types that carry the kernel's meaning, so a `u64` is never just a `u64`.
use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty), $fmt:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // `pad` so that widths and alignment in format strings apply.
                f.pad(&format!($fmt, self.0))
            }
        }
    };
}

id_type!(
    /// A thread id (`task_struct::pid`) in the initial pid namespace.
    Pid(u32), "{}"
);
id_type!(
    /// A process id: the thread-group id (`task_struct::tgid`).
    Tgid(u32), "{}"
);
id_type!(
    /// A file descriptor number in an fd table.
    Fd(u32), "{}"
);
id_type!(
    /// Identity of a kernel object (`struct file *`, `struct inode *`, ...). Compared,
    /// never dereferenced. The /proc harvester, which sees no pointers, hands out
    /// synthetic identities with the same meaning: equal means the same kernel object.
    KernelPtr(u64), "{:#x}"
);
id_type!(
    /// An object reference in the image: objects are numbered from 1 in first-encounter
    /// order, as linux-cr does.
    ObjRef(u32), "#{}"
);

/// A device number split into major and minor, so the kernel's internal encoding
/// (`major << 20 | minor`) and userspace's (`makedev`) compare equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId {
    pub major: u32,
    pub minor: u32,
}

impl DeviceId {
    /// From the kernel's `dev_t` (`MINORBITS` = 20).
    pub fn from_kernel(dev: u32) -> Self {
        Self { major: dev >> 20, minor: dev & ((1 << 20) - 1) }
    }

    /// From a userspace `st_dev`/`st_rdev`.
    pub fn from_user(dev: u64) -> Self {
        Self { major: libc::major(dev), minor: libc::minor(dev) }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// How an open file description was opened for data: `FMODE_READ`/`FMODE_WRITE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Access {
    pub read: bool,
    pub write: bool,
}

impl Access {
    /// From the kernel's `f_mode` (FMODE_READ = 1, FMODE_WRITE = 2).
    pub fn from_fmode(f_mode: u32) -> Self {
        Self { read: f_mode & 1 != 0, write: f_mode & 2 != 0 }
    }

    /// From open flags, as /proc/PID/fdinfo shows them. O_PATH files have no data access.
    pub fn from_open_flags(flags: u32) -> Self {
        if flags & libc::O_PATH as u32 != 0 {
            return Self { read: false, write: false };
        }
        match flags as i32 & libc::O_ACCMODE {
            libc::O_RDONLY => Self { read: true, write: false },
            libc::O_WRONLY => Self { read: false, write: true },
            _ => Self { read: true, write: true },
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self.read, self.write) {
            (true, true) => "rw",
            (true, false) => "r",
            (false, true) => "w",
            (false, false) => "-",
        })
    }
}
