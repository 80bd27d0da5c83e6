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
    // Loopback has no native XDP support: the attach fails and the hint must name generic mode.
    let ns = Netns::new("rte");
    let out = ns
        .command(relay_bin().to_str().expect("utf-8 path"))
        .args(["serve", "--fastpath", "xdp", "--interface", "lo"])
        .output()
        .expect("run relay");
    assert!(
        !out.status.success(),
        "attach to lo in native mode unexpectedly worked"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("attaching XDP in xdp (native) mode to `lo` failed"),
        "{stderr}"
    );
    assert!(stderr.contains("--fastpath xdp-generic"), "{stderr}");
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
