//! Many seeds of small swarms, every shipped scenario: the invariants hold
//! and a seed replays its run exactly. `MYCEL_SIM_SOAK=N` runs N seeds per
//! scenario instead of the default few (the longer soak).

use mycel_sim::{Scenario, Sim};

/// Every scenario shipped in `crates/sim/scenarios/` but the big one.
const SCENARIOS: [&str; 9] =
    ["calm", "lossy", "liars", "spot-checks", "sybils", "partition", "crashes", "chaos", "flood"];

fn scenario(name: &str) -> Scenario {
    let path = format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn seeds() -> u64 {
    std::env::var("MYCEL_SIM_SOAK").ok().and_then(|s| s.parse().ok()).unwrap_or(40)
}

#[test]
fn the_invariants_hold_for_every_seed_of_every_scenario() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for name in SCENARIOS {
        let s = scenario(name);
        for seed in 0..seeds() {
            let report = Sim::new(s.clone(), seed).run();
            runs += 1;
            if !report.ok() {
                failures.push(format!(
                    "{report}\nreplay: mycel sim --scenario crates/sim/scenarios/{name}.toml --seed {seed}\n"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {runs} runs broke an invariant:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn a_seed_replays_its_run_event_for_event() {
    let s = scenario("chaos");
    let (a, b) = (Sim::new(s.clone(), 9).run(), Sim::new(s.clone(), 9).run());
    assert_eq!(a.trace, b.trace);
    assert_eq!((a.done, a.stats.events, a.stats.messages), (b.done, b.stats.events, b.stats.messages));
    assert_ne!(a.trace, Sim::new(s, 10).run().trace, "another seed, another run");
}

#[test]
fn without_faults_every_task_completes_with_the_honest_output() {
    for name in ["calm", "lossy", "partition", "crashes", "flood"] {
        for seed in 0..5 {
            let r = Sim::new(scenario(name), seed).run();
            assert_eq!(r.done as usize, r.tasks, "{name} seed {seed}: {r}");
            assert_eq!(r.wrong_shards, 0, "{name} seed {seed}: {r}");
        }
    }
}

#[test]
fn with_two_copies_independent_liars_never_get_a_wrong_shard_through() {
    for seed in 0..10 {
        let r = Sim::new(scenario("liars"), seed).run();
        assert_eq!(r.wrong_shards, 0, "seed {seed}: {r}");
        assert!(r.liars_caught > 0, "seed {seed}: {r}");
    }
}

#[test]
fn requesters_crash_mid_task_and_their_tasks_still_end_whole() {
    let crashed: u64 = (0..5)
        .map(|seed| {
            let r = Sim::new(scenario("crashes"), seed).run();
            assert!(r.ok(), "{r}");
            assert_eq!(r.done as usize, r.tasks, "{r}");
            r.stats.requester_crashes
        })
        .sum();
    assert!(crashed > 0, "no requester crashed in five seeds: the scenario tests nothing of the journal");
}

#[test]
fn the_faults_actually_happen() {
    let r = Sim::new(scenario("chaos"), 3).run();
    let s = &r.stats;
    assert!(s.lost > 0 && s.duplicated > 0 && s.unreachable > 0 && s.crashes > 0, "{r}");
    assert!(r.behaviours.len() > 3, "{r}");
}
