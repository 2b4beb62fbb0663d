//! Which processes listen on a port, from /proc.
//!
//! Used to seed the kernel's list of server processes (whose receives are worth remembering)
//! and to find the OpenSSL a TLS server has mapped. Linux only exposes the owner of a socket
//! through the owner's file descriptors, so this walks /proc/*/fd: cheap enough every few
//! seconds, not on a hot path.

use std::collections::BTreeSet;

/// Socket inodes listening on any of `ports` (IPv4 and IPv6).
pub fn listening_inodes(ports: &[u16]) -> BTreeSet<u64> {
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        inodes.extend(parse_listeners(&text, ports));
    }
    inodes
}

/// The inodes of `LISTEN` sockets on `ports` in one /proc/net/tcp{,6} table.
fn parse_listeners(table: &str, ports: &[u16]) -> Vec<u64> {
    listening_sockets(table).filter(|(port, _)| ports.contains(port)).map(|(_, inode)| inode).collect()
}

/// (local port, inode) of each `LISTEN` socket in one /proc/net/tcp{,6} table.
fn listening_sockets(table: &str) -> impl Iterator<Item = (u16, u64)> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (cols.get(1)?, cols.get(3)?, cols.get(9)?);
        // 0A is TCP_LISTEN.
        if *state != "0A" {
            return None;
        }
        let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
        Some((port, inode.parse().ok()?))
    })
}

/// Local ports in LISTEN state (IPv4 and IPv6), sorted, without repeats.
pub fn listening_ports() -> Vec<u16> {
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        ports.extend(listening_sockets(&text).map(|(port, _)| port));
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Processes holding one of these socket inodes.
pub fn pids_with_sockets(inodes: &BTreeSet<u64>) -> Vec<u32> {
    let mut pids = Vec::new();
    if inodes.is_empty() {
        return pids;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return pids };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| {
                    l.to_str().and_then(|s| s.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok())
                })
                .is_some_and(|inode| inodes.contains(&inode))
        });
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// Processes listening on any of `ports`.
pub fn server_pids(ports: &[u16]) -> Vec<u32> {
    pids_with_sockets(&listening_inodes(ports))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F48 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F48 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn only_listening_sockets_on_the_ports_asked_for_are_found() {
        assert_eq!(parse_listeners(TABLE, &[8008]), vec![4242]);
        assert_eq!(parse_listeners(TABLE, &[80, 8008]), vec![4242, 4444]);
        assert!(parse_listeners(TABLE, &[9]).is_empty());
    }

    #[test]
    fn a_process_listening_here_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(server_pids(&[port]).contains(&std::process::id()));
    }
}
