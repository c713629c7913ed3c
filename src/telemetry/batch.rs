//! Access lines in batches: each thread appends its lines to a buffer of its own, and one
//! flusher thread writes every buffer out at most 100 ms after the first of its lines,
//! sooner once a buffer holds 64 KiB, and at shutdown.
//!
//! Writing each line on its own cost a channel send, a copy and a wake-up of the writer
//! thread per request (about 3,000 instructions, plus a futex and a write(2) when the
//! writer was asleep). Envoy buffers its file access logs the same way (flushed every
//! second); nginx does with `access_log ... buffer= flush=`.
//!
//! A writer wakes the flusher only when a buffer fills, or when the flusher sleeps: it
//! keeps a timer for one interval after each flush, and sleeps only after an interval
//! with no line. Under steady load that is one wake-up per 64 KiB of lines, not two per
//! flush (each one preempts the worker that shares the flusher's CPU).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a line may wait in its buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this full is flushed without waiting for the interval.
const FLUSH_BYTES: usize = 64 * 1024;
/// Past this, across all buffers, lines are dropped: the writer cannot keep up, and
/// requests must not wait for it (the log writer's own queue drops lines the same way).
/// Split evenly between the buffers, so a stalled stdout holds at most this much.
const MAX_PENDING: usize = 4 * 1024 * 1024;

/// A line buffer on a cache line of its own, so two threads' appends do not contend.
#[repr(align(64))]
struct Shard(Mutex<Vec<u8>>);

struct Shared {
    shards: Box<[Shard]>,
    /// Each buffer's share of `MAX_PENDING`.
    shard_limit: usize,
    /// Some buffer holds lines the flusher has not been told about.
    pending: AtomicBool,
    /// The flusher sleeps without a timer: the first line must wake it. While a timer
    /// runs (the flusher waits for `FLUSH_INTERVAL`), lines need no wake-up.
    idle: AtomicBool,
    /// A buffer crossed `FLUSH_BYTES`: flush now.
    urgent: AtomicBool,
    closing: AtomicBool,
}

/// The writing side: cheap to clone, one per runtime snapshot.
#[derive(Clone)]
pub struct Batcher {
    shared: Arc<Shared>,
    flusher: std::thread::Thread,
}

/// Stops the flusher after a last flush of every buffer; dropped before the log writer.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's buffer: threads take shards in turn, so worker threads rarely share.
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

impl Batcher {
    /// Starts the flusher thread, which writes batches to `out`: each buffer with one
    /// `write_all`, so on stdout (whose lock it holds for the call) its lines never
    /// interleave with another writer's.
    pub fn start<W: Write + Send + 'static>(out: W) -> std::io::Result<(Batcher, FlushGuard)> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let shards = threads * 2;
        let shared = Arc::new(Shared {
            shards: (0..shards).map(|_| Shard(Mutex::new(Vec::new()))).collect(),
            shard_limit: (MAX_PENDING / shards).max(FLUSH_BYTES),
            pending: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            urgent: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("opsgate-access-log".into())
            .spawn(move || flush_loop(&for_thread, out))?;
        let batcher = Batcher {
            shared: shared.clone(),
            flusher: thread.thread().clone(),
        };
        let guard = FlushGuard {
            shared,
            thread: Some(thread),
        };
        Ok((batcher, guard))
    }

    /// Appends one line, written by `line` into this thread's buffer.
    pub fn write(&self, line: impl FnOnce(&mut Vec<u8>)) {
        let shared = &*self.shared;
        let index = SHARD.with(|i| *i) % shared.shards.len();
        let mut buf = lock(&shared.shards[index]);
        if buf.len() >= shared.shard_limit {
            return;
        }
        let before = buf.len();
        line(&mut buf);
        let crossed = before < FLUSH_BYTES && buf.len() >= FLUSH_BYTES;
        drop(buf);
        if crossed {
            shared.urgent.store(true, Ordering::Release);
            shared.pending.store(true, Ordering::Release);
            self.flusher.unpark();
        } else if !shared.pending.load(Ordering::Relaxed)
            && !shared.pending.swap(true, Ordering::SeqCst)
            // SeqCst on both sides (`pending` set then `idle` read here, `idle` set then
            // `pending` read by the flusher): at least one of the two sees the other, so
            // a line never waits for a flusher that went to sleep without seeing it.
            && shared.idle.load(Ordering::SeqCst)
        {
            self.flusher.unpark();
        }
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, Vec<u8>> {
    shard.0.lock().unwrap_or_else(|p| p.into_inner())
}

fn flush_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::new();
    // While a timer runs, lines need no wake-up: it stays armed for one interval after
    // each flush. An interval that ends with no line pending disarms it, and the flusher
    // sleeps until a line wakes it: an idle daemon's flusher does not wake at all.
    let mut timer: Option<Instant> = None;
    loop {
        let due = match timer {
            Some(due) => due,
            None => {
                shared.idle.store(true, Ordering::SeqCst);
                while !shared.pending.load(Ordering::SeqCst)
                    && !shared.closing.load(Ordering::Acquire)
                {
                    std::thread::park();
                }
                shared.idle.store(false, Ordering::SeqCst);
                Instant::now() + FLUSH_INTERVAL
            }
        };
        loop {
            if shared.urgent.load(Ordering::Acquire) || shared.closing.load(Ordering::Acquire) {
                break;
            }
            let now = Instant::now();
            if now >= due {
                break;
            }
            std::thread::park_timeout(due - now);
        }
        if !shared.pending.load(Ordering::SeqCst) && !shared.closing.load(Ordering::Acquire) {
            // An interval without a line: sleep until the next one.
            timer = None;
            continue;
        }
        // Lines appended from here on wait at most one interval, from now.
        timer = Some(Instant::now() + FLUSH_INTERVAL);
        let closing = shared.closing.load(Ordering::Acquire);
        // Cleared before the buffers are taken: a line appended after its buffer was
        // taken sets it again and is flushed next round.
        shared.urgent.store(false, Ordering::Release);
        shared.pending.store(false, Ordering::SeqCst);
        for shard in shared.shards.iter() {
            // Swapped, not copied: the buffer is written from where it was filled, and
            // the (empty) spare keeps its capacity for the next thread's lines.
            std::mem::swap(&mut *lock(shard), &mut spare);
            if !spare.is_empty() {
                let _ = out.write_all(&spare);
            }
            spare.clear();
            // A burst leaves no big buffer behind for the idle hours after it.
            if spare.capacity() > FLUSH_BYTES * 4 {
                spare = Vec::new();
            }
        }
        let _ = out.flush();
        if closing {
            return;
        }
    }
}

impl FlushGuard {
    /// Flushes what is buffered and stops the flusher. Lines written after this are lost.
    fn close(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.closing.store(true, Ordering::Release);
        thread.thread().unpark();
        let _ = thread.join();
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back, and wait on.
    #[derive(Clone, Default)]
    struct Sink(Arc<(Mutex<Vec<u8>>, std::sync::Condvar)>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (buf, written) = &*self.0;
            buf.lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(b);
            written.notify_all();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.0.lock().unwrap().clone()).unwrap()
        }

        /// Waits until `n` lines arrived, or 50 flush intervals passed.
        fn wait_lines(&self, n: usize) -> String {
            let (buf, written) = &*self.0;
            let (buf, _) = written
                .wait_timeout_while(buf.lock().unwrap(), FLUSH_INTERVAL * 50, |b| {
                    b.iter().filter(|c| **c == b'\n').count() < n
                })
                .unwrap();
            String::from_utf8(buf.clone()).unwrap()
        }
    }

    #[test]
    fn lines_arrive_whole_from_every_thread_and_close_flushes_the_rest() {
        let sink = Sink::default();
        let (batcher, mut guard) = Batcher::start(sink.clone()).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let b = batcher.clone();
                s.spawn(move || {
                    for i in 0..500 {
                        b.write(|out| {
                            let _ = writeln!(out, "thread {t} line {i}");
                        });
                    }
                });
            }
        });
        batcher.write(|out| out.extend_from_slice(b"last\n"));
        guard.close();
        let text = sink.text();
        assert_eq!(text.lines().count(), 2001);
        for t in 0..4 {
            // Each thread's lines keep their order.
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..500).collect::<Vec<_>>());
        }
        assert!(text.ends_with("last\n") || text.contains("last\n"));
    }

    /// A writer that blocks while the test holds its gate: a stdout nobody reads.
    struct Stalled(Arc<Mutex<()>>);

    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            drop(self.0.lock());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_holds_at_most_the_cap_and_requests_do_not_wait() {
        let gate = Arc::new(Mutex::new(()));
        let (batcher, _guard) = Batcher::start(Stalled(gate.clone())).unwrap();
        // Taken after the guard, so it is released first even if an assertion fails:
        // the guard's close waits for the flusher, which waits for the gate.
        let held = gate.lock().unwrap();
        let line = [b'x'; 1023];
        let shards = batcher.shared.shards.len();
        // Every buffer is offered twice its share: the flusher takes a first batch and
        // blocks in `write`; the rest piles up to the cap and beyond it is dropped.
        let per_thread = 2 * MAX_PENDING / shards / 1024 + 64;
        std::thread::scope(|s| {
            for _ in 0..shards {
                let b = batcher.clone();
                s.spawn(move || {
                    for _ in 0..per_thread {
                        b.write(|out| {
                            out.extend_from_slice(&line);
                            out.push(b'\n');
                        });
                    }
                });
            }
        });
        let pending: usize = batcher.shared.shards.iter().map(|s| lock(s).len()).sum();
        assert!(pending <= MAX_PENDING, "{pending} bytes held");
        assert!(pending >= MAX_PENDING / 2, "{pending} bytes held");
        drop(held);
    }

    /// A sink whose writes wait at a gate the test holds, and say when one is waiting.
    #[derive(Clone, Default)]
    struct Gated {
        sink: Sink,
        gate: Arc<Mutex<()>>,
        entered: Arc<(Mutex<usize>, std::sync::Condvar)>,
    }

    impl Write for Gated {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (n, cv) = &*self.entered;
            *n.lock().map_err(|_| std::io::Error::other("poisoned"))? += 1;
            cv.notify_all();
            drop(self.gate.lock());
            self.sink.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_written_during_a_flush_goes_out_with_the_next_one_unprompted() {
        let out = Gated::default();
        let held = out.gate.lock().unwrap();
        let (batcher, _guard) = Batcher::start(out.clone()).unwrap();
        batcher.write(|o| o.extend_from_slice(b"one\n"));
        // Wait until the flusher is inside the write of the first batch.
        let (n, cv) = &*out.entered;
        let (entered, _) = cv
            .wait_timeout_while(n.lock().unwrap(), FLUSH_INTERVAL * 50, |n| *n == 0)
            .unwrap();
        assert_eq!(*entered, 1, "the flusher never wrote the first line");
        drop(entered);
        // The flusher is busy, not asleep: this line wakes nobody, and must still be
        // written, by the timer the flusher starts when it sees it after the batch.
        batcher.write(|o| o.extend_from_slice(b"two\n"));
        drop(held);
        assert_eq!(out.sink.wait_lines(2), "one\ntwo\n");
    }

    #[test]
    fn a_lone_line_is_flushed_without_close_and_after_a_quiet_interval_a_line_wakes_the_flusher() {
        let sink = Sink::default();
        let (batcher, _guard) = Batcher::start(sink.clone()).unwrap();
        batcher.write(|out| out.extend_from_slice(b"one\n"));
        assert_eq!(sink.wait_lines(1), "one\n");
        // Within the interval after that flush: the flusher's timer takes it.
        batcher.write(|out| out.extend_from_slice(b"two\n"));
        assert_eq!(sink.wait_lines(2), "one\ntwo\n");
        // One quiet interval later the flusher drops its timer and sleeps; a line wakes it.
        let deadline = Instant::now() + FLUSH_INTERVAL * 50;
        while !batcher.shared.idle.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the flusher never went to sleep");
            std::thread::yield_now();
        }
        batcher.write(|out| out.extend_from_slice(b"three\n"));
        assert_eq!(sink.wait_lines(3), "one\ntwo\nthree\n");
    }
}
