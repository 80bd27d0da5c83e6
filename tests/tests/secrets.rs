//! Issue 12 item 9: secrets come from files and the environment, stay out of
//! /proc/PID/cmdline, and a generated credential never reaches the log.

mod support;

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use relay::proto::{
    auth::rest_password,
    stun::{Attribute, Class, Message, Method},
};
use support::{client::Client, Relay};

const REALM: &str = "relay.local";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn allocates(relay: &Relay, user: &str, password: &str) -> bool {
    let mut client = Client::new(relay.listener(), REALM);
    client.login(user, password);
    let response = client.request(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    Message::decode(&response).is_ok_and(|m| m.class() == Class::Success)
}

#[test]
fn users_file_secret_file_and_environment_work_and_stay_off_the_command_line() {
    let dir = temp_dir("secret-files");
    let users = dir.join("users");
    fs::write(&users, "# static users\nalice:file-password\n").expect("write");
    let secrets = dir.join("rest-secrets");
    fs::write(&secrets, "file-rest-secret\n").expect("write");
    let users_arg = users.display().to_string();
    let secrets_arg = secrets.display().to_string();
    let relay = Relay::start_with(
        &["env", "RELAY_AUTH_SECRET=env-rest-secret"],
        &[
            "--listen",
            "127.0.0.1:0",
            "--relay-ip",
            "127.0.0.1",
            "--realm",
            REALM,
            "--users-file",
            &users_arg,
            "--auth-secret-file",
            &secrets_arg,
        ],
        1,
    );
    assert!(allocates(&relay, "alice", "file-password"));
    for secret in ["file-rest-secret", "env-rest-secret"] {
        let username = "4000000000:carol";
        let password = rest_password(secret.as_bytes(), username).expect("hmac");
        assert!(allocates(&relay, username, &password), "{secret}");
    }
    let cmdline = fs::read(format!("/proc/{}/cmdline", relay.pid())).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(cmdline.contains("--users-file"), "{cmdline}");
    for secret in ["file-password", "file-rest-secret", "env-rest-secret"] {
        assert!(!cmdline.contains(secret), "{secret} in {cmdline}");
    }
    let log = relay.stop();
    for secret in ["file-password", "file-rest-secret", "env-rest-secret"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_generated_credential_goes_to_a_private_file_not_the_log() {
    let dir = temp_dir("generated");
    let runtime = format!("RUNTIME_DIRECTORY={}", dir.display());
    let relay = Relay::start_with(
        &["env", &runtime],
        &["--listen", "127.0.0.1:0", "--relay-ip", "127.0.0.1"],
        1,
    );
    let path = dir.join("generated-credential");
    let text = fs::read_to_string(&path).expect("the generated credential file");
    let (user, password) = text.trim().split_once(':').expect("NAME:PASSWORD");
    assert_eq!(user, "relay");
    assert!(password.len() >= 20, "{password}");
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&path).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(allocates(&relay, user, password));
    let log = relay.stop();
    assert!(!log.contains(password), "password in the log:\n{log}");
    assert!(log.contains(&path.display().to_string()), "{log}");
    let _ = fs::remove_dir_all(&dir);
}

/// On a terminal the credential is printed once, outside the log lines.
#[test]
fn a_generated_credential_is_printed_once_on_a_terminal() {
    let relay = support_relay_bin();
    // util-linux `script` gives the relay a pseudo-terminal as stderr; a timeout bounds it.
    let command = format!(
        "timeout -s INT 3 {} serve --listen 127.0.0.1:0 --relay-ip 127.0.0.1 --admin 127.0.0.1:0",
        relay.display()
    );
    let started = Instant::now();
    let out = Command::new("script")
        .args(["-qefc", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script (util-linux)");
    assert!(started.elapsed() < Duration::from_secs(20));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("relay:"))
        .unwrap_or_else(|| panic!("no credential line in:\n{text}"));
    let password = line.trim_start_matches("relay:");
    assert!(password.len() >= 20, "{line}");
    assert_eq!(text.matches(password).count(), 1, "{text}");
    assert!(text.contains("shown once above"), "{text}");
}

fn support_relay_bin() -> PathBuf {
    relay_tests::relay_bin()
}
