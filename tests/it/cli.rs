//! The binary's contract: configuration errors exit 2 naming the key; commands run on a state file.

use std::process::Command;

fn pendo_sync() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pendo-sync"))
}

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const EXAMPLE: &str = include_str!("../../config/example.toml");

#[test]
fn configuration_errors_exit_2_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "batch_size = 500",
            "batch_size = 0",
            "pendo.batch_size: must be between 1 and 10000, got 0",
        ),
        ("region = \"us\"", "region = \"mars\"", "pendo.region"),
        ("timeout = \"300s\"", "timeout = \"soon\"", "pendo.timeout"),
        (
            "create_missing = false",
            "create_missing = false\nbatchsize = 3",
            "unknown key `batchsize`",
        ),
        (
            "kind = \"visitor\"",
            "kind = \"account\"",
            "is already mapped by mapping \"sf-accounts\"",
        ),
        (
            "requests_per_10s = 90",
            "requests_per_10s = 0",
            "hubspot.requests_per_10s",
        ),
        (
            "source = \"hubspot\"",
            "source = \"zoho\"",
            "mappings[1].source",
        ),
        (
            "login_url = \"https://login.salesforce.com\"",
            "login_url = \"not a url\"",
            "salesforce.login_url",
        ),
    ];
    for (from, to, expected) in cases {
        assert!(EXAMPLE.contains(from), "{from}");
        let config = write_config(dir.path(), &EXAMPLE.replacen(from, to, 1));
        let out = pendo_sync()
            .arg("--config")
            .arg(&config)
            .arg("status")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{to}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{to}: expected {expected:?} in {stderr}"
        );
    }
}

#[test]
fn a_missing_secret_file_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let text = EXAMPLE.replace("/var/lib/pendo-sync/state.db", state.to_str().unwrap());
    let config = write_config(dir.path(), &text);
    let out = pendo_sync()
        .arg("--config")
        .arg(&config)
        .args(["sync", "--mapping", "sf-accounts"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("_file: cannot read /run/secrets/"),
        "{stderr}"
    );
}

/// The README's first command: the demo runs on loopback with no config and exits 0.
#[test]
fn the_demo_runs_and_finds_the_hand_edits() {
    let out = pendo_sync().arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Pendo requests: 0"), "{stdout}");
    assert!(stdout.contains("exactly the two hand edits"), "{stdout}");
    // A field added to a mapping is filled by the next sync alone, nothing else sent again.
    assert!(
        stdout.contains("1800 `accountname` values sent, 0 other values sent again"),
        "{stdout}"
    );
    assert!(stdout.contains("plantier \"Growth\""), "{stdout}");
    // `why --live` names the hand edit with the value it replaced.
    assert!(
        stdout.contains("verdict: plantier: Pendo was edited after pendo-sync confirmed"),
        "{stdout}"
    );
}

/// `why` reads the state; it never creates one, not even with `--live` (which may keep a
/// rotated token in an existing one).
#[test]
fn why_without_a_state_file_says_so_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let text = EXAMPLE.replace("/var/lib/pendo-sync/state.db", state.to_str().unwrap());
    let config = write_config(dir.path(), &text);
    for live in [false, true] {
        let mut cmd = pendo_sync();
        cmd.arg("--config")
            .arg(&config)
            .args(["why", "account", "001A"]);
        if live {
            cmd.arg("--live");
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("does not exist yet"), "{stderr}");
        assert!(!state.exists(), "why created the state file (live: {live})");
    }
}
