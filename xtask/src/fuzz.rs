//! `cargo xtask fuzz [--seconds N] [TARGET...]`: build the cargo-fuzz targets of `agent/fuzz`
//! and run each for N seconds (default 20) on one job, starting from the checked-in seeds.
//! A crash fails the command and names the reproducer under `agent/fuzz/artifacts/`.
//!
//! `cargo xtask test` runs this bounded step; run longer on demand, e.g.
//! `cargo xtask fuzz --seconds 3600 pipeline`. The growing corpus lives in
//! `target/fuzz-corpus/TARGET` (outside git); seeds stay in `agent/fuzz/seeds/TARGET`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{NIGHTLY, root, step};

/// Every fuzz target, in the order they run.
pub const TARGETS: &[&str] = &["http_head", "endpoint", "config", "record", "pipeline"];
pub const DEFAULT_SECONDS: u64 = 20;

pub fn run(args: &[String]) -> Result<()> {
    let mut seconds = DEFAULT_SECONDS;
    let mut targets: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().context("--seconds needs a value")?;
                seconds = v.parse().with_context(|| format!("--seconds {v:?} is not a number"))?;
            }
            "-h" | "--help" => {
                eprintln!("usage: cargo xtask fuzz [--seconds N] [TARGET...]   targets: {}", TARGETS.join(" "));
                return Ok(());
            }
            t if TARGETS.contains(&t) => targets.push(t.to_string()),
            other => bail!("unknown fuzz target or option {other:?}; targets: {}", TARGETS.join(" ")),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    fuzz(&targets, seconds)
}

/// Build, then run each target for `seconds`; fails at the first crash.
pub fn fuzz(targets: &[String], seconds: u64) -> Result<()> {
    let agent = root().join("agent");
    step("Building the fuzz targets (nightly, sanitizer instrumentation)");
    crate::sh(Command::new("cargo").current_dir(&agent).args([&format!("+{NIGHTLY}"), "fuzz", "build"]))?;
    let mut summary = Vec::new();
    for target in targets {
        let corpus = root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = agent.join("fuzz/seeds").join(target);
        let artifacts = agent.join("fuzz/artifacts").join(target);
        std::fs::create_dir_all(&artifacts)?;
        let before = crash_files(&artifacts);
        step(&format!("Fuzzing {target} for {seconds} s (corpus {})", corpus.display()));
        let started = Instant::now();
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&agent)
            .args([&format!("+{NIGHTLY}"), "fuzz", "run", target])
            .arg(&corpus)
            .args(seeds.is_dir().then_some(&seeds))
            // One process, one job (libFuzzer's default); cargo-fuzz sets -artifact_prefix to
            // agent/fuzz/artifacts/TARGET/.
            .args(["--", &format!("-max_total_time={seconds}"), "-print_final_stats=1"])
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::piped());
        let out = cmd.spawn().with_context(|| format!("starting cargo fuzz run {target}"))?.wait_with_output()?;
        let log = String::from_utf8_lossy(&out.stderr);
        // libFuzzer's own summary is on stderr; keep it visible, but not the per-input noise.
        for line in log.lines().filter(|l| {
            l.starts_with("stat::")
                || l.contains("Done ")
                || l.contains("ERROR")
                || l.contains("panicked")
                || l.contains("artifact")
                || l.contains("Test unit written")
                || l.starts_with("thread ")
                || l.contains("SUMMARY")
        }) {
            eprintln!("    {line}");
        }
        let execs = stat(&log, "stat::number_of_executed_units").unwrap_or(0);
        let new: Vec<PathBuf> = crash_files(&artifacts).into_iter().filter(|p| !before.contains(p)).collect();
        if !out.status.success() || !new.is_empty() {
            let paths: Vec<String> = new.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "fuzz target {target} failed after {:.0} s and {execs} executions ({}); reproduce with \
                 `cd agent && cargo +{NIGHTLY} fuzz run {target} <artifact>`; artifacts: {}",
                started.elapsed().as_secs_f64(),
                out.status,
                if paths.is_empty() { "none written (see the log above)".to_string() } else { paths.join(", ") }
            );
        }
        summary.push(format!("{target}: {execs} executions in {:.0} s, no crash", started.elapsed().as_secs_f64()));
    }
    step("Fuzzing done");
    for line in summary {
        eprintln!("    {line}");
    }
    Ok(())
}

fn crash_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
}

fn stat(log: &str, name: &str) -> Option<u64> {
    log.lines().find_map(|l| l.strip_prefix(name)?.trim_start_matches(':').trim().parse().ok())
}
