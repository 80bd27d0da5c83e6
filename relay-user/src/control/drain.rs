//! `relay ctl drain [--deadline DURATION]` and `relay ctl status`: what they send, what the
//! daemon answers, and how the answers are printed.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::client::request;

/// What `GET /status` (and `POST /drain`) answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// The relay's version.
    pub version: String,
    /// Every worker thread is running.
    pub live: bool,
    /// Taking new allocations (live and not draining).
    pub ready: bool,
    /// No new allocations; the relay stops once the remaining ones end or the deadline passes.
    pub draining: bool,
    /// Seconds since draining started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_for_secs: Option<u64>,
    /// Seconds until the relay stops whatever allocations remain (none: no deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_in_secs: Option<u64>,
    /// Allocations the relay holds (those being set up included).
    pub allocations: u64,
    /// Configured alternate servers (`--alternate-server`).
    #[serde(default)]
    pub alternates: Vec<String>,
}

/// Parses `30s`, `10m`, `1h`, `1h30m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let usage =
        || format!("invalid duration `{text}`: expected a number with a unit, like 30s, 10m or 1h");
    let text = text.trim();
    if text.is_empty() {
        return Err(usage());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total: u64 = 0;
    let mut rest = text;
    // Each round eats one `<digits><unit>`, so it runs at most text.len() times.
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(usage());
        }
        let (number, tail) = rest.split_at(digits);
        let number: u64 = number.parse().map_err(|_| usage())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "s" | "sec" | "secs" => 1,
            "m" | "min" | "mins" => 60,
            "h" | "hour" | "hours" => 3600,
            _ => return Err(usage()),
        };
        total = number
            .checked_mul(scale)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| format!("duration `{text}` is too long"))?;
        rest = tail;
    }
    Ok(Duration::from_secs(total))
}

/// `relay ctl drain [--deadline DURATION]`.
pub fn drain(admin: SocketAddr, deadline: Option<Duration>) -> anyhow::Result<()> {
    let path = match deadline {
        Some(deadline) => format!("/drain/{}", deadline.as_secs()),
        None => "/drain".to_owned(),
    };
    let body = request(admin, "POST", &path)?;
    let status: StatusView =
        serde_json::from_str(&body).context("unexpected answer from the admin endpoint")?;
    print!("{}", render(&status));
    Ok(())
}

/// `relay ctl status [--json]`.
pub fn status(admin: SocketAddr, json: bool) -> anyhow::Result<()> {
    let body = request(admin, "GET", "/status")?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let status: StatusView =
        serde_json::from_str(&body).context("unexpected answer from the admin endpoint")?;
    print!("{}", render(&status));
    Ok(())
}

/// The human-readable status.
pub fn render(status: &StatusView) -> String {
    let state = if !status.live {
        "degraded (a worker stopped)".to_owned()
    } else if status.draining {
        let deadline = match status.deadline_in_secs {
            Some(secs) => format!("stops in {secs}s at the latest"),
            None => "no deadline".to_owned(),
        };
        format!(
            "draining for {}s: no new allocations; stops when the last allocation ends ({deadline})",
            status.draining_for_secs.unwrap_or(0)
        )
    } else {
        "running".to_owned()
    };
    let alternates = if status.alternates.is_empty() {
        "none".to_owned()
    } else {
        status.alternates.join(", ")
    };
    format!(
        "relay {}\nstate: {state}\nready: {}\nallocations: {}\nalternates: {alternates}\n",
        status.version,
        if status.ready { "yes" } else { "no" },
        status.allocations,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (text, secs) in [
            ("30s", 30),
            ("10m", 600),
            ("1h", 3600),
            ("1h30m", 5400),
            ("45", 45),
            ("0s", 0),
            (" 2m ", 120),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for text in [
            "",
            "s",
            "10x",
            "-5s",
            "1.5h",
            "h1",
            "10 m",
            "99999999999999999999h",
        ] {
            let error = parse_duration(text).expect_err(text);
            assert!(error.contains(text.trim()), "{error}");
        }
    }

    #[test]
    fn render_draining() {
        let status = StatusView {
            version: "1.0".to_owned(),
            live: true,
            ready: false,
            draining: true,
            draining_for_secs: Some(3),
            deadline_in_secs: Some(27),
            allocations: 2,
            alternates: vec!["198.18.0.2:3478".to_owned()],
        };
        let text = render(&status);
        assert!(text.contains("draining for 3s"), "{text}");
        assert!(text.contains("stops in 27s"), "{text}");
        assert!(text.contains("allocations: 2"), "{text}");
        assert!(text.contains("ready: no"), "{text}");
    }
}
