//! hyper's HTTP/1 header deadline on the proxy port, kept by the connection's own watchdog
//! instead of tokio's timer wheel. hyper arms the deadline for every request head; an entry
//! in the wheel per head cost more instructions than the rest of the connection loop.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The deadline of the request head hyper is reading on one connection, if it is reading one.
pub struct HeadClock {
    origin: Instant,
    /// Nanoseconds after `origin` when the head being read is due; 0 while none is.
    due: AtomicU64,
    /// Set by the watchdog once it saw `due` pass.
    expired: AtomicBool,
}

impl HeadClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            due: AtomicU64::new(0),
            expired: AtomicBool::new(false),
        })
    }

    /// When the head being read is due, if one is being read.
    pub fn due(&self) -> Option<Instant> {
        match self.due.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.origin + Duration::from_nanos(at)),
        }
    }

    /// Marks the head being read as late if `now` is past its deadline. On `Late` the
    /// connection must be polled next: hyper learns it from its sleep, which registers no
    /// waker. `StillLate` means it was told before and has not ended the connection.
    pub fn expire(&self, now: Instant) -> Lateness {
        if self.due().is_none_or(|due| now < due) {
            return Lateness::OnTime;
        }
        if self.expired.swap(true, Ordering::Relaxed) {
            Lateness::StillLate
        } else {
            Lateness::Late
        }
    }

    fn offset(&self, deadline: Instant) -> u64 {
        let nanos = deadline.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX).max(1)
    }
}

/// Where the head being read stands against its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lateness {
    OnTime,
    Late,
    StillLate,
}

/// hyper's `Timer` for one connection's HTTP/1 side. hyper uses it only for the header
/// deadline, one sleep at a time, so a sleep is just the clock's `due`.
#[derive(Clone)]
pub struct HeadTimer(pub Arc<HeadClock>);

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let at = self.0.offset(deadline);
        self.0.due.store(at, Ordering::Relaxed);
        self.0.expired.store(false, Ordering::Relaxed);
        Box::pin(HeadSleep {
            clock: self.0.clone(),
            at,
        })
    }
}

struct HeadSleep {
    clock: Arc<HeadClock>,
    at: u64,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        // No waker to keep: the watchdog that sets `expired` polls the connection next,
        // and this sleep with it.
        let clock = &self.clock;
        if clock.expired.load(Ordering::Relaxed) && clock.due.load(Ordering::Relaxed) == self.at {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl Drop for HeadSleep {
    fn drop(&mut self) {
        // Only this sleep's deadline: hyper's default `reset` makes the new sleep first.
        let _ = self
            .clock
            .due
            .compare_exchange(self.at, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;
    use std::task::Waker;

    fn poll(sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> Poll<()> {
        sleep.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_sleep_is_ready_only_once_the_watchdog_saw_its_deadline_pass() {
        let clock = HeadClock::new();
        let timer = HeadTimer(clock.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sleep = timer.sleep_until(deadline);
        assert_eq!(clock.due(), Some(deadline));
        assert!(poll(&mut sleep).is_pending());
        assert_eq!(
            clock.expire(deadline - Duration::from_millis(1)),
            Lateness::OnTime
        );
        assert!(poll(&mut sleep).is_pending(), "ready before its deadline");
        assert_eq!(clock.expire(deadline), Lateness::Late);
        assert!(poll(&mut sleep).is_ready());
        assert_eq!(clock.expire(deadline), Lateness::StillLate);
    }

    #[test]
    fn a_finished_head_leaves_no_deadline_and_no_stale_expiry() {
        let clock = HeadClock::new();
        let timer = HeadTimer(clock.clone());
        let first = timer.sleep_until(Instant::now());
        assert_eq!(clock.expire(Instant::now()), Lateness::Late);
        drop(first);
        assert_eq!(
            clock.due(),
            None,
            "a dropped sleep's deadline is still watched"
        );
        let mut next = timer.sleep_until(Instant::now() + Duration::from_secs(10));
        assert!(
            poll(&mut next).is_pending(),
            "the last head's expiry leaked"
        );
    }

    #[test]
    fn replacing_a_sleep_keeps_the_new_deadline() {
        let clock = HeadClock::new();
        let timer = HeadTimer(clock.clone());
        let mut sleep = timer.sleep(Duration::from_secs(1));
        let later = Instant::now() + Duration::from_secs(10);
        timer.reset(&mut sleep, later);
        assert_eq!(clock.due(), Some(later));
    }
}
