//! The waker a call polls its own upstream connection with. A call drives both halves of
//! hyper's client (the connection and the request/response channels to it), so each hand-off
//! between them wakes the very task that is polling them. Such a wake is dropped: the call
//! polls the other half before it yields. Every other wake passes to the task.

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};

thread_local! {
    /// The `Quiet` whose call this thread is polling right now, if any.
    static POLLING: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
}

pub struct Quiet {
    shared: Arc<Shared>,
    waker: Waker,
}

struct Shared {
    /// The task that last polled through this waker.
    task: Mutex<Option<Waker>>,
}

impl Quiet {
    pub fn new() -> Self {
        let shared = Arc::new(Shared {
            task: Mutex::new(None),
        });
        let waker = Waker::from(shared.clone());
        Self { shared, waker }
    }

    /// Wakes `waker` from now on, until the next `poll` (a pooled connection's watcher).
    pub fn hand_to(&self, waker: &Waker) {
        let mut task = self.shared.task.lock().unwrap_or_else(|p| p.into_inner());
        *task = Some(waker.clone());
    }

    /// Runs `poll` with this waker in place of the task's. `poll` must poll every future
    /// that can wake another within it after that other one: a wake raised inside is
    /// dropped.
    pub fn poll<T>(&self, cx: &mut Context<'_>, poll: impl FnOnce(&mut Context<'_>) -> T) -> T {
        {
            let mut task = self.shared.task.lock().unwrap_or_else(|p| p.into_inner());
            match &*task {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *task = Some(cx.waker().clone()),
            }
        }
        let _marked = Marked(POLLING.replace(Arc::as_ptr(&self.shared)));
        poll(&mut Context::from_waker(&self.waker))
    }
}

/// Restores the thread's marker when the poll ends, even by a panic.
struct Marked(*const Shared);

impl Drop for Marked {
    fn drop(&mut self) {
        POLLING.set(self.0);
    }
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Raised by the call's own polling, on its own thread: it is about to look.
        if POLLING.get() == Arc::as_ptr(self) {
            return;
        }
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = &*task {
            w.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_wake_inside_the_poll_is_dropped_and_one_after_it_passes() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        let quiet = Quiet::new();
        let stored = quiet.poll(&mut cx, |cx| {
            cx.waker().wake_by_ref();
            cx.waker().clone()
        });
        assert_eq!(count.0.load(Ordering::Relaxed), 0, "raised while polling");
        stored.wake_by_ref();
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "raised afterwards");
        // From another thread while this one polls: passes.
        quiet.poll(&mut cx, |_| {
            let w = stored.clone();
            std::thread::spawn(move || w.wake()).join().unwrap();
        });
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
    }
}
