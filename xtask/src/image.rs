//! `cargo xtask image`: the container image of the DaemonSet, built without a daemon or a
//! registry (deploy/container/Containerfile says what goes in and docs/fleet.md why).
//!
//! The root filesystem is assembled here: the release binary, the default config, and exactly
//! the shared objects `ldd` lists for the binary (the dynamic loader included), taken from this
//! host's Debian packages after `dpkg --verify` has checked them against the packages' own
//! checksums. Each owning package leaves its dpkg status record (`/var/lib/dpkg/status.d/`,
//! the distroless layout) and its copyright file, so image scanners see which Debian package
//! and version each library is, and licences travel with the binaries. buildah turns the
//! directory into an image (`FROM scratch`, nothing run at build time), with every timestamp
//! set to the last commit's so the same tree gives the same image.

use std::collections::BTreeSet;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{root, sh, step};

/// The image's repository name; buildah stores it as localhost/vigie (a local image, not
/// something to pull) and the kustomize base refers to it by that name.
pub const NAME: &str = "localhost/vigie";

/// `cargo xtask image [--bin PATH]`: with `--bin`, pack that release binary (the one a test run
/// just tested) instead of building one.
pub fn run(args: &[String]) -> Result<()> {
    crate::setup()?;
    let bin = match args {
        [] => crate::build_release()?,
        [flag, path] if flag == "--bin" => PathBuf::from(path),
        _ => bail!("usage: cargo xtask image [--bin PATH] (got {args:?})"),
    };
    let started = Instant::now();
    let built = build(&bin)?;
    step(&format!(
        "Image {} ({}): {} uncompressed, archive {} ({}), built in {:.1} s after the binary",
        built.reference,
        built.id,
        mib(built.rootfs_bytes),
        built.archive.display(),
        mib(built.archive_bytes),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

pub struct Built {
    pub reference: String,
    pub id: String,
    pub archive: PathBuf,
    pub archive_bytes: u64,
    pub rootfs_bytes: u64,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Build the image from the release binary `bin`: tagged `NAME:VERSION` in the local
/// containers storage, and written to target/image/vigie-VERSION.oci.tar.
pub fn build(bin: &Path) -> Result<Built> {
    let version = binary_version(bin)?;
    let out = root().join("target/image");
    let context = out.join("context");
    let rootfs = context.join("rootfs");
    if context.exists() {
        std::fs::remove_dir_all(&context).with_context(|| format!("removing {}", context.display()))?;
    }
    step(&format!("Image root filesystem in {}", rootfs.display()));
    for dir in ["usr/bin", "etc/vigie", "var/lib/vigie", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(dir)).with_context(|| format!("creating {dir} in the image"))?;
    }
    // The key directory is the agent's alone (as the agent itself would create it); /tmp as usual.
    set_mode(&rootfs.join("var/lib/vigie"), 0o700)?;
    set_mode(&rootfs.join("tmp"), 0o1777)?;

    // Debug info stays out (it is three quarters of the binary); the symbol table stays in, so
    // backtraces still name functions. The GNU build id is kept: it ties the image's binary to
    // the release build it came from.
    let image_bin = rootfs.join("usr/bin/vigie");
    sh(Command::new("objcopy").arg("--strip-debug").arg(bin).arg(&image_bin))
        .context("objcopy (package binutils) stripping debug info")?;
    std::fs::copy(root().join("deploy/vigie.toml"), rootfs.join("etc/vigie/vigie.toml"))
        .context("copying deploy/vigie.toml")?;

    let mut packages = BTreeSet::new();
    for lib in shared_objects(bin)? {
        let package = owning_package(&lib)?;
        place(&lib, &rootfs)?;
        packages.insert(package);
    }
    std::fs::create_dir_all(rootfs.join("var/lib/dpkg/status.d"))?;
    for package in &packages {
        verify_package(package)?;
        let status = output(Command::new("dpkg-query").args(["-s", package]))?;
        let name = package.split(':').next().unwrap_or(package);
        std::fs::write(rootfs.join("var/lib/dpkg/status.d").join(name), status)?;
        let copyright = Path::new("/usr/share/doc").join(name).join("copyright");
        if copyright.exists() {
            place(&copyright, &rootfs)?;
        }
    }
    // Scanners read the distribution from os-release (the libraries are Debian's).
    place(Path::new("/etc/os-release"), &rootfs)?;
    step(&format!("Libraries from Debian packages {}, checked with dpkg --verify", join(&packages)));

    let epoch = source_date_epoch()?;
    let reference = format!("{NAME}:{version}");
    step(&format!("buildah build -t {reference} (FROM scratch, timestamps at {epoch})"));
    sh(Command::new("buildah")
        .args(["build", "--quiet", "--layers=false", "--format", "oci"])
        .arg(format!("--timestamp={epoch}"))
        .arg(format!("--build-arg=VERSION={version}"))
        .arg("--file")
        .arg(root().join("deploy/container/Containerfile"))
        .args(["--tag", &reference])
        .arg(&context))
    .context("buildah (package buildah) building the image")?;
    let id = output(Command::new("buildah").args(["images", "--no-trunc", "--format", "{{.ID}}", &reference]))?
        .trim()
        .to_string();

    let archive = out.join(format!("vigie-{version}.oci.tar"));
    let _ = std::fs::remove_file(&archive);
    sh(Command::new("buildah")
        .args(["push", "--quiet", &reference])
        .arg(format!("oci-archive:{}:{reference}", archive.display())))
    .context("buildah push to an oci-archive")?;
    Ok(Built {
        reference,
        id,
        archive_bytes: std::fs::metadata(&archive)?.len(),
        archive,
        rootfs_bytes: tree_bytes(&rootfs)?,
    })
}

/// "0.1.0" from `vigie --version` ("vigie 0.1.0"): the version of the binary that goes in.
fn binary_version(bin: &Path) -> Result<String> {
    let text = output(Command::new(bin).arg("--version"))?;
    match text.split_whitespace().collect::<Vec<_>>()[..] {
        ["vigie", version] => Ok(version.to_string()),
        _ => bail!("unexpected `vigie --version` output {text:?}"),
    }
}

/// The shared objects the dynamic loader maps for `bin`, the loader itself included (the vDSO
/// is the kernel's, not a file).
fn shared_objects(bin: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(bin))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            _ if line.starts_with("linux-vdso") => {}
            _ => bail!("ldd {}: cannot place {line:?} (a library not found?)", bin.display()),
        }
    }
    if libs.is_empty() {
        bail!("ldd lists no shared object for {}: is it the dynamic release build?", bin.display());
    }
    Ok(libs)
}

/// The Debian package that installed `path` ("libc6:amd64"): a library from nowhere refuses
/// the build rather than going in unaccounted.
fn owning_package(path: &Path) -> Result<String> {
    let text = output(Command::new("dpkg-query").arg("-S").arg(path))
        .with_context(|| format!("{} belongs to no Debian package", path.display()))?;
    let line = text.lines().next().unwrap_or_default();
    match line.split_once(": ") {
        Some((package, _)) if !package.contains(',') => Ok(package.to_string()),
        _ => bail!("cannot tell which package owns {}: {line:?}", path.display()),
    }
}

/// `dpkg --verify` prints one line per file whose checksum differs from the package's record.
fn verify_package(package: &str) -> Result<()> {
    let text = output(Command::new("dpkg").args(["--verify", package]))?;
    if !text.trim().is_empty() {
        bail!("dpkg --verify {package}: files differ from the package:\n{text}");
    }
    Ok(())
}

/// Copy `path` into `rootfs` at the same place, recreating every symbolic link met on the way
/// (merged /usr's `/lib -> usr/lib`, the loader's `/lib64/ld-linux-x86-64.so.2`) as a link, and
/// the file it ends at as a file.
fn place(path: &Path, rootfs: &Path) -> Result<()> {
    let mut host = PathBuf::from("/");
    let components: Vec<Component> = path.components().collect();
    for (i, c) in components.iter().enumerate() {
        let Component::Normal(name) = c else { continue };
        host.push(name);
        let meta = std::fs::symlink_metadata(&host).with_context(|| format!("reading {}", host.display()))?;
        let inside = rootfs.join(host.strip_prefix("/")?);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&host)?;
            if std::fs::symlink_metadata(&inside).is_err() {
                if let Some(parent) = inside.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                symlink(&target, &inside).with_context(|| format!("linking {}", inside.display()))?;
            }
            // Follow the link, then the rest of the path, from where it points.
            let resolved = host.parent().unwrap_or(Path::new("/")).join(&target);
            let rest: PathBuf = components[i + 1..].iter().collect();
            return place(&normalize(&resolved.join(rest)), rootfs);
        }
        if i + 1 == components.len() {
            if let Some(parent) = inside.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(&host, &inside).with_context(|| format!("copying {}", host.display()))?;
        }
    }
    Ok(())
}

/// `a/b/../c` as `a/c`, without touching the file system (links are followed by `place`).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// SOURCE_DATE_EPOCH when set, else the time of the last commit: rebuilding a tree gives
/// byte-identical layers and config, hence the same image id.
fn source_date_epoch() -> Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"));
    }
    let text = output(Command::new("git").arg("-C").arg(root()).args(["log", "-1", "--format=%ct"]))?;
    text.trim().parse().with_context(|| format!("git log: {text:?} is not a time"))
}

fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        total += if meta.is_dir() { tree_bytes(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?} printed something other than UTF-8"))
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(", ")
}
