//! HTTP/2 control-frame floods: the frames a client may send without limit that each make
//! lb do work and answer, but ask for nothing (PING, SETTINGS).
//!
//! # Why
//! h2 acknowledges every PING and SETTINGS, one at a time: a client that never reads is
//! held up by its own unread acknowledgements (and cut off by the send timeout), but a client
//! that reads them can send millions a second for as long as it likes, and keep a worker
//! thread busy for every other connection it serves. RFC 9113 §10.5 lets an endpoint treat
//! such activity as a connection error; HAProxy and Envoy count such frames too. A client
//! gets a burst of [`BURST`] of them, then [`PER_SECOND`] a second, and more while responses
//! flow (see [`ControlFrames`]); beyond that lb closes the connection. Keep-alive pings stay
//! well below (a few a second), and so do bandwidth probes (a ping per data received).

use tokio::time::Instant;

/// Control frames a connection may send at once (the bucket's size).
const BURST: u64 = 1000;
/// Control frames a connection may send per second, sustained.
const PER_SECOND: u64 = 100;

/// Control frames each HEADERS or DATA frame lb sends earns the client.
const PER_RESPONSE_FRAME: u64 = 2;

const PREFACE_LEN: usize = 24;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Follows a stream of HTTP/2 frames by their headers, skipping payloads.
#[derive(Debug)]
struct Frames {
    header: [u8; 9],
    have: usize,
    /// Bytes still to pass over: the preface, then each frame's payload.
    skip: usize,
}

impl Frames {
    /// Calls `each(kind, flags, length)` for every frame header completed by `bytes`; stops
    /// (and returns false) as soon as `each` does.
    fn follow(&mut self, mut bytes: &[u8], mut each: impl FnMut(u8, u8, usize) -> bool) -> bool {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < 9 {
                break;
            }
            self.have = 0;
            let [a, b, c, kind, flags, ..] = self.header;
            self.skip = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            if !each(kind, flags, self.skip) {
                return false;
            }
        }
        true
    }
}

/// An HTTP/2 connection's budget of control frames: what the client sends is read for its
/// PING and SETTINGS, what lb sends for its responses. Each HEADERS or DATA frame lb sends
/// earns the client [`PER_RESPONSE_FRAME`] more (as gRPC servers forgive pings while data
/// flows): a client probing bandwidth with a PING per DATA frame it receives stays within.
#[derive(Debug)]
pub(crate) struct ControlFrames {
    received: Frames,
    sent: Frames,
    tokens: u64,
    refilled: Instant,
}

impl ControlFrames {
    /// For a connection whose first bytes are the client preface.
    pub(crate) const fn new(now: Instant) -> Self {
        Self {
            received: Frames {
                header: [0; 9],
                have: 0,
                skip: PREFACE_LEN,
            },
            sent: Frames {
                header: [0; 9],
                have: 0,
                skip: 0,
            },
            tokens: BURST,
            refilled: now,
        }
    }

    /// Follows the client's bytes; returns false once it sent more control frames than its
    /// budget allows.
    pub(crate) fn feed(&mut self, bytes: &[u8], now: Instant) -> bool {
        let Self {
            received,
            tokens,
            refilled,
            ..
        } = self;
        received.follow(bytes, |kind, flags, _| {
            !(matches!(kind, PING | SETTINGS) && flags & ACK == 0) || take(tokens, refilled, now)
        })
    }

    /// Follows lb's bytes to the client: its responses earn the client more control frames.
    pub(crate) fn wrote(&mut self, bytes: &[u8]) {
        let Self { sent, tokens, .. } = self;
        sent.follow(bytes, |kind, _, len| {
            if kind == HEADERS || (kind == DATA && len > 0) {
                *tokens = tokens.saturating_add(PER_RESPONSE_FRAME).min(BURST);
            }
            true
        });
    }
}

fn take(tokens: &mut u64, refilled: &mut Instant, now: Instant) -> bool {
    let elapsed = now.saturating_duration_since(*refilled);
    let earned = u64::try_from(elapsed.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_mul(PER_SECOND)
        / 1000;
    if earned > 0 {
        *tokens = tokens.saturating_add(earned).min(BURST);
        *refilled = now;
    }
    if *tokens == 0 {
        return false;
    }
    *tokens -= 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(kind: u8, flags: u8, payload: usize) -> Vec<u8> {
        let len = u32::try_from(payload).unwrap().to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        f.resize(9 + payload, 0);
        f
    }

    #[test]
    fn counts_pings_and_settings_across_reads_and_skips_everything_else() {
        let t = Instant::now();
        let mut c = ControlFrames::new(t);
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for _ in 0..BURST {
            bytes.extend(frame(PING, 0, 8));
            // Acknowledgements, requests and data cost nothing; a payload that looks like
            // a PING header is not read as one.
            bytes.extend(frame(PING, ACK, 8));
            bytes.extend(frame(0x1, 0x4, 20));
            let mut data = frame(0x0, 0, 18);
            data[9..18].copy_from_slice(&frame(PING, 0, 0));
            bytes.extend(data);
        }
        // Fed in pieces of every size: frame headers split across reads.
        for piece in bytes.chunks(7) {
            assert!(c.feed(piece, t));
        }
        assert!(!c.feed(&frame(SETTINGS, 0, 6), t), "the burst is spent");
    }

    #[test]
    fn the_budget_refills_over_time() {
        let t = Instant::now();
        let mut c = ControlFrames::new(t);
        assert!(c.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", t));
        for _ in 0..BURST {
            assert!(c.feed(&frame(PING, 0, 8), t));
        }
        let later = t + Duration::from_secs(1);
        for _ in 0..PER_SECOND {
            assert!(c.feed(&frame(PING, 0, 8), later), "refilled");
        }
        assert!(!c.feed(&frame(PING, 0, 8), later));
        // Responses earn pings: one per DATA frame received never runs out.
        let mut c = ControlFrames::new(t);
        assert!(c.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", t));
        c.wrote(&frame(SETTINGS, 0, 6));
        for _ in 0..10 * BURST {
            c.wrote(&frame(DATA, 0, 100));
            assert!(c.feed(&frame(PING, 0, 8), t));
        }
        // But PING acknowledgements earn nothing: what is left runs out.
        let mut taken = 0;
        while c.feed(&frame(PING, 0, 8), t) {
            c.wrote(&frame(PING, ACK, 8));
            taken += 1;
        }
        assert_eq!(taken, BURST - 1);
        // A keep-alive ping every few seconds never runs out.
        let mut c = ControlFrames::new(t);
        assert!(c.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", t));
        for i in 0..10_000u64 {
            assert!(c.feed(&frame(PING, 0, 8), t + Duration::from_millis(i * 20)));
        }
    }
}
