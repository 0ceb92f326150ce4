//! `cargo xtask fuzz`: run crd's fuzz targets (fuzz/, cargo-fuzz on the nightly) for a
//! given time each, starting from the committed seed corpus.
//!
//! Installs cargo-fuzz if it is missing. The fuzz build never needs the BPF object:
//! `CRD_BPF_OBJECT` points nowhere, so crd-user's build.rs embeds an empty one. New
//! inputs the fuzzer finds go to target/fuzz-corpus/TARGET (the committed corpus is
//! only read); a crash is saved under fuzz/artifacts/TARGET and fails the task.
use std::{fs, process::Command};

use anyhow::{Context, Result};

use crate::{root, run};

/// The fuzz targets (fuzz/fuzz_targets/*.rs).
pub const TARGETS: &[&str] = &["image_decode", "record_decode"];

/// libFuzzer refuses any single allocation above this (MiB): crd's decoders must stay
/// far below it whatever the input claims.
const MALLOC_LIMIT_MB: u32 = 64;

pub fn fuzz(seconds: u32, targets: &[String]) -> Result<()> {
    ensure_cargo_fuzz()?;
    let root = root();
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            anyhow::ensure!(TARGETS.contains(&t.as_str()), "no fuzz target {t}: choose from {TARGETS:?}");
        }
        targets.iter().map(String::as_str).collect()
    };
    for target in chosen {
        let seeds = root.join("fuzz/corpus").join(target);
        let found = root.join("target/fuzz-corpus").join(target);
        fs::create_dir_all(&found).with_context(|| format!("cannot create {}", found.display()))?;
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        run(fuzz_command()
            // Release speed, with overflow checks and debug assertions kept: an
            // overflow on hostile input is a bug too.
            .args(["run", "--release", "--debug-assertions", target])
            .arg(&found)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
            .arg("-rss_limit_mb=1024")
            .arg("-max_len=65536")
            .arg("-print_final_stats=1"))?;
    }
    Ok(())
}

/// `cargo +nightly fuzz` in fuzz/, with the environment of the outer cargo removed and
/// no BPF object.
fn fuzz_command() -> Command {
    let mut c = Command::new("cargo");
    for var in
        ["RUSTC", "RUSTC_WRAPPER", "RUSTDOC", "CARGO", "RUSTUP_TOOLCHAIN", "CARGO_MANIFEST_DIR", "RUSTFLAGS"]
    {
        c.env_remove(var);
    }
    c.args(["+nightly", "fuzz"])
        .current_dir(root().join("fuzz"))
        .env("CRD_BPF_OBJECT", "/nonexistent/crd.bpf.o")
        // One target dir for every fuzz build, inside the workspace's.
        .env("CARGO_TARGET_DIR", root().join("target/fuzz"));
    c
}

fn ensure_cargo_fuzz() -> Result<()> {
    let present =
        Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !present {
        eprintln!("xtask: installing cargo-fuzz");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}
