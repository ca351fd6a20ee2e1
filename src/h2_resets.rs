//! Stream-level refusals on HTTP/2 connections, made visible.
//!
//! h2 answers a client's stream-level protocol errors — a malformed request (RFC 9113
//! §8.1.1: a connection-specific field, a bad pseudo-header, a `content-length` the DATA
//! does not match), a stream over `max_concurrent_streams`, a stream's flow-control or
//! frame-size violation — with `RST_STREAM` on that stream and keeps the connection.
//! Neither h2 nor hyper reports those to the server: the request never reaches the
//! service. SPEC wants every protocol-level refusal logged and counted, so the gateway
//! reads the 9-byte frame headers of its **own output** on HTTP/2 connections (frames h2
//! wrote, well-formed by construction) and counts each `RST_STREAM` whose error code says
//! the client broke the protocol. Connection-level errors (GOAWAY) end the connection
//! and are counted where it ends (`listener`), with the same labels from
//! [`reason_label`].

use std::net::SocketAddr;
use std::sync::Arc;

use crate::metrics::Metrics;

const FRAME_HEADER_LEN: usize = 9;
const FRAME_TYPE_RST_STREAM: u8 = 0x3;
const RST_STREAM_PAYLOAD_LEN: u32 = 4;

// RFC 9113 §7 error codes.
const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The `onramp_gateway_protocol_errors_total` label for an HTTP/2 error code the gateway
/// sent because of what the client did, on a stream or on the whole connection; `None`
/// for `NO_ERROR`.
pub fn reason_label(code: u32) -> Option<&'static str> {
    Some(match code {
        NO_ERROR => return None,
        ENHANCE_YOUR_CALM => "http2_enhance_your_calm",
        FRAME_SIZE_ERROR => "http2_frame_size",
        COMPRESSION_ERROR => "http2_compression",
        FLOW_CONTROL_ERROR => "http2_flow_control",
        REFUSED_STREAM => "http2_refused_stream",
        _ => "http2_protocol",
    })
}

/// Whether an `RST_STREAM` code the gateway sent is a refusal of the client's stream.
/// Not: `NO_ERROR` (answered before reading the whole body), `CANCEL` (the response
/// was dropped), `INTERNAL_ERROR` (our side or the app failed).
fn is_client_refusal(code: u32) -> bool {
    matches!(
        code,
        PROTOCOL_ERROR
            | FLOW_CONTROL_ERROR
            | STREAM_CLOSED
            | FRAME_SIZE_ERROR
            | REFUSED_STREAM
            | ENHANCE_YOUR_CALM
    )
}

/// Follows the frame boundaries of an HTTP/2 byte stream fed in pieces of any size and
/// reports the error code of every `RST_STREAM` frame. Payloads are skipped by length,
/// so the cost is per frame, not per byte.
#[derive(Debug, Default)]
pub struct ResetScanner {
    head: [u8; FRAME_HEADER_LEN],
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u32,
    /// Inside an `RST_STREAM` payload: its error code so far.
    rst_code: Option<([u8; 4], usize)>,
}

impl ResetScanner {
    pub fn feed(&mut self, mut bytes: &[u8], mut on_reset: impl FnMut(u32)) {
        while !bytes.is_empty() {
            if self.payload_left == 0 {
                let take = (FRAME_HEADER_LEN - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + take].copy_from_slice(&bytes[..take]);
                self.head_len += take;
                bytes = &bytes[take..];
                if self.head_len < FRAME_HEADER_LEN {
                    return;
                }
                self.head_len = 0;
                let len = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]);
                self.payload_left = len;
                self.rst_code = (self.head[3] == FRAME_TYPE_RST_STREAM
                    && len == RST_STREAM_PAYLOAD_LEN)
                    .then_some(([0; 4], 0));
                continue;
            }
            let take = (self.payload_left as usize).min(bytes.len());
            if let Some((code, have)) = &mut self.rst_code {
                code[*have..*have + take].copy_from_slice(&bytes[..take]);
                *have += take;
                if *have == code.len() {
                    on_reset(u32::from_be_bytes(*code));
                    self.rst_code = None;
                }
            }
            // `take` fits in u32: it is at most `payload_left`.
            self.payload_left -= take as u32;
            bytes = &bytes[take..];
        }
    }
}

/// Per HTTP/2 connection: scans what was written and counts the refusals. The first
/// refusal on a connection is logged at info with peer and reason, later ones at debug:
/// h2 closes a connection after 64 of them (`max_local_error_reset_streams`), and one
/// client must not be able to turn its own malformed streams into a flood of log lines.
pub struct StreamRefusals {
    scanner: ResetScanner,
    peer: SocketAddr,
    metrics: Option<Arc<Metrics>>,
    logged: bool,
}

impl StreamRefusals {
    pub fn new(peer: SocketAddr, metrics: Option<Arc<Metrics>>) -> Self {
        StreamRefusals {
            scanner: ResetScanner::default(),
            peer,
            metrics,
            logged: false,
        }
    }

    /// The first `written` bytes of `bufs` went out on the connection.
    pub fn wrote(&mut self, bufs: &[std::io::IoSlice<'_>], mut written: usize) {
        let StreamRefusals {
            scanner,
            peer,
            metrics,
            logged,
        } = self;
        for buf in bufs {
            if written == 0 {
                break;
            }
            let part = &buf[..written.min(buf.len())];
            written -= part.len();
            scanner.feed(part, |code| {
                if !is_client_refusal(code) {
                    return;
                }
                let Some(reason) = reason_label(code) else {
                    return;
                };
                if let Some(m) = metrics {
                    m.count_protocol_error(reason);
                }
                if *logged {
                    tracing::debug!(peer = %peer, reason, scope = "stream", "request refused at the protocol level");
                } else {
                    *logged = true;
                    tracing::info!(peer = %peer, reason, scope = "stream", "request refused at the protocol level");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn rst(stream: u32, code: u32) -> Vec<u8> {
        frame(FRAME_TYPE_RST_STREAM, stream, &code.to_be_bytes())
    }

    fn output() -> Vec<u8> {
        let mut out = frame(0x4, 0, &[0; 12]); // SETTINGS
        out.extend(frame(0x1, 1, b"\x88")); // HEADERS
        out.extend(frame(0x0, 1, &[7u8; 300])); // DATA, payload full of 0x03 look-alikes
        out.extend(rst(3, PROTOCOL_ERROR));
        out.extend(frame(0x0, 5, &rst(9, REFUSED_STREAM))); // an RST inside a DATA payload
        out.extend(rst(7, 0x8)); // CANCEL
        out.extend(frame(0x6, 0, &[1; 8])); // PING
        out.extend(rst(11, REFUSED_STREAM));
        out
    }

    #[test]
    fn reports_every_rst_stream_and_nothing_inside_payloads() {
        let mut seen = Vec::new();
        ResetScanner::default().feed(&output(), |c| seen.push(c));
        assert_eq!(seen, vec![PROTOCOL_ERROR, 0x8, REFUSED_STREAM]);
    }

    #[test]
    fn any_split_of_the_stream_gives_the_same_answer() {
        let out = output();
        for size in [1, 2, 3, 4, 5, 8, 9, 10, 13, 64, 1000] {
            let mut seen = Vec::new();
            let mut scanner = ResetScanner::default();
            for piece in out.chunks(size) {
                scanner.feed(piece, |c| seen.push(c));
            }
            assert_eq!(
                seen,
                vec![PROTOCOL_ERROR, 0x8, REFUSED_STREAM],
                "pieces of {size}"
            );
        }
    }

    #[test]
    fn an_rst_stream_of_the_wrong_length_is_skipped_by_its_length() {
        let mut out = frame(FRAME_TYPE_RST_STREAM, 1, &[0, 0, 0, 1, 0, 0, 0, 1]);
        out.extend(rst(3, FLOW_CONTROL_ERROR));
        let mut seen = Vec::new();
        ResetScanner::default().feed(&out, |c| seen.push(c));
        assert_eq!(seen, vec![FLOW_CONTROL_ERROR]);
    }

    #[test]
    fn only_the_clients_faults_are_refusals() {
        for code in [
            PROTOCOL_ERROR,
            FLOW_CONTROL_ERROR,
            STREAM_CLOSED,
            FRAME_SIZE_ERROR,
            REFUSED_STREAM,
            ENHANCE_YOUR_CALM,
        ] {
            assert!(is_client_refusal(code), "{code:#x}");
            assert!(reason_label(code).is_some());
        }
        for code in [NO_ERROR, 0x2, 0x8, 0xd, 0xffff_ffff] {
            assert!(!is_client_refusal(code), "{code:#x}");
        }
        assert_eq!(reason_label(PROTOCOL_ERROR), Some("http2_protocol"));
        assert_eq!(reason_label(REFUSED_STREAM), Some("http2_refused_stream"));
        assert_eq!(reason_label(NO_ERROR), None);
    }

    #[test]
    fn only_the_bytes_written_are_scanned() {
        let out = rst(1, PROTOCOL_ERROR);
        let (a, b) = out.split_at(6);
        let mut r = StreamRefusals::new("127.0.0.1:1".parse().unwrap(), None);
        // A short write: 3 bytes of the first slice went out, the rest is written again.
        r.wrote(&[std::io::IoSlice::new(a), std::io::IoSlice::new(b)], 3);
        let mut seen = Vec::new();
        r.scanner.feed(&out[3..], |c| seen.push(c));
        assert_eq!(seen, vec![PROTOCOL_ERROR]);
    }
}
