//! Exit status of the built binaries on bad arguments (issue 22): 1 like every other
//! failure, with clap's message on stderr; `--help` and `--version` still exit 0. No daemon
//! is needed: arguments are parsed before anything else happens.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn run(binary: &str, args: &[&str]) -> Output {
    Command::new(binary)
        .args(args)
        // A config from the environment must not matter for parsing.
        .env_remove("TANDEM_CONFIG")
        .output()
        .unwrap()
}

fn assert_usage_error(binary: &str, args: &[&str], expected: &str) {
    let out = run(binary, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{binary} {args:?}: {stderr}");
    assert!(
        stderr.contains(expected),
        "{binary} {args:?}: stderr lacks {expected:?}: {stderr}"
    );
    assert!(stderr.contains("Usage:"), "{stderr}");
    assert!(out.stdout.is_empty(), "{binary} {args:?} printed on stdout");
}

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
const TANDEMD: &str = env!("CARGO_BIN_EXE_tandemd");

#[test]
fn an_unknown_option_exits_1_with_clap_s_message() {
    assert_usage_error(TANDEM, &["--bogus"], "unexpected argument '--bogus'");
    assert_usage_error(TANDEMD, &["--bogus"], "unexpected argument '--bogus'");
}

#[test]
fn a_missing_required_argument_exits_1() {
    assert_usage_error(
        TANDEM,
        &["volume", "create", "vm-100-disk-0"],
        "the following required arguments were not provided",
    );
    assert_usage_error(TANDEM, &["volume", "create", "vm-100-disk-0"], "--size");
    // No subcommand at all is a failure too.
    let out = run(TANDEM, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!out.stderr.is_empty());
}

#[test]
fn help_and_version_exit_0_on_stdout() {
    for binary in [TANDEM, TANDEMD] {
        for args in [&["--help"][..], &["--version"]] {
            let out = run(binary, args);
            assert_eq!(out.status.code(), Some(0), "{binary} {args:?}");
            assert!(!out.stdout.is_empty(), "{binary} {args:?}");
            assert!(out.stderr.is_empty(), "{binary} {args:?}");
        }
    }
    let out = run(TANDEM, &["volume", "create", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--size"));
}
