//! Finding OpenSSL in a file, and finding the files that hold it for a listening server.
//!
//! Shared `libssl.so.3` exports `SSL_read`/`SSL_write` in `.dynsym`. A statically linked
//! OpenSSL (Synapse from PyPI carries one inside cryptography's `_rust.abi3.so`) has them only
//! as *local* symbols in `.symtab`. Both are searched, and the uprobe is attached at the file
//! offset we compute, so local symbols work the same as exported ones.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSegment, ObjectSymbol};

/// The functions vigie probes; `SSL_free` ends a connection.
pub const SSL_FUNCTIONS: &[&str] = &["SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex", "SSL_free"];

/// File offsets of the SSL functions in one object file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SslSymbols {
    /// (function name, file offset), for each function found.
    pub offsets: Vec<(&'static str, u64)>,
}

impl SslSymbols {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.offsets.iter().find(|(n, _)| *n == name).map(|(_, o)| *o)
    }

    /// Enough to account traffic: at least one read and one write entry point.
    pub fn usable(&self) -> bool {
        (self.get("SSL_read").is_some() || self.get("SSL_read_ex").is_some())
            && (self.get("SSL_write").is_some() || self.get("SSL_write_ex").is_some())
    }
}

/// Find the SSL functions in an ELF file (executable or shared library).
pub fn find_ssl_symbols(path: &Path) -> Result<SslSymbols> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data).with_context(|| format!("{} is not an ELF object", path.display()))?;
    let mut found = SslSymbols::default();
    for &name in SSL_FUNCTIONS {
        // Exported first (the public entry point), then local definitions.
        let symbol = file
            .dynamic_symbols()
            .chain(file.symbols())
            .find(|s| s.is_definition() && s.address() != 0 && s.name() == Ok(name));
        let Some(symbol) = symbol else { continue };
        if let Some(offset) = file_offset(&file, symbol.address()) {
            found.offsets.push((name, offset));
        }
    }
    Ok(found)
}

/// Virtual address to file offset, through the loadable segment that contains it.
fn file_offset(file: &object::File<'_>, address: u64) -> Option<u64> {
    file.segments().find_map(|seg| {
        let (start, size) = (seg.address(), seg.size());
        let (file_start, file_size) = seg.file_range();
        (address >= start && address < start + size && address - start < file_size)
            .then(|| file_start + (address - start))
    })
}

/// Executable file mappings of a process, as paths reachable from this mount namespace.
fn mapped_executables(pid: u32) -> Vec<PathBuf> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return Vec::new() };
    let mut paths = BTreeSet::new();
    for line in maps.lines() {
        let mut cols = line.split_whitespace();
        let perms = cols.nth(1).unwrap_or("");
        let path = cols.nth(3).unwrap_or("");
        if perms.contains('x') && path.starts_with('/') {
            paths.insert(path.to_string());
        }
    }
    // Through /proc/PID/root the path resolves in the process's own mount namespace.
    paths.into_iter().map(|p| PathBuf::from(format!("/proc/{pid}/root{p}"))).collect()
}

/// The processes listening on `port` and the files holding OpenSSL each has mapped.
pub fn discover(port: u16) -> Result<Vec<(u32, PathBuf)>> {
    let inodes = super::listeners::listening_inodes(&[port]);
    if inodes.is_empty() {
        bail!("nothing listens on port {port}");
    }
    let mut found = BTreeSet::new();
    for pid in super::listeners::pids_with_sockets(&inodes) {
        for path in mapped_executables(pid) {
            if find_ssl_symbols(&path).map(|s| s.usable()).unwrap_or(false) {
                found.insert((pid, path));
            }
        }
    }
    Ok(found.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_libssl_exports_the_functions_vigie_probes() {
        let lib = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        let symbols = find_ssl_symbols(lib).expect("libssl.so.3 parses (package libssl3)");
        assert!(symbols.usable(), "{symbols:?}");
        assert!(symbols.get("SSL_free").is_some());
    }

    #[test]
    fn a_file_without_openssl_has_no_usable_symbols() {
        let symbols = find_ssl_symbols(Path::new("/bin/true")).unwrap();
        assert!(!symbols.usable());
    }

    #[test]
    fn a_non_elf_file_is_an_error_naming_it() {
        let err = find_ssl_symbols(Path::new("/etc/hostname")).unwrap_err();
        assert!(format!("{err:#}").contains("/etc/hostname"));
    }
}
