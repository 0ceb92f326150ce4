//! Embeds the BPF object built by `cargo xtask build` (nightly, bpfel-unknown-none).
//!
//! The object is looked up at `$CRD_BPF_OBJECT`, else at the path xtask builds it to. If
//! it is missing the crate still builds (so `cargo check`/clippy work on stable alone)
//! and `crd` reports at run time that it has no BPF object, pointing at `cargo xtask`.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=CRD_BPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = env::var_os("CRD_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/crd"));
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("crd.bpf.o");
    let bytes = fs::read(&object).unwrap_or_default();
    fs::write(&out, bytes).expect("write OUT_DIR/crd.bpf.o");
}
