//! Secrets that must not sit in `/proc/PID/cmdline` or in shipped logs (issue 12 item 9):
//! REST shared secrets and static users read from files or the environment, and the one-time
//! announcement of a generated credential.

use std::{
    fs,
    io::{IsTerminal, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};

use crate::config::{parse_user, StaticUser};

/// The environment variable holding one TURN REST shared secret.
pub const AUTH_SECRET_ENV: &str = "RELAY_AUTH_SECRET";

/// The lines of a secrets file that carry a value: trimmed, without blank lines and `#`
/// comments.
fn value_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
}

fn read(path: &Path, flag: &str) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {flag} {}", path.display()))
}

/// `--auth-secret-file`: one TURN REST shared secret per line (several for rotation).
pub fn read_auth_secrets(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = read(path, "--auth-secret-file")?;
    let secrets: Vec<String> = value_lines(&text).map(|(_, s)| s.to_owned()).collect();
    if secrets.is_empty() {
        bail!(
            "--auth-secret-file {} holds no secret (one per line; blank lines and # comments \
             are ignored)",
            path.display()
        );
    }
    Ok(secrets)
}

/// `--users-file`: one `NAME:PASSWORD` per line.
pub fn read_users(path: &Path) -> anyhow::Result<Vec<StaticUser>> {
    let text = read(path, "--users-file")?;
    let users = value_lines(&text)
        .map(|(number, line)| {
            parse_user(line)
                .with_context(|| format!("--users-file {} line {number}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if users.is_empty() {
        bail!(
            "--users-file {} holds no user (one NAME:PASSWORD per line)",
            path.display()
        );
    }
    Ok(users)
}

/// `RELAY_AUTH_SECRET`, if set and not blank.
pub fn env_auth_secret() -> Option<String> {
    std::env::var(AUTH_SECRET_ENV)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Where a generated credential goes when stderr is not a terminal: the service's runtime
/// directory (`$RUNTIME_DIRECTORY`, which systemd's `RuntimeDirectory=` sets), else
/// `/run/relay` as root, else `$XDG_RUNTIME_DIR/relay`.
pub fn generated_credential_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several, colon-separated: the first is ours.
        let first = dir.to_string_lossy().split(':').next().map(PathBuf::from)?;
        return Some(first.join("generated-credential"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/run/relay/generated-credential"));
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join("relay").join("generated-credential"))
}

/// How a generated credential reached the operator.
#[derive(Debug, PartialEq, Eq)]
pub enum Announced {
    /// Printed once on the terminal (stderr).
    Terminal,
    /// Written to this file (mode 0600).
    File(PathBuf),
}

/// Shows a generated `name:password` once, never through the log: on stderr when it is a
/// terminal, otherwise in [`generated_credential_path`] (created with mode 0600).
pub fn announce_generated(name: &str, password: &str) -> anyhow::Result<Announced> {
    let mut stderr = std::io::stderr();
    if stderr.is_terminal() {
        writeln!(
            stderr,
            "relay: no --user, --users-file, --auth-secret, --auth-secret-file or \
             {AUTH_SECRET_ENV} configured; generated the credential (valid until this process \
             exits, shown once):\n\n    {name}:{password}\n"
        )
        .context("writing the generated credential to the terminal")?;
        return Ok(Announced::Terminal);
    }
    let Some(path) = generated_credential_path() else {
        bail!(
            "no credential configured and stderr is not a terminal, so a generated one cannot be \
             shown: set --users-file, --auth-secret-file or {AUTH_SECRET_ENV} (or \
             RUNTIME_DIRECTORY/XDG_RUNTIME_DIR for the generated credential's file)"
        );
    };
    write_private(&path, &format!("{name}:{password}\n"))
        .with_context(|| format!("writing the generated credential to {}", path.display()))?;
    Ok(Announced::File(path))
}

/// Writes `text` to `path`, readable by the owner only (its directory too, if created).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    // Never follow a link someone planted, never keep an older file's wider mode.
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("relay-secrets-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_skip_comments_and_name_the_bad_line_without_the_secret() {
        let dir = temp_dir("files");
        let secrets = dir.join("secrets");
        fs::write(&secrets, "# rotation\nnew-secret\n\n  old-secret  \n").unwrap();
        assert_eq!(
            read_auth_secrets(&secrets).unwrap(),
            vec!["new-secret".to_owned(), "old-secret".to_owned()]
        );
        let users = dir.join("users");
        fs::write(&users, "alice:wonder:land\n# bob:x\n").unwrap();
        let parsed = read_users(&users).unwrap();
        assert_eq!(
            (parsed[0].name.as_str(), parsed[0].password.as_str()),
            ("alice", "wonder:land")
        );
        fs::write(&users, "alice:ok\nbob-without-password\n").unwrap();
        let err = format!("{:#}", read_users(&users).unwrap_err());
        assert!(
            err.contains("line 2") && err.contains(&users.display().to_string()),
            "{err}"
        );
        fs::write(&secrets, "# nothing\n").unwrap();
        let err = format!("{:#}", read_auth_secrets(&secrets).unwrap_err());
        assert!(err.contains("holds no secret"), "{err}");
        let missing = dir.join("missing");
        let err = format!("{:#}", read_auth_secrets(&missing).unwrap_err());
        assert!(
            err.contains("cannot read --auth-secret-file") && err.contains("missing"),
            "{err}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn private_file_is_owner_only_and_replaces_a_planted_link() {
        let dir = temp_dir("private");
        let target = dir.join("elsewhere");
        fs::write(&target, "keep").unwrap();
        let path = dir.join("sub").join("generated-credential");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_private(&path, "relay:pw\n").unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        assert_eq!(fs::read_to_string(&path).unwrap(), "relay:pw\n");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _ = fs::remove_dir_all(&dir);
    }
}
