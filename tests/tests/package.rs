//! `cargo xtask package`: the Debian package installs on this machine, its unit verifies
//! offline (PID 1 here is not systemd, so no unit can be started), the installed binary runs
//! with the installed config the way the unit's ExecStart runs it, and removal takes it all
//! away (a purge also the conffile). Root: dpkg and a network namespace of its own.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use relay_tests::{relay_bin, require_root, run, Netns};

/// Purges the package when the test ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "relay"]).output();
    }
}

#[test]
fn the_debian_package_installs_verifies_runs_and_removes() {
    require_root();
    let out = std::env::temp_dir().join(format!("relay-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let xtask = relay_bin().with_file_name("xtask");
    let mut package = if xtask.exists() {
        Command::new(xtask)
    } else {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut c = Command::new(cargo);
        c.args(["run", "--quiet", "-p", "xtask", "--"]);
        c
    };
    let status = package
        .args(["package", "--fast", "--binary"])
        .arg(relay_bin())
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run cargo xtask package");
    assert!(status.success(), "cargo xtask package failed");
    let deb = std::fs::read_dir(&out)
        .expect("package directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");

    let installed = Installed;
    run("dpkg", &["-i", deb.to_str().expect("UTF-8 path")]);
    for path in [
        "/usr/bin/relay",
        "/lib/systemd/system/relay.service",
        "/etc/relay/relay.toml",
    ] {
        assert!(Path::new(path).exists(), "{path} installed");
    }
    let verify = Command::new("systemd-analyze")
        .args(["verify", "/lib/systemd/system/relay.service"])
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "{stderr}"
    );
    let unit = std::fs::read_to_string("/lib/systemd/system/relay.service").expect("unit");
    let exec_start = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert_eq!(
        exec_start,
        "/usr/bin/relay serve --config /etc/relay/relay.toml"
    );

    // ExecStart, in a namespace of its own (the installed config listens on loopback ports
    // other tests may use).
    let ns = Netns::new("relay-pkg-");
    let mut argv: Vec<&str> = vec!["netns", "exec", ns.name()];
    argv.extend(exec_start.split_whitespace());
    let mut relay = Command::new("ip")
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the installed relay");
    let stderr = relay.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    let running = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
                if line.contains("relay running") {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    // SAFETY: kill only signals our own child.
    unsafe { libc::kill(relay.id() as i32, libc::SIGTERM) };
    let exit = relay.wait().expect("wait");
    assert!(running, "the installed relay did not start:\n{log}");
    assert!(exit.success(), "exit {exit} after SIGTERM:\n{log}");
    assert!(log.contains("listening on udp 127.0.0.1:3478"), "{log}");

    run("dpkg", &["-r", "relay"]);
    assert!(!Path::new("/usr/bin/relay").exists(), "binary removed");
    assert!(
        !Path::new("/lib/systemd/system/relay.service").exists(),
        "unit removed"
    );
    assert!(
        Path::new("/etc/relay/relay.toml").exists(),
        "dpkg -r keeps the conffile"
    );
    run("dpkg", &["--purge", "relay"]);
    assert!(!Path::new("/etc/relay/relay.toml").exists(), "purged");
    drop(installed);
    let _ = std::fs::remove_dir_all(&out);
}
