//! Usage records: one JSON object per allocation that ended, for billing and audit.
//!
//! Each record goes to the tracing target [`TARGET`] at info (the JSON is the whole message)
//! and, with `--usage-log PATH`, is appended to that file as one line. The file is opened at
//! start while the daemon is still root (it may then live where the unprivileged daemon could
//! not create it), in append mode; every record is one `write` of a whole line, so nothing is
//! held in a buffer a crash would lose. A write error is logged, never fatal: relaying goes on.
//!
//! Counters: the worker counts what the socket path relayed per relay socket, the kernel
//! counts per allocation; the record carries both, each read once when the allocation's last
//! relay socket closes and its kernel entries are forgotten (see `Worker::drain_commands`).
//! Bytes are counted as `relay ctl allocations` and `/metrics` count them.

use std::{
    fs::File,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use serde::Serialize;
use tracing::{info, warn};

use crate::control::PathCounters;
use relay_proto::server::AllocationEnd;

/// The tracing target of usage records (`--log-level info,relay::usage=off` silences them in
/// the log; the `--usage-log` file is written regardless).
pub const TARGET: &str = "relay::usage";

/// One ended allocation, as written (field order is the JSON order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UsageRecord {
    /// Always `allocation_end`: tells records apart from other JSON in a log stream.
    pub event: &'static str,
    pub allocation: u64,
    /// The username that created the allocation (a REST username in full).
    pub user: String,
    pub realm: String,
    /// `udp`, `tcp` or `tls`.
    pub transport: &'static str,
    /// The client's transport address (as the relay saw it, after any NAT).
    pub client: String,
    /// The relay's address the client talked to.
    pub listener: String,
    /// The relayed transport addresses (two for a dual-stack allocation).
    pub relayed: Vec<String>,
    /// When the allocation went live and when it ended: RFC 3339 UTC, and Unix seconds.
    pub start: String,
    pub start_unix: u64,
    pub end: String,
    pub end_unix: u64,
    /// `end_unix - start_unix` (so the three always agree).
    pub duration_secs: u64,
    /// `expired`, `refresh`, `connection_closed`, `disconnected` or `shutdown`.
    pub reason: &'static str,
    /// What the socket path relayed (userspace).
    pub socket: PathCounters,
    /// What the kernel fast path relayed (zero without one).
    pub kernel: PathCounters,
    /// `socket` + `kernel`.
    pub total: PathCounters,
}

impl UsageRecord {
    /// The record of `end`, which ended at `ended` (wall clock) and `ended_at` (monotonic);
    /// its start is placed on the wall clock by its age.
    pub fn new(
        end: &AllocationEnd,
        socket: PathCounters,
        kernel: PathCounters,
        ended: SystemTime,
        ended_at: Instant,
    ) -> Self {
        let age = ended_at.saturating_duration_since(end.started);
        let started = ended.checked_sub(age).unwrap_or(UNIX_EPOCH);
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let (start, stop) = (unix(started), unix(ended));
        let mut total = socket;
        total += kernel;
        Self {
            event: "allocation_end",
            allocation: end.id.0,
            user: end.username.clone(),
            realm: end.realm.clone(),
            transport: end.transport.label(),
            client: end.client.to_string(),
            listener: end.listener.to_string(),
            relayed: end.relayed.iter().map(ToString::to_string).collect(),
            start: rfc3339(start.as_secs()),
            start_unix: start.as_secs(),
            end: rfc3339(stop.as_secs()),
            end_unix: stop.as_secs(),
            duration_secs: stop.as_secs().saturating_sub(start.as_secs()),
            reason: end.reason.label(),
            socket,
            kernel,
            total,
        }
    }

    /// The record as one line of JSON (no newline).
    pub fn to_json(&self) -> String {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Where records go: the log, and the `--usage-log` file if one is configured.
#[derive(Debug, Default)]
pub struct UsageLog {
    file: Option<(PathBuf, Mutex<File>)>,
    /// The last write to the file failed (so the next failure is not logged again).
    failing: AtomicBool,
}

impl UsageLog {
    /// Opens (creating it if needed) `path` for appending; call while still root.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        let file = match path {
            Some(path) => {
                // Usernames and addresses: not for every local user (0640 when created).
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o640)
                    .open(path)
                    .with_context(|| format!("cannot open --usage-log {}", path.display()))?;
                Some((path.to_owned(), Mutex::new(file)))
            }
            None => None,
        };
        Ok(Self {
            file,
            failing: AtomicBool::new(false),
        })
    }

    /// Writes one record to the log and the file.
    pub fn write(&self, record: &UsageRecord) {
        let mut line = record.to_json();
        info!(target: TARGET, "{line}");
        let Some((path, file)) = &self.file else {
            return;
        };
        line.push('\n');
        let result = {
            let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
            // One write of the whole line: O_APPEND puts it at the end in one piece.
            file.write_all(line.as_bytes())
        };
        match result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!(path = %path.display(), "usage log writable again");
                }
            }
            Err(error) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(
                        path = %path.display(),
                        %error,
                        "cannot write a usage record to --usage-log (it is still logged); \
                         said once until a write succeeds again"
                    );
                }
            }
        }
    }
}

/// `secs` since the Unix epoch as RFC 3339 UTC (`2024-02-29T12:00:00Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rest = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Proleptic Gregorian date of `days` since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::{
        server::{AllocationId, EndReason},
        Transport,
    };

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_709_208_000), "2024-02-29T12:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    fn end(reason: EndReason) -> AllocationEnd {
        AllocationEnd {
            id: AllocationId(7),
            username: "1700003600:alice".to_owned(),
            realm: "relay.test".to_owned(),
            client: "192.0.2.10:50000".parse().unwrap(),
            listener: "198.18.0.1:3478".parse().unwrap(),
            transport: Transport::Tcp,
            relayed: vec![
                "198.18.0.1:50002".parse().unwrap(),
                "[2001:db8::1]:50004".parse().unwrap(),
            ],
            started: Instant::now(),
            reason,
        }
    }

    /// The documented schema, exactly: field names, order, types, and the total.
    #[test]
    fn record_json_schema() {
        let end = end(EndReason::Disconnected);
        let ended_at = end.started + Duration::from_millis(90_500);
        let socket = PathCounters {
            to_peer_packets: 3,
            to_peer_bytes: 300,
            to_client_packets: 2,
            to_client_bytes: 208,
        };
        let kernel = PathCounters {
            to_peer_packets: 10,
            to_peer_bytes: 1000,
            to_client_packets: 0,
            to_client_bytes: 0,
        };
        let ended = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        let record = UsageRecord::new(&end, socket, kernel, ended, ended_at);
        let json = record.to_json();
        assert!(!json.contains('\n'));
        let expected = concat!(
            r#"{"event":"allocation_end","allocation":7,"user":"1700003600:alice","#,
            r#""realm":"relay.test","transport":"tcp","client":"192.0.2.10:50000","#,
            r#""listener":"198.18.0.1:3478","relayed":["198.18.0.1:50002","[2001:db8::1]:50004"],"#,
            r#""start":"2023-11-14T22:13:29Z","start_unix":1700000009,"#,
            r#""end":"2023-11-14T22:15:00Z","end_unix":1700000100,"duration_secs":91,"#,
            r#""reason":"disconnected","#,
            r#""socket":{"to_peer_packets":3,"to_peer_bytes":300,"to_client_packets":2,"to_client_bytes":208},"#,
            r#""kernel":{"to_peer_packets":10,"to_peer_bytes":1000,"to_client_packets":0,"to_client_bytes":0},"#,
            r#""total":{"to_peer_packets":13,"to_peer_bytes":1300,"to_client_packets":2,"to_client_bytes":208}}"#,
        );
        assert_eq!(json, expected);
    }

    #[test]
    fn reasons_are_named() {
        for (reason, label) in [
            (EndReason::Expired, "expired"),
            (EndReason::Refresh, "refresh"),
            (EndReason::ConnectionClosed, "connection_closed"),
            (EndReason::Disconnected, "disconnected"),
            (EndReason::Shutdown, "shutdown"),
        ] {
            let record = UsageRecord::new(
                &end(reason),
                PathCounters::default(),
                PathCounters::default(),
                SystemTime::now(),
                Instant::now(),
            );
            assert_eq!(record.reason, label);
            assert!(record.to_json().contains(&format!(r#""reason":"{label}""#)));
        }
    }

    /// Appends one line per record, keeps what was there, and survives a file it cannot write.
    #[test]
    fn file_gets_one_line_per_record() {
        let dir = std::env::temp_dir().join(format!("relay-usage-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("usage.jsonl");
        std::fs::write(&path, "earlier\n").unwrap();
        let log = UsageLog::open(Some(&path)).unwrap();
        let a = UsageRecord::new(
            &end(EndReason::Expired),
            PathCounters::default(),
            PathCounters::default(),
            SystemTime::now(),
            Instant::now(),
        );
        let b = UsageRecord::new(
            &end(EndReason::Refresh),
            PathCounters::default(),
            PathCounters::default(),
            SystemTime::now(),
            Instant::now(),
        );
        log.write(&a);
        log.write(&b);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, vec!["earlier".to_owned(), a.to_json(), b.to_json()]);
        for line in &lines[1..] {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["event"], "allocation_end");
        }
        // A new file is not for every local user.
        let fresh = dir.join("fresh.jsonl");
        UsageLog::open(Some(&fresh)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o007, 0, "{mode:o}");
        std::fs::remove_dir_all(&dir).unwrap();

        // A file that refuses writes (read-only descriptor): logged, not fatal.
        let read_only = UsageLog {
            file: Some((
                PathBuf::from("/dev/null"),
                Mutex::new(File::open("/dev/null").unwrap()),
            )),
            failing: AtomicBool::new(false),
        };
        read_only.write(&a);
        read_only.write(&a);
        assert!(read_only.failing.load(Ordering::Relaxed));
        // A directory cannot be opened for appending: a clear start error.
        let error = UsageLog::open(Some(Path::new("/"))).unwrap_err();
        assert!(format!("{error:#}").contains("--usage-log /"), "{error:#}");
    }
}
