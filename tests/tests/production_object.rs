//! The eBPF object `relay serve` loads (embedded in the binary) holds the relay's own programs
//! and maps only: the benchmark's load generator, sinks and raw forwarder live in
//! relay-bench-ebpf, so a production start never creates their maps. Parsed, not loaded: no
//! root needed, nothing created in the kernel.

use aya_obj::Object;

/// Names the benchmark's programs and maps use (relay-bench-common).
fn is_benchmark_name(name: &str) -> bool {
    name.to_ascii_uppercase().starts_with("BENCH") || name.starts_with("relay_bench")
}

#[test]
fn the_relay_object_has_no_benchmark_programs_or_maps() {
    let object = Object::parse(relay::fastpath::EBPF_OBJECT).expect("the embedded object parses");
    let mut programs: Vec<&str> = object.programs.keys().map(String::as_str).collect();
    let mut maps: Vec<&str> = object.maps.keys().map(String::as_str).collect();
    programs.sort_unstable();
    maps.sort_unstable();
    // Parsed the right way: the relay's own entry point and counters are found by these names.
    assert!(
        programs.contains(&relay_common::XDP_PROGRAM),
        "no {} among {programs:?}",
        relay_common::XDP_PROGRAM
    );
    assert!(
        maps.contains(&relay_common::VERDICT_COUNTERS_MAP),
        "no {} among {maps:?}",
        relay_common::VERDICT_COUNTERS_MAP
    );
    let benchmark: Vec<&&str> = programs
        .iter()
        .chain(&maps)
        .filter(|name| is_benchmark_name(name))
        .collect();
    assert!(
        benchmark.is_empty(),
        "benchmark programs/maps in the relay's object: {benchmark:?} (programs {programs:?}, \
         maps {maps:?})"
    );
}

#[test]
fn benchmark_names_are_recognised() {
    for name in [
        "BENCH_GEN_CFG",
        "BENCH_SINK_COUNTERS",
        "relay_bench_fwd",
        "bench_x",
    ] {
        assert!(is_benchmark_name(name), "{name}");
    }
    for name in [
        "relay_xdp",
        "relay_xdp_pass",
        "CHANNELS",
        "VERDICT_COUNTERS",
    ] {
        assert!(!is_benchmark_name(name), "{name}");
    }
}
