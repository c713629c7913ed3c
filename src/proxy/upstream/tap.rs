//! The request head as an HTTP/1.1 connection wrote it, kept for a retry. hyper empties
//! the head it encodes; the bytes it writes are the cheapest copy there is: one `memcpy`,
//! taken only while a call that may retry has asked for it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The blank line that ends a head.
const END: &[u8; 4] = b"\r\n\r\n";

/// Up to this many bytes are kept without looking for the head's end: a head is all a
/// request without a body writes, and looking costs more than copying a small body along.
const UNSEARCHED: usize = 4 * 1024;

/// A head longer than this is not kept; its call is not retried. Far above what a server
/// accepts (hyper's limit is 400 KiB of buffer, nginx's 32 KiB of headers).
const MAX_HEAD: usize = 1 << 20;

/// Shared by a connection's I/O, which records what it writes, and the call using the
/// connection, which arms it before its request and takes the head after. The call polls
/// the connection itself, so the lock is never contended; it is there for `Sync`.
#[derive(Default)]
pub struct HeadTap {
    /// Checked on every write without the lock: a connection not asked to keep a head
    /// pays one load.
    armed: AtomicBool,
    written: Mutex<Vec<u8>>,
}

impl HeadTap {
    /// What the connection writes next is kept, up to the end of the request's head.
    pub fn arm(&self) {
        self.lock().clear();
        self.armed.store(true, Ordering::Relaxed);
    }

    /// `written` bytes of `pieces` went out, in order (a vectored write's slices).
    pub fn record<'a>(&self, pieces: impl IntoIterator<Item = &'a [u8]>, mut written: usize) {
        if !self.armed.load(Ordering::Relaxed) {
            return;
        }
        let mut kept = self.lock();
        let before = kept.len();
        kept.reserve(written);
        for piece in pieces {
            if written == 0 {
                break;
            }
            let piece = &piece[..piece.len().min(written)];
            written -= piece.len();
            kept.extend_from_slice(piece);
        }
        if kept.len() <= UNSEARCHED {
            return;
        }
        // The bytes before were searched already if there were enough of them; a blank
        // line that began in them still counts.
        let from = if before <= UNSEARCHED {
            0
        } else {
            before - (END.len() - 1)
        };
        match memchr::memmem::find(&kept[from..], END) {
            Some(i) => kept.truncate(from + i + END.len()),
            None if kept.len() <= MAX_HEAD => return,
            None => *kept = Vec::new(),
        }
        self.armed.store(false, Ordering::Relaxed);
    }

    /// What was written since [`HeadTap::arm`]: the head, possibly followed by some of
    /// the body, possibly cut short (the reader checks). Disarms.
    pub fn take(&self) -> Option<Vec<u8>> {
        self.armed.store(false, Ordering::Relaxed);
        let kept = std::mem::take(&mut *self.lock());
        (!kept.is_empty()).then_some(kept)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"GET /a HTTP/1.1\r\nhost: app\r\nx-empty: \r\n\r\n";

    fn armed() -> HeadTap {
        let tap = HeadTap::default();
        tap.arm();
        tap
    }

    #[test]
    fn what_was_written_while_armed_is_kept_in_order() {
        let tap = armed();
        let body = b"a body";
        tap.record([HEAD, &body[..]], HEAD.len() + body.len());
        assert_eq!(tap.take(), Some([HEAD, body].concat()));
        // Taken: nothing until armed again.
        assert_eq!(tap.take(), None);
        tap.record([HEAD], HEAD.len());
        assert_eq!(tap.take(), None);
    }

    #[test]
    fn a_partial_write_keeps_what_went_out() {
        for a in 0..HEAD.len() {
            for b in a..HEAD.len() {
                let tap = armed();
                tap.record([&HEAD[..a]], a);
                // Of two slices, only the first went out.
                tap.record([&HEAD[a..b], &HEAD[b..]], b - a);
                tap.record([&HEAD[b..], &b"body"[..]], HEAD.len() - b + 4);
                assert_eq!(
                    tap.take(),
                    Some([HEAD, b"body"].concat()),
                    "cut at {a} and {b}"
                );
            }
        }
    }

    #[test]
    fn a_long_body_is_cut_off_at_the_end_of_the_head() {
        for split in [HEAD.len() - 3, HEAD.len(), HEAD.len() + 1] {
            let tap = armed();
            let mut flat = HEAD.to_vec();
            flat.extend(std::iter::repeat_n(b"\r\n\r\n", 2000).flatten());
            tap.record([&flat[..split]], split);
            tap.record([&flat[split..]], flat.len() - split);
            assert_eq!(tap.take().as_deref(), Some(HEAD), "split at {split}");
        }
    }

    #[test]
    fn an_endless_head_is_dropped_not_kept_growing() {
        let tap = armed();
        let line = vec![b'x'; 64 * 1024];
        for _ in 0..(MAX_HEAD / line.len() + 2) {
            tap.record([&line[..]], line.len());
        }
        assert!(tap.lock().capacity() <= MAX_HEAD + line.len());
        tap.record([&b"\r\n\r\n"[..]], 4);
        assert_eq!(tap.take(), None);
    }
}
