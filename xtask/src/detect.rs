//! `cargo xtask detect --draws N [--nio-draws M] [--browser-draws B] [--seed S] [--concurrency C]
//! [--horizon SECS]`:
//! many drawn scrapes (N made with the tests' HTTP client, M with matrix-nio, a quarter of N by
//! default, B by matrix-js-sdk in headless Chromium, an eighth of N by default) and the
//! legitimate heavy readers against one real Synapse (tests/test_detection_draws.py), with the
//! distribution of times to detect and every reader's peak score printed at the end (and left
//! in target/detect/draws-seed{S}.txt). CI runs the same file with its default of 8 draws.
//! `--horizon` lets a draw that is not flagged run on past its 300 s target (up to SECS after
//! its first request), so that a miss says how late it is caught, not only that it was missed.

use anyhow::{Context, Result, bail};
use std::process::Command;

use crate::{build_release, root, setup, sh, step};

pub fn run(args: &[String]) -> Result<()> {
    let mut draws: u32 = 20;
    let mut nio_draws: Option<u32> = None;
    let mut browser_draws: Option<u32> = None;
    let mut seed: Option<u64> = None;
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
                     [--browser-draws B] [--seed S] [--concurrency C] [--horizon SECS]"
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
    setup()?;
    let bin = build_release()?;
    let seed = seed.unwrap_or(1);
    let nio_draws = nio_draws.unwrap_or((draws / 4).max(2));
    let browser_draws = browser_draws.unwrap_or((draws / 8).max(2));
    let out = root().join("target/detect");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let report = out.join(format!("draws-seed{seed}.txt"));
    step(&format!(
        "Detection draws: {draws} drawn scrapes, {nio_draws} made with matrix-nio and {browser_draws} in \
         Chromium ({concurrency} at a time), and the heavy readers, seed {seed}, misses running \
         up to {horizon} s (tests/test_detection_draws.py; needs root for BPF)"
    ));
    let result = sh(Command::new(root().join("tests/.venv/bin/python"))
        .current_dir(root())
        .args(["-m", "pytest", "tests/test_detection_draws.py", "-q", "-s", "-p", "no:cacheprovider"])
        .env("VIGIE_BIN", bin)
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
    result
}
