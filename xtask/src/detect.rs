//! `cargo xtask detect --draws N [--nio-draws M] [--browser-draws B] [--seed S | --seeds S,T,...]
//! [--concurrency C] [--horizon SECS]`:
//! many drawn scrapes (N made with the tests' HTTP client, M with matrix-nio, a quarter of N by
//! default, B by matrix-js-sdk in headless Chromium, an eighth of N by default) and the
//! legitimate heavy readers against one real Synapse (tests/test_detection_draws.py), with the
//! distribution of times to detect and every reader's peak score printed at the end (and left
//! in target/detect/draws-seed{S}.txt). CI runs the same file with its default of 8 draws.
//! `--horizon` lets a draw that is not flagged run on past its 300 s target (up to SECS after
//! its first request), so that a miss says how late it is caught, not only that it was missed.
//! `--seeds` runs several seeds one after the other (a fresh world each) and then pools them
//! (tests/harness/draws_pool.py, left in target/detect/draws-pooled.txt): one seed's dozen
//! draws say little about a distribution or its misses, and pooling by hand invites mistakes.

use anyhow::{Context, Result, bail};
use std::process::Command;

use crate::{build_release, root, setup, sh, step};

pub fn run(args: &[String]) -> Result<()> {
    let mut draws: u32 = 20;
    let mut nio_draws: Option<u32> = None;
    let mut browser_draws: Option<u32> = None;
    let mut seed: Option<u64> = None;
    let mut seeds: Option<Vec<u64>> = None;
    let mut concurrency: u32 = 7;
    let mut horizon: u32 = 300;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value")).cloned();
        match a.as_str() {
            "--draws" => {
                let v = value("--draws")?;
                draws = v.parse().with_context(|| format!("--draws {v:?} is not a number"))?;
            }
            "--nio-draws" => {
                let v = value("--nio-draws")?;
                nio_draws = Some(v.parse().with_context(|| format!("--nio-draws {v:?} is not a number"))?);
            }
            "--browser-draws" => {
                let v = value("--browser-draws")?;
                browser_draws = Some(v.parse().with_context(|| format!("--browser-draws {v:?} is not a number"))?);
            }
            "--seed" => {
                let v = value("--seed")?;
                seed = Some(v.parse().with_context(|| format!("--seed {v:?} is not a number"))?);
            }
            "--seeds" => {
                let v = value("--seeds")?;
                let list = v
                    .split(',')
                    .map(|s| s.trim().parse().with_context(|| format!("--seeds {v:?}: {s:?} is not a number")))
                    .collect::<Result<Vec<u64>>>()?;
                seeds = Some(list);
            }
            "--concurrency" => {
                let v = value("--concurrency")?;
                concurrency = v.parse().with_context(|| format!("--concurrency {v:?} is not a number"))?;
            }
            "--horizon" => {
                let v = value("--horizon")?;
                horizon = v.parse().with_context(|| format!("--horizon {v:?} is not a number of seconds"))?;
            }
            other => {
                bail!(
                    "unknown option {other:?}; usage: cargo xtask detect [--draws N] [--nio-draws M] \
                     [--browser-draws B] [--seed S | --seeds S,T,...] [--concurrency C] [--horizon SECS]"
                )
            }
        }
    }
    if draws == 0 || concurrency == 0 {
        bail!("--draws and --concurrency must be at least 1");
    }
    if !(300..=1800).contains(&horizon) {
        bail!("--horizon {horizon} is outside 300-1800 s (300 s is the slowest draw's target)");
    }
    let pooled = seeds.is_some();
    let seeds = match (seed, seeds) {
        (Some(_), Some(_)) => bail!("--seed and --seeds are exclusive: give one seed or a list"),
        (_, Some(list)) if list.is_empty() => bail!("--seeds needs at least one seed"),
        (_, Some(list)) => list,
        (s, None) => vec![s.unwrap_or(1)],
    };
    setup()?;
    let bin = build_release()?;
    let nio_draws = nio_draws.unwrap_or((draws / 4).max(2));
    let browser_draws = browser_draws.unwrap_or((draws / 8).max(2));
    let out = root().join("target/detect");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut failed = Vec::new();
    let mut reports = Vec::new();
    let mut unreported = Vec::new();
    for &seed in &seeds {
        let report = out.join(format!("draws-seed{seed}.txt"));
        // A stale report from an earlier run must not be pooled as this one's.
        let data = report.with_extension("json");
        for stale in [&report, &data] {
            if stale.exists() {
                std::fs::remove_file(stale).with_context(|| format!("removing {}", stale.display()))?;
            }
        }
        step(&format!(
            "Detection draws: {draws} drawn scrapes, {nio_draws} made with matrix-nio and {browser_draws} in \
             Chromium ({concurrency} at a time), and the heavy readers, seed {seed}, misses running \
             up to {horizon} s (tests/test_detection_draws.py; needs root for BPF)"
        ));
        let result = sh(Command::new(root().join("tests/.venv/bin/python"))
            .current_dir(root())
            .args(["-m", "pytest", "tests/test_detection_draws.py", "-q", "-s", "-p", "no:cacheprovider"])
            .env("VIGIE_BIN", &bin)
            .env("VIGIE_DRAWS", draws.to_string())
            .env("VIGIE_NIO_DRAWS", nio_draws.to_string())
            .env("VIGIE_BROWSER_DRAWS", browser_draws.to_string())
            .env("VIGIE_DRAWS_SEED", seed.to_string())
            .env("VIGIE_DRAWS_CONCURRENCY", concurrency.to_string())
            .env("VIGIE_DRAW_HORIZON_S", horizon.to_string())
            .env("VIGIE_DRAWS_REPORT", &report));
        match std::fs::read_to_string(&report) {
            Ok(text) => eprintln!("\n{text}\n(report in {})", report.display()),
            Err(e) => eprintln!("no report at {}: {e}", report.display()),
        }
        if let Err(e) = result {
            eprintln!("seed {seed}: {e:#}");
            failed.push(seed);
        }
        if data.exists() {
            reports.push(data);
        } else {
            unreported.push(seed);
        }
    }
    // Said once: in the pooled report when there is one (and so on the console), else here.
    let unpooled = (!unreported.is_empty())
        .then(|| format!("no figures from seed(s) {unreported:?} (their runs stopped before a report): not pooled\n"));
    if pooled && reports.is_empty() {
        eprint!("{}", unpooled.as_deref().unwrap_or_default());
    }
    if pooled && !reports.is_empty() {
        let text = Command::new(root().join("tests/.venv/bin/python"))
            .current_dir(root().join("tests"))
            .args(["-m", "harness.draws_pool"])
            .args(&reports)
            .output()
            .context("running tests/harness/draws_pool.py")?;
        if !text.status.success() {
            bail!("pooling {} reports failed: {}", reports.len(), String::from_utf8_lossy(&text.stderr));
        }
        let mut summary = String::from_utf8_lossy(&text.stdout).into_owned();
        summary.push_str(unpooled.as_deref().unwrap_or_default());
        let path = out.join("draws-pooled.txt");
        std::fs::write(&path, &summary).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("\n{summary}\n(pooled report in {})", path.display());
    }
    if !failed.is_empty() {
        bail!("detection draws failed for seed(s) {failed:?} of {seeds:?}: see each seed's report above");
    }
    Ok(())
}
