//! `cargo xtask soak [--minutes N] [--seed S]`: N minutes (default 30) of mixed normal and
//! attack traffic against a real Synapse with the agent watching it, its memory, table sizes
//! and kernel map entries sampled every minute (`tests/soak.py` says what runs and the
//! flatness criterion). The table, a CSV and the verdict go to `target/soak/`; a failed
//! criterion fails the command. On demand only: `cargo xtask test` does not run it.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{build_release, root, setup, sh, step};

pub fn run(args: &[String]) -> Result<()> {
    let mut minutes: u64 = 30;
    let mut extra: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--minutes" => {
                let v = it.next().context("--minutes needs a value")?;
                minutes = v.parse().with_context(|| format!("--minutes {v:?} is not a number"))?;
            }
            "--seed" => {
                let v = it.next().context("--seed needs a value")?;
                extra.extend(["--seed".to_string(), v.clone()]);
            }
            other => bail!("unknown option {other:?}; usage: cargo xtask soak [--minutes N] [--seed S]"),
        }
    }
    if minutes < 3 {
        bail!("--minutes must be at least 3 (a warm-up minute, a reference minute and one after)");
    }
    setup()?;
    let bin = build_release()?;
    step(&format!("Soak: {minutes} minutes against a real Synapse (tests/soak.py; needs root for BPF)"));
    sh(Command::new(root().join("tests/.venv/bin/python"))
        .current_dir(root())
        .arg("tests/soak.py")
        .args(["--minutes", &minutes.to_string()])
        .args(&extra)
        .env("VIGIE_BIN", bin))
}
