//! The product `crd`, built without crd-user's `testing` feature, holds no test
//! scaffolding: it reads no test environment variable (a root tool must not change
//! behaviour because of a stray one), knows no hidden test command, and its demo works
//! without them. Each check is also made on the testing build, where the scaffolding is
//! present, so that it is seen to tell the two apart.
use std::process::{Command, Output};

use crd_tests::{assert_demo_output, crd_bin, product_bin, require_root};

/// Environment variables only testing builds may name (`CRD_TEST_` covers the hooks'
/// family: CRD_TEST_HOLD_FROZEN_MS, CRD_TEST_FAIL_STUB, ...).
const TEST_VARIABLES: [&str; 5] =
    ["CRD_TEST_", "CRD_RING_BYTES", "CRD_KERNEL_BTF", "CRD_FIXTURE_READY", "CRD_TIMINGS_FILE"];

/// What a testing build names, which the search must find there.
const TESTING_BUILD_HAS: [&str; 4] =
    ["CRD_TEST_HOLD_FROZEN_MS", "CRD_RING_BYTES", "CRD_FIXTURE_READY", "CRD_TIMINGS_FILE"];

/// The hidden test commands.
const TEST_COMMANDS: [&str; 3] = ["fixture", "stress", "bench-harvest"];

/// Which of `needles` (each starting with "CRD_") occur in `haystack`, sorted.
fn occurring<'a>(haystack: &[u8], needles: &[&'a str]) -> Vec<&'a str> {
    assert!(needles.iter().all(|n| n.starts_with("CRD_")));
    let mut found = Vec::new();
    // One pass for the common prefix, then each needle where it occurs.
    let mut rest = haystack;
    while let Some(at) = rest.windows(4).position(|w| w == b"CRD_") {
        for needle in needles {
            if rest[at..].starts_with(needle.as_bytes()) && !found.contains(needle) {
                found.push(*needle);
            }
        }
        rest = &rest[at + 4..];
    }
    found.sort_unstable();
    found
}

fn run(bin: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap_or_else(|e| panic!("{} runs: {e}", bin.display()))
}

#[test]
fn the_product_binary_names_no_test_environment_variable() {
    let product = std::fs::read(product_bin()).expect("the product binary is readable");
    assert_eq!(occurring(&product, &TEST_VARIABLES), Vec::<&str>::new(), "in {}", product_bin().display());
    let testing = std::fs::read(crd_bin()).expect("the testing binary is readable");
    let mut expected = TESTING_BUILD_HAS;
    expected.sort_unstable();
    assert_eq!(occurring(&testing, &TESTING_BUILD_HAS), expected, "in {}", crd_bin().display());
}

#[test]
fn the_product_binary_has_no_test_command() {
    let help = run(&product_bin(), &["--help"]);
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("demo") && help.contains("--btf"), "{help}");
    for command in TEST_COMMANDS {
        assert!(!help.contains(command), "{command} in the product's help:\n{help}");
        let product = run(&product_bin(), &[command, "--help"]);
        let err = String::from_utf8_lossy(&product.stderr);
        assert_eq!(product.status.code(), Some(2), "product {command}: {err}");
        assert!(err.contains(&format!("unrecognized subcommand '{command}'")), "product {command}: {err}");
        let testing = run(&crd_bin(), &[command, "--help"]);
        assert!(testing.status.success(), "testing {command}: {}", String::from_utf8_lossy(&testing.stderr));
    }
}

#[test]
fn the_product_demo_builds_its_tree_without_the_fixture() {
    require_root!();
    assert_demo_output(&run(&product_bin(), &["demo"]));
}
