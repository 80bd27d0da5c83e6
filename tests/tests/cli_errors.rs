//! Operators get clear messages, not bare error codes.

use std::process::Command;

use relay_tests::{relay_bin, require_root, Netns};

#[test]
fn help_prints_usage() {
    let out = Command::new(relay_bin())
        .arg("--help")
        .output()
        .expect("run relay");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Usage: relay"), "{text}");
    assert!(text.contains("serve"), "{text}");
}

#[test]
fn native_xdp_on_an_interface_without_it_explains_the_alternatives() {
    require_root();
    // A bridge is an Ethernet device without native XDP support: the attach fails and the
    // hint must name generic mode.
    let ns = Netns::new("rte");
    ns.ip(&["link", "add", "rtebr0", "type", "bridge"]);
    ns.ip(&["link", "set", "rtebr0", "up"]);
    let out = ns
        .command(relay_bin().to_str().expect("utf-8 path"))
        .args(["serve", "--fastpath", "xdp", "--interface", "rtebr0"])
        .output()
        .expect("run relay");
    assert!(
        !out.status.success(),
        "attach to a bridge in native mode unexpectedly worked"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("attaching XDP in xdp (native) mode to `rtebr0` failed"),
        "{stderr}"
    );
    assert!(stderr.contains("--fastpath xdp-generic"), "{stderr}");
}

#[test]
fn a_non_ethernet_interface_is_refused_by_name() {
    require_root();
    // Loopback frames have no Ethernet header: the program would read IP bytes as one.
    let ns = Netns::new("rte");
    for mode in ["xdp", "xdp-generic", "tc"] {
        let out = ns
            .command(relay_bin().to_str().expect("utf-8 path"))
            .args(["serve", "--fastpath", mode, "--interface", "lo"])
            .output()
            .expect("run relay");
        assert!(!out.status.success(), "{mode} on lo unexpectedly worked");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("`lo` is not an Ethernet interface"),
            "{mode}: {stderr}"
        );
    }
}

#[test]
fn unknown_interface_is_named() {
    require_root();
    let ns = Netns::new("rte");
    let out = ns
        .command(relay_bin().to_str().expect("utf-8 path"))
        .args(["serve", "--fastpath", "xdp", "--interface", "nosuchif0"])
        .output()
        .expect("run relay");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no network interface named `nosuchif0`"),
        "{stderr}"
    );
}

/// The systemd unit in deploy/ passes `systemd-analyze verify` (offline: PID 1 need not be
/// systemd), with its ExecStart pointed at the binary under test.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/systemd/relay.service"
    ))
    .expect("deploy/systemd/relay.service");
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    let dir = std::env::temp_dir().join(format!("relay-test-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("unit directory");
    let path = dir.join("relay.service");
    let bin = relay_tests::relay_bin();
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/relay", bin.to_str().expect("UTF-8 path")),
    )
    .expect("write unit");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd)");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

/// deploy/kubernetes/relay.yaml passes kubernetes-validate's strict schema check (offline;
/// installed by `cargo xtask setup`), and every flag it gives the relay is one `relay serve`
/// knows.
#[test]
fn the_kubernetes_manifest_validates() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/relay.yaml"
    );
    let out = std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet", path])
        .output()
        .expect("python3 -m kubernetes_validate (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = std::fs::read_to_string(path).expect("manifest");
    let help = std::process::Command::new(relay_tests::relay_bin())
        .args(["serve", "--help"])
        .output()
        .expect("relay serve --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = manifest
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- --"))
        .collect();
    assert!(flags.len() >= 4, "{flags:?}");
    for flag in flags {
        assert!(
            help.contains(&format!("--{flag}")),
            "relay serve has no --{flag}"
        );
    }
}

/// Issue 12 item 9: a secrets file that cannot be read stops the start with a message naming
/// the flag and the file (root reads any file, so a missing file and a directory stand in for
/// an unreadable one), and a bad line is named by number without echoing the secret.
#[test]
fn unreadable_secret_files_are_named() {
    let dir = std::env::temp_dir().join(format!("relay-cli-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let missing = dir.join("no-such-file");
    let bad_users = dir.join("users");
    std::fs::write(&bad_users, "alice:fine\nbob-has-no-password-secret\n").expect("write");
    let missing_text = missing.display().to_string();
    let dir_text = dir.display().to_string();
    let bad_text = bad_users.display().to_string();
    for (args, expect) in [
        (
            ["--auth-secret-file", missing_text.as_str()],
            format!("cannot read --auth-secret-file {missing_text}"),
        ),
        (
            ["--users-file", dir_text.as_str()],
            format!("cannot read --users-file {dir_text}"),
        ),
        (
            ["--users-file", bad_text.as_str()],
            format!("--users-file {bad_text} line 2"),
        ),
    ] {
        let out = Command::new(relay_bin())
            .arg("serve")
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .output()
            .expect("run relay");
        assert!(!out.status.success(), "{args:?} unexpectedly started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("bob-has-no-password-secret"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_help_documents_the_hardening_flags() {
    let out = Command::new(relay_bin())
        .args(["serve", "--help"])
        .output()
        .expect("run relay");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--auth-secret-file",
        "--users-file",
        "RELAY_AUTH_SECRET",
        "--unauth-rate-bytes",
        "--unauth-burst-bytes",
        "--max-allocations ",
        "--max-allocations-per-user",
        "--allow-peer-unsafe",
        "--nat64-prefix",
    ] {
        assert!(
            text.contains(flag),
            "{flag} missing from serve --help:\n{text}"
        );
    }
}
