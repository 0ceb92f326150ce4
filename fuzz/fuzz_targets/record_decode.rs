//! Fuzzes `crd::harvest::bpf::decode`, the ring-buffer record decoder: any bytes give
//! exactly one task or fd record (none for an epoll's item, which waits for its epoll),
//! or a one-line error, and never a panic.
//!
//! Each input is decoded twice: as a whole record, and as the tail of a socket's fd
//! record (`TAIL_SOCKET` behind a valid common part), so that random bytes reach the
//! `SocketTail` decoder (family, state, addresses, name length) on every run, not only
//! when a mutation happens to produce a valid common part.
#![no_main]

use crd::harvest::{Harvest, bpf};
use crd_common::{FdRecord, RECORD_EPOLL_ITEM, RECORD_FD, SOCKFS_MAGIC, TAIL_SOCKET};
use libfuzzer_sys::fuzz_target;

/// `S_IFSOCK`: a socket's inode mode.
const S_IFSOCK: u32 = 0o140000;

fn check(record: &[u8]) {
    // The bias is 0 or 1 on real kernels (see crd_common::Config::file_ref_bias).
    for bias in [0, 1] {
        let mut harvest = Harvest::default();
        match bpf::decode(record, bias, &mut harvest) {
            Ok(()) => {
                // An epoll's item record waits in the decoder for its epoll's fd record.
                let tag = record.get(..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                let entries = if tag == Some(RECORD_EPOLL_ITEM) { 0 } else { 1 };
                assert_eq!(harvest.tasks.len() + harvest.fds.len(), entries, "one record, one entry");
            }
            Err(e) => {
                assert!(!e.to_string().contains('\n'), "a rejection in more than one line: {e}");
                assert!(harvest.tasks.is_empty() && harvest.fds.is_empty(), "nothing from a bad record");
            }
        }
    }
}

/// A socket's fd record whose tail is `tail`.
fn socket_record(tail: &[u8]) -> Vec<u8> {
    let common = FdRecord {
        kind: RECORD_FD,
        fd: 3,
        tgid: 1,
        pid: 1,
        file_refs: 1,
        ino: 7,
        inode: 0x50c,
        file: 0xf00,
        i_mode: S_IFSOCK | 0o777,
        sb_magic: SOCKFS_MAGIC,
        tail: TAIL_SOCKET,
        ..Default::default()
    };
    // SAFETY: FdRecord is #[repr(C)] plain old data with its padding spelled out as a
    // field (`_pad`), so all of its bytes are initialised and may be read as u8.
    let bytes = unsafe {
        std::slice::from_raw_parts((&raw const common).cast::<u8>(), std::mem::size_of::<FdRecord>())
    };
    [bytes, tail].concat()
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&socket_record(data));
});
