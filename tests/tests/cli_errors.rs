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
