//! Fuzzes `crd::harvest::bpf::decode`, the ring-buffer record decoder: any bytes give
//! exactly one task or fd record, or a one-line error, and never a panic.
#![no_main]

use crd::harvest::{Harvest, bpf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The bias is 0 or 1 on real kernels (see crd_common::Config::file_ref_bias).
    for bias in [0, 1] {
        let mut harvest = Harvest::default();
        match bpf::decode(data, bias, &mut harvest) {
            Ok(()) => assert_eq!(harvest.tasks.len() + harvest.fds.len(), 1, "one record, one entry"),
            Err(e) => {
                assert!(!e.to_string().contains('\n'), "a rejection in more than one line: {e}");
                assert!(harvest.tasks.is_empty() && harvest.fds.is_empty(), "nothing from a bad record");
            }
        }
    }
});
