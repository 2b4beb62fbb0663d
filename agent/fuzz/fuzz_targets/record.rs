//! The ring-buffer record decoder, `record::decode`, on arbitrary bytes (and on headers
//! with a plausible kind and capture length, so that every variant is reached).
//!
//! Checked for every input: nothing panics; a record is refused exactly when it is shorter
//! than a header, claims more captured bytes than follow, or has an unknown kind; a decoded
//! record agrees with the header's fields read independently, byte by byte (so the unsafe
//! unaligned read and the field layout are checked too), and its capture is exactly the
//! `captured` bytes after the header.
#![no_main]

use std::mem::offset_of;

use libfuzzer_sys::fuzz_target;
use vigie::record::{Malformed, Record, SocketTie, decode};
use vigie::vocab::Vantage;
use vigie_common::{
    EVENT_CLOSE, EVENT_FORK, EVENT_HEADER_LEN, EVENT_RECV, EVENT_SEND, EVENT_TLS_CLOSE, EVENT_TLS_RECV, EVENT_TLS_SEND,
    EventHeader, FLAG_NO_BUFFER, FLAG_SOCK_DURING_CALL,
};

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
}

fn check(input: &[u8]) {
    let got = decode(input);
    if input.len() < EVENT_HEADER_LEN {
        assert_eq!(got, Err(Malformed::Short));
        return;
    }
    let kind = u32_at(input, offset_of!(EventHeader, kind));
    let flags = u32_at(input, offset_of!(EventHeader, flags));
    let captured = u32_at(input, offset_of!(EventHeader, captured)) as usize;
    let conn = u64_at(input, offset_of!(EventHeader, conn));
    let generation = u64_at(input, offset_of!(EventHeader, conn_start_ns));
    let ts_ns = u64_at(input, offset_of!(EventHeader, ts_ns));
    let bytes = u64_at(input, offset_of!(EventHeader, bytes));
    let sock_hint = u64_at(input, offset_of!(EventHeader, sock_hint));
    let sent = u64_at(input, offset_of!(EventHeader, sent_total));
    let seq = u32_at(input, offset_of!(EventHeader, recv_seq));
    let pid_tgid = u64_at(input, offset_of!(EventHeader, pid_tgid));
    if input.len() - EVENT_HEADER_LEN < captured {
        assert_eq!(got, Err(Malformed::CaptureOverrun));
        return;
    }
    let data = &input[EVENT_HEADER_LEN..EVENT_HEADER_LEN + captured];
    let tie = if sock_hint == 0 {
        SocketTie::Unknown
    } else if flags & FLAG_SOCK_DURING_CALL != 0 {
        SocketTie::DuringCall
    } else {
        SocketTie::BeforeCall
    };
    let check_rx = |rx: &vigie::record::Receive<'_>, vantage| {
        assert_eq!((rx.conn.vantage, rx.conn.id, rx.conn.generation), (vantage, conn, generation));
        assert_eq!((rx.ts_ns, rx.bytes), (ts_ns, bytes));
        assert_eq!(rx.data, data);
        assert_eq!(rx.blind, flags & FLAG_NO_BUFFER != 0);
    };
    let key = |c: vigie::vocab::ConnKey, vantage| {
        assert_eq!((c.vantage, c.id, c.generation), (vantage, conn, generation));
    };
    match (kind, got) {
        (EVENT_RECV, Ok(Record::Recv { rx, sent_total, recv_seq })) => {
            check_rx(&rx, Vantage::Socket);
            assert_eq!((sent_total, recv_seq), (sent, seq));
        }
        (EVENT_SEND, Ok(Record::Send { conn: c, ts_ns: t, bytes: b })) => {
            key(c, Vantage::Socket);
            assert_eq!((t, b), (ts_ns, bytes));
        }
        (EVENT_CLOSE, Ok(Record::Close { conn: c, ts_ns: t, sent_total })) => {
            key(c, Vantage::Socket);
            assert_eq!((t, sent_total), (ts_ns, sent));
        }
        (EVENT_TLS_RECV, Ok(Record::TlsRecv { rx, tie: t })) => {
            check_rx(&rx, Vantage::Tls);
            assert_eq!(t, tie);
        }
        (EVENT_TLS_SEND, Ok(Record::TlsSend { conn: c, ts_ns: t, bytes: b, tie: ti })) => {
            key(c, Vantage::Tls);
            assert_eq!((t, b, ti), (ts_ns, bytes, tie));
        }
        (EVENT_TLS_CLOSE, Ok(Record::TlsClose { conn: c, ts_ns: t })) => {
            key(c, Vantage::Tls);
            assert_eq!(t, ts_ns);
        }
        (EVENT_FORK, Ok(Record::Fork { parent, child })) => {
            assert_eq!((parent, child), ((pid_tgid >> 32) as u32, bytes as u32));
        }
        (k, Err(Malformed::UnknownKind(u))) if k == u && !(EVENT_RECV..=EVENT_FORK).contains(&k) => {}
        (k, other) => panic!("kind {k} decoded as {other:?}"),
    }
}

fuzz_target!(|input: &[u8]| {
    check(input);
    // The same bytes with a known kind and a capture length that fits, half the time short by
    // one: most arbitrary inputs would otherwise stop at the kind or the length check.
    if input.len() >= EVENT_HEADER_LEN + 1 {
        let mut v = input.to_vec();
        let kind = EVENT_RECV + u32::from(input[EVENT_HEADER_LEN]) % 7;
        let spare = (v.len() - EVENT_HEADER_LEN) as u32;
        let captured = if input[0] & 1 == 0 { spare } else { spare + 1 };
        v[offset_of!(EventHeader, kind)..][..4].copy_from_slice(&kind.to_ne_bytes());
        v[offset_of!(EventHeader, captured)..][..4].copy_from_slice(&captured.to_ne_bytes());
        check(&v);
    }
});
