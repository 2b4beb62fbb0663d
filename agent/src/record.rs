//! Ring-buffer records, decoded once into typed values.
//!
//! The kernel writes an [`EventHeader`] and, for receives, the bytes it copied. [`decode`]
//! checks the record's length against what the header claims and names what happened; the
//! rest of the agent ([`crate::pipeline::State::apply`]) acts on the [`Record`] and never
//! reads raw header fields. A record that cannot be decoded is a [`Malformed`], counted by the
//! caller, never a panic.

use vigie_common::{
    EVENT_CLOSE, EVENT_FORK, EVENT_HEADER_LEN, EVENT_RECV, EVENT_SEND, EVENT_TLS_CLOSE, EVENT_TLS_RECV, EVENT_TLS_SEND,
    EventHeader, FLAG_NO_BUFFER, FLAG_SOCK_DURING_CALL,
};

use crate::vocab::{ConnKey, Vantage};

/// A receive: `bytes` moved, of which the first `data.len()` were copied (fewer when the
/// capture limit was reached, the data went to a second iovec, or the copy failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receive<'a> {
    pub conn: ConnKey,
    pub ts_ns: u64,
    pub bytes: u64,
    pub data: &'a [u8],
    /// Nothing was copied because the kernel knew no buffer for this receive.
    pub blind: bool,
}

/// How a TLS record's TCP socket was known (`vigie_tls_records_total{socket}`). In the order
/// of their label values, the order of the exposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SocketTie {
    /// The thread's previous receive (memory-BIO servers): a hint.
    BeforeCall,
    /// The library did the socket I/O during the call: certain.
    DuringCall,
    Unknown,
}

impl SocketTie {
    pub fn as_str(self) -> &'static str {
        match self {
            SocketTie::DuringCall => "during_call",
            SocketTie::BeforeCall => "before_call",
            SocketTie::Unknown => "unknown",
        }
    }
}

/// One kernel record, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// A receive on a watched socket, with the connection's running send total read after it
    /// and the receive's number on the connection.
    Recv { rx: Receive<'a>, sent_total: u64, recv_seq: u32 },
    /// A send on a watched socket (the socket sources add sends up in the kernel instead).
    Send { conn: ConnKey, ts_ns: u64, bytes: u64 },
    /// A watched socket closed, with its last running send total.
    Close { conn: ConnKey, ts_ns: u64, sent_total: u64 },
    /// Plaintext out of `SSL_read`.
    TlsRecv { rx: Receive<'a>, tie: SocketTie },
    /// Plaintext into `SSL_write`.
    TlsSend { conn: ConnKey, ts_ns: u64, bytes: u64, tie: SocketTie },
    /// `SSL_free`.
    TlsClose { conn: ConnKey, ts_ns: u64 },
    /// A process with per-process TLS probes forked.
    Fork { parent: u32, child: u32 },
}

/// Why a record could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than a header.
    Short,
    /// The header claims more captured bytes than follow it.
    CaptureOverrun,
    /// A `kind` this agent does not know.
    UnknownKind(u32),
}

/// Decode one ring-buffer record. Bytes after the capture are ignored, as the ring's
/// alignment padding is.
pub fn decode(record: &[u8]) -> Result<Record<'_>, Malformed> {
    let head = record.get(..EVENT_HEADER_LEN).ok_or(Malformed::Short)?;
    // SAFETY: `head` is exactly size_of::<EventHeader>() bytes and EventHeader is plain data
    // valid for any bit pattern; read_unaligned copes with the ring's alignment.
    let h: EventHeader = unsafe { std::ptr::read_unaligned(head.as_ptr().cast()) };
    let data = record
        .get(EVENT_HEADER_LEN..EVENT_HEADER_LEN.saturating_add(h.captured as usize))
        .ok_or(Malformed::CaptureOverrun)?;
    let socket = ConnKey { vantage: Vantage::Socket, id: h.conn, generation: h.conn_start_ns };
    let tls = ConnKey { vantage: Vantage::Tls, ..socket };
    let receive = |conn| Receive { conn, ts_ns: h.ts_ns, bytes: h.bytes, data, blind: h.flags & FLAG_NO_BUFFER != 0 };
    let tie = match (h.sock_hint, h.flags & FLAG_SOCK_DURING_CALL != 0) {
        (0, _) => SocketTie::Unknown,
        (_, true) => SocketTie::DuringCall,
        (_, false) => SocketTie::BeforeCall,
    };
    Ok(match h.kind {
        EVENT_RECV => Record::Recv { rx: receive(socket), sent_total: h.sent_total, recv_seq: h.recv_seq },
        EVENT_SEND => Record::Send { conn: socket, ts_ns: h.ts_ns, bytes: h.bytes },
        EVENT_CLOSE => Record::Close { conn: socket, ts_ns: h.ts_ns, sent_total: h.sent_total },
        EVENT_TLS_RECV => Record::TlsRecv { rx: receive(tls), tie },
        EVENT_TLS_SEND => Record::TlsSend { conn: tls, ts_ns: h.ts_ns, bytes: h.bytes, tie },
        EVENT_TLS_CLOSE => Record::TlsClose { conn: tls, ts_ns: h.ts_ns },
        // The child's pid travels in `bytes`; a pid fits in 32 bits.
        EVENT_FORK => Record::Fork { parent: (h.pid_tgid >> 32) as u32, child: h.bytes as u32 },
        other => return Err(Malformed::UnknownKind(other)),
    })
}

/// The bytes the kernel would write for `header` and `payload` (tests, benchmarks, fuzzing).
pub fn encode(header: &EventHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; EVENT_HEADER_LEN];
    // SAFETY: EventHeader is #[repr(C)] plain data, EVENT_HEADER_LEN bytes long.
    unsafe {
        std::ptr::copy_nonoverlapping((header as *const EventHeader).cast::<u8>(), out.as_mut_ptr(), EVENT_HEADER_LEN)
    };
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u32) -> EventHeader {
        EventHeader {
            kind,
            conn: 0xffff_8880_0000_1000,
            conn_start_ns: 7,
            ts_ns: 1_000,
            pid_tgid: 42 << 32 | 43,
            ..EventHeader::default()
        }
    }

    #[test]
    fn a_receive_keeps_its_capture_counts_and_flags() {
        let h = EventHeader { bytes: 100, captured: 3, sent_total: 55, recv_seq: 9, ..header(EVENT_RECV) };
        let bytes = encode(&h, b"GETtrailing padding");
        let Ok(Record::Recv { rx, sent_total, recv_seq }) = decode(&bytes) else { panic!("{:?}", decode(&bytes)) };
        assert_eq!(rx.data, b"GET");
        assert_eq!((rx.bytes, sent_total, recv_seq), (100, 55, 9));
        assert_eq!(rx.conn, ConnKey { vantage: Vantage::Socket, id: 0xffff_8880_0000_1000, generation: 7 });
        assert!(!rx.blind);
    }

    #[test]
    fn tls_records_carry_their_vantage_and_socket_tie() {
        let cases = [
            (0, 0, SocketTie::Unknown),
            (9, FLAG_SOCK_DURING_CALL, SocketTie::DuringCall),
            (9, 0, SocketTie::BeforeCall),
        ];
        for (hint, flags, want) in cases {
            let h = EventHeader { sock_hint: hint, flags, bytes: 5, ..header(EVENT_TLS_SEND) };
            let Ok(Record::TlsSend { conn, tie, bytes, .. }) = decode(&encode(&h, &[])) else { panic!() };
            assert_eq!((conn.vantage, tie, bytes), (Vantage::Tls, want, 5));
        }
        let h = EventHeader { flags: FLAG_NO_BUFFER, bytes: 10, ..header(EVENT_TLS_RECV) };
        let bytes = encode(&h, &[]);
        let Ok(Record::TlsRecv { rx, .. }) = decode(&bytes) else { panic!() };
        assert!(rx.blind && rx.data.is_empty());
    }

    #[test]
    fn a_fork_names_parent_and_child() {
        let h = EventHeader { bytes: 4242, ..header(EVENT_FORK) };
        assert_eq!(decode(&encode(&h, &[])), Ok(Record::Fork { parent: 42, child: 4242 }));
    }

    #[test]
    fn short_lying_and_unknown_records_are_malformed() {
        let h = EventHeader { captured: 10, ..header(EVENT_RECV) };
        let full = encode(&h, &[0; 10]);
        assert_eq!(decode(&full[..EVENT_HEADER_LEN - 1]), Err(Malformed::Short));
        assert_eq!(decode(&full[..full.len() - 1]), Err(Malformed::CaptureOverrun));
        assert_eq!(decode(&encode(&header(99), &[])), Err(Malformed::UnknownKind(99)));
        let h = EventHeader { captured: u32::MAX, ..header(EVENT_RECV) };
        assert_eq!(decode(&encode(&h, &[])), Err(Malformed::CaptureOverrun));
    }
}
