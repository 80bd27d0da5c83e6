//! `cargo xtask bench --smoke`: the benchmark builds its lab, runs every path it can for half a
//! second, and writes its JSON; every path it reports available delivered traffic. Needs root
//! (namespaces), like the other lab tests. Bounded: the benchmark runs under `timeout 60`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use relay_tests::{relay_bin, require_root};

/// The xtask binary `cargo build --workspace --bins` put next to the relay, else `cargo run`.
fn xtask_command() -> Command {
    let sibling = relay_bin().with_file_name("xtask");
    let mut command = Command::new("timeout");
    command.arg("60");
    if sibling.exists() {
        command.arg(sibling);
    } else {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ lives in the workspace")
            .join("Cargo.toml");
        command
            .args([cargo.as_str(), "run", "--quiet", "--manifest-path"])
            .arg(manifest)
            .args(["-p", "xtask", "--"]);
    }
    command
}

#[test]
fn bench_smoke_writes_json_and_every_available_path_delivers() {
    require_root();
    let out = std::env::temp_dir().join(format!("relay-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let json_path: PathBuf = out.join("bench.json");
    let result = xtask_command()
        .args(["bench", "--smoke", "--relay-bin"])
        .arg(relay_bin())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run cargo xtask bench --smoke");
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        result.status.success(),
        "bench --smoke failed ({}):\n{stdout}\n{stderr}",
        result.status
    );
    let text = std::fs::read_to_string(&json_path)
        .unwrap_or_else(|e| panic!("{}: {e}\n{stdout}", json_path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("bench.json is JSON");
    assert!(out.join("bench.svg").exists(), "bench.svg missing");

    let paths = json["paths"].as_object().expect("paths object");
    assert_eq!(
        paths["socket"]["available"], true,
        "the socket path must always run:\n{stdout}"
    );
    assert_eq!(paths["generator"]["available"], true);
    let summary = json["summary"].as_array().expect("summary array");
    for (name, path) in paths {
        if path["available"] != true {
            println!("{name}: unavailable: {}", path["reason"]);
            continue;
        }
        let rows: Vec<&serde_json::Value> = summary
            .iter()
            .filter(|s| s["path"] == name.as_str())
            .collect();
        assert!(!rows.is_empty(), "{name}: no results\n{stdout}");
        for row in rows {
            let pps = row["delivered_pps"]["median"].as_f64().unwrap_or(0.0);
            assert!(
                pps > 0.0,
                "{name} {} delivered nothing:\n{stdout}",
                row["variant"]
            );
        }
    }
    let latency = json["latency"].as_array().expect("latency array");
    assert!(
        latency
            .iter()
            .any(|l| l["path"] == "socket" && l["received"].as_u64().unwrap_or(0) > 0),
        "no latency samples through the socket path:\n{stdout}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
