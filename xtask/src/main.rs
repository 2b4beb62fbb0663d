//! `cargo xtask`: the project's own commands for a fresh machine.
//!
//! - `cargo xtask setup`: install what building and testing need (idempotent, says each step).
//! - `cargo xtask run [-- ARGS]`: set up, build, and run the agent on `deploy/vigie.toml`.
//! - `cargo xtask test`: set up, check the house rules (`cargo xtask lint`: rustfmt, clippy
//!   with warnings as errors), build, run the unit tests, a bounded fuzzing step and the
//!   integration tests.
//! - `cargo xtask kernels [--kernel 6.1,6.12] [--keep]`: boot Debian kernels under qemu and run
//!   `vigie check` and a capture smoke test in each (see kernels.rs, docs/kernels.md).
//! - `cargo xtask fuzz [--seconds N] [TARGET...]`: run the cargo-fuzz targets (see fuzz.rs).
//! - `cargo xtask soak [--minutes N]`: the soak against a real Synapse (see soak.rs).
//! - `cargo xtask image [--bin PATH]`: the container image of the DaemonSet, with buildah (see
//!   image.rs); `--bin` packs an already built release binary.
//! - `cargo xtask detect [--draws N] [--seed S | --seeds S,T,...] [--horizon SECS]`: many drawn scrapes and the
//!   legitimate heavy readers against a real Synapse, with the distribution of times to detect
//!   (see detect.rs for every option).
//!
//! Everything is installed from Debian's packages, crates.io and PyPI by name.

mod bench;
mod detect;
mod fuzz;
mod image;
mod kernels;
mod soak;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

const APT_PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22.
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // Integration tests and benchmarks.
    "nginx",
    "prometheus",
    "wrk",
    "bpftool",
    "openssl",
    // Synapse in worker mode (tests/test_fleet.py): PostgreSQL and Redis.
    "postgresql",
    "redis-server",
    // The kernel matrix (`cargo xtask kernels`): qemu, and busybox for the guest's /init.
    "qemu-system-x86",
    "busybox-static",
    // The container image (`cargo xtask image`): buildah builds it, objcopy strips the binary's
    // debug info; the image test runs it with podman, on runc (crun 1.8 refuses hybrid cgroups).
    "buildah",
    "binutils",
    "podman",
    "runc",
    // The detection tests' real-browser client (tests/harness/browser.py): matrix-js-sdk in
    // headless Chromium.
    "chromium",
];
const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_DEB_VERSION: &str = "3.8.0";
/// Builds with stable 1.95; the targets themselves build with the nightly above.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("lint") => setup().and_then(|()| lint()),
        Some("bench") => bench::run(&args[1..]),
        Some("kernels") => kernels::run(&args[1..]),
        Some("fuzz") => setup().and_then(|()| fuzz::run(&args[1..])),
        Some("soak") => soak::run(&args[1..]),
        Some("detect") => detect::run(&args[1..]),
        Some("image") => image::run(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask setup | run [-- ARGS] | test [PYTEST ARGS] | lint | bench | kernels [--kernel 6.1,6.12] [--keep] | fuzz [--seconds N] [TARGET...] | soak [--minutes N] | detect [--draws N] [--seed S | --seeds S,T,...] [--horizon SECS] | image [--bin PATH]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Each step says how long the run has taken so far: CI keeps only a failed run's output, and
/// the suite's time budget (an hour on a 2-core machine) is judged from these lines.
fn step(what: &str) {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let elapsed = START.get_or_init(std::time::Instant::now).elapsed().as_secs();
    eprintln!("==> [{}:{:02}] {what}", elapsed / 60, elapsed % 60);
}

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin").join(name)
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !succeeds(Command::new("dpkg-query").args(["-W", "-f=${Status}", p])))
        .collect();
    if missing.is_empty() {
        step("Debian packages: all present");
    } else {
        step(&format!("Debian packages: installing {}", missing.join(" ")));
        sh(Command::new("apt-get").arg("update").arg("-qq"))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // kubectl (for `kubectl kustomize` in the deploy tests) ships with this machine image from
    // Google's repository, not Debian's (whose kubernetes-client is too old for kustomize
    // components): try, and let the test name it if it is still missing.
    if !succeeds(Command::new("kubectl").args(["version", "--client"])) {
        step("kubectl: missing; trying apt-get install kubectl");
        if sh(Command::new("apt-get").args(["install", "-y", "-qq", "kubectl"])).is_err() {
            eprintln!("warning: kubectl could not be installed; the kustomize test will fail and say so");
        }
    }
    // nginx and prometheus start services on install; the tests run their own instances.
    let _ = Command::new("systemctl").args(["disable", "--now", "nginx", "prometheus"]).output();
    // The venv needs only python3, the browser client only npm; they install while the Rust
    // tools below build.
    let venv = std::thread::spawn(python_venv);
    let js = std::thread::spawn(browser_client);

    if succeeds(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--version"])) {
        step("Rust nightly toolchain (for the eBPF target): present");
    } else {
        step("Rust nightly toolchain (for the eBPF target): installing");
        sh(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    }
    step("rust-src for nightly (build-std=core for bpfel-unknown-none): ensuring");
    sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    // `cargo xtask lint` runs rustfmt on the tree and clippy on both toolchains.
    step("rustfmt and clippy (stable and nightly, for the house rules): ensuring");
    for toolchain in ["stable", NIGHTLY] {
        sh(Command::new("rustup").args(["component", "add", "rustfmt", "clippy", "--toolchain", toolchain]))?;
    }

    let linker = cargo_bin("bpf-linker");
    let have = Command::new(&linker).arg("--version").output().ok().filter(|o| o.status.success());
    if have.is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
    } else {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: building against LLVM 22 (about a minute)"));
        let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
        sh(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path))?;
    }

    let deb = cargo_bin("cargo-deb");
    let have = Command::new(&deb).arg("--version").output().ok().filter(|o| o.status.success());
    if have.is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION)) {
        step(&format!("cargo-deb {CARGO_DEB_VERSION} (builds the .deb): present"));
    } else {
        step(&format!("cargo-deb {CARGO_DEB_VERSION} (builds the .deb): installing (about 90 s)"));
        sh(Command::new("cargo").args(["install", "cargo-deb", "--version", CARGO_DEB_VERSION, "--locked"]))?;
    }

    ensure_cargo_fuzz()?;

    js.join().map_err(|_| anyhow::anyhow!("the browser client's installer thread panicked"))??;
    venv.join().map_err(|_| anyhow::anyhow!("the Python venv's installer thread panicked"))?
}

/// The detection tests' browser client (tests/js: matrix-js-sdk and esbuild, exactly as
/// package-lock.json pins them), unless tests/js/node_modules was installed from that lock.
fn browser_client() -> Result<()> {
    let dir = root().join("tests/js");
    let lock = std::fs::read_to_string(dir.join("package-lock.json")).context("reading tests/js/package-lock.json")?;
    let stamp = dir.join("node_modules/.vigie-lock");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(lock.as_str()) {
        step("Browser client for the detection tests (matrix-js-sdk, esbuild): present");
        return Ok(());
    }
    if !succeeds(Command::new("npm").arg("--version")) {
        step("npm: missing; installing Debian's nodejs and npm");
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "nodejs", "npm"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    step("Browser client for the detection tests: npm ci in tests/js (matrix-js-sdk, esbuild)");
    sh(Command::new("npm").current_dir(&dir).args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]))?;
    std::fs::write(&stamp, lock)?;
    step("Browser client for the detection tests: ready");
    Ok(())
}

/// The integration tests' Python venv (Synapse, clients, pytest), unless tests/requirements.txt
/// is what it was built from. Mostly downloads: it runs beside the Rust tools' builds.
fn python_venv() -> Result<()> {
    let venv = root().join("tests/.venv");
    let requirements = root().join("tests/requirements.txt");
    let stamp = venv.join(".requirements");
    let wanted = std::fs::read_to_string(&requirements).context("reading tests/requirements.txt")?;
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        step("Python venv for the integration tests (Synapse, clients, pytest): present");
    } else {
        step("Python venv for the integration tests: creating tests/.venv and installing Synapse, clients, pytest");
        sh(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        sh(Command::new(venv.join("bin/pip")).args(["install", "-q", "--upgrade", "pip"]))?;
        sh(Command::new(venv.join("bin/pip")).args(["install", "-q", "-r"]).arg(&requirements))?;
        std::fs::write(&stamp, wanted)?;
        step("Python venv for the integration tests: ready");
    }
    Ok(())
}

/// cargo-fuzz, pinned (the fuzz targets run in `cargo xtask test` and `cargo xtask fuzz`).
fn ensure_cargo_fuzz() -> Result<()> {
    let fuzz = cargo_bin("cargo-fuzz");
    let have = Command::new(&fuzz).arg("--version").output().ok().filter(|o| o.status.success());
    if have.is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)) {
        step(&format!("cargo-fuzz {CARGO_FUZZ_VERSION} (fuzz targets): present"));
    } else {
        step(&format!("cargo-fuzz {CARGO_FUZZ_VERSION} (fuzz targets): installing (about a minute)"));
        sh(Command::new("cargo").args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked"]))?;
    }
    Ok(())
}

fn build_release() -> Result<PathBuf> {
    step("Building vigie (release; the eBPF programs are built by its build script)");
    sh(Command::new("cargo").current_dir(root()).args(["build", "--release", "--locked", "-p", "vigie"]))?;
    Ok(root().join("target/release/vigie"))
}

fn run(args: &[String]) -> Result<()> {
    setup()?;
    let bin = build_release()?;
    let args: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    let mut cmd = Command::new(bin);
    if args.is_empty() {
        let config = root().join("deploy/vigie.toml");
        step(&format!("Running: vigie run --config {}", config.display()));
        cmd.arg("run").arg("--config").arg(config);
    } else {
        cmd.args(args);
    }
    sh(&mut cmd)
}

/// The house rules, checked by machine before any test runs: formatting (rustfmt.toml) and
/// clippy with warnings as errors, for the host crates and for the kernel crate on its target.
fn lint() -> Result<()> {
    step("House rules: cargo fmt --check (rustfmt.toml)");
    sh(Command::new("cargo").current_dir(root()).args(["fmt", "--all", "--", "--check"]))
        .context("the tree is not formatted: run `cargo fmt --all`")?;
    step("House rules: cargo clippy -D warnings (agent, xtask, vigie-common; all targets)");
    sh(Command::new("cargo").current_dir(root()).args([
        "clippy",
        "--release",
        "--locked",
        "-p",
        "vigie",
        "-p",
        "xtask",
        "-p",
        "vigie-common",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("House rules: cargo clippy -D warnings (the eBPF crate, for bpfel-unknown-none)");
    sh(Command::new("rustup").current_dir(root()).args([
        "run",
        NIGHTLY,
        "cargo",
        "clippy",
        "--release",
        "--locked",
        "-p",
        "vigie-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "target/ebpf-clippy",
        "--",
        "-D",
        "warnings",
    ]))
}

fn test(pytest_args: &[String]) -> Result<()> {
    setup()?;
    lint()?;
    let bin = build_release()?;
    step("Unit tests (cargo test)");
    sh(Command::new("cargo").current_dir(root()).args(["test", "--release", "--locked"]))?;
    step(&format!(
        "Fuzzing, bounded: {} s per target ({}); `cargo xtask fuzz --seconds N` for longer",
        fuzz::DEFAULT_SECONDS,
        fuzz::TARGETS.join(", ")
    ));
    let targets: Vec<String> = fuzz::TARGETS.iter().map(|t| t.to_string()).collect();
    fuzz::fuzz(&targets, fuzz::DEFAULT_SECONDS)?;
    step("Integration tests against real Synapse, nginx, Prometheus (pytest; needs root for BPF)");
    sh(Command::new(root().join("tests/.venv/bin/python"))
        .current_dir(root())
        .args(["-m", "pytest", "tests/"])
        // The slowest tests and fixtures, by name, in every run's output: where the hour goes.
        .arg("--durations=30")
        .args(pytest_args)
        .env("VIGIE_BIN", bin))
}
