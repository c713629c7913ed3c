//! The waker a call polls its own upstream connection with. A call drives both halves of
//! hyper's client (the connection and the request/response channels to it), so each hand-off
//! between them wakes the very task that is polling them. Such a wake is dropped: the call
//! polls the other half before it yields. Every other wake passes to the task.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

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
    /// A wake was dropped during the current poll.
    dropped: AtomicBool,
    /// A wake passed to the task since its last poll.
    woke: AtomicBool,
}

impl Quiet {
    pub fn new() -> Self {
        let shared = Arc::new(Shared {
            task: Mutex::new(None),
            dropped: AtomicBool::new(false),
            woke: AtomicBool::new(false),
        });
        let waker = Waker::from(shared.clone());
        Self { shared, waker }
    }

    /// Wakes `waker` from now on, until the next `poll` (a pooled connection's watcher).
    /// A wake the last task got after its last poll (the app's close, just then) is
    /// passed on, or it would be seen only at the next checkout.
    pub fn hand_to(&self, waker: &Waker) {
        let mut task = self.shared.task.lock().unwrap_or_else(|p| p.into_inner());
        *task = Some(waker.clone());
        drop(task);
        if self.shared.woke.swap(false, Ordering::AcqRel) {
            waker.wake_by_ref();
        }
    }

    /// Runs `poll` with this waker in place of the task's. `poll` must poll every future
    /// that can wake another within it after that other one: a wake raised inside is
    /// dropped. Should `poll` end pending after a wake was dropped (a future that woke
    /// itself to yield, as hyper does after 16 rounds of its loop), the task is woken.
    pub fn poll<T: Pending>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> T,
    ) -> T {
        {
            let mut task = self.shared.task.lock().unwrap_or_else(|p| p.into_inner());
            match &*task {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *task = Some(cx.waker().clone()),
            }
        }
        self.shared.woke.store(false, Ordering::Relaxed);
        let r = {
            let _marked = Marked(POLLING.replace(Arc::as_ptr(&self.shared)));
            poll(&mut Context::from_waker(&self.waker))
        };
        if self.shared.dropped.swap(false, Ordering::Relaxed) && r.is_pending() {
            cx.waker().wake_by_ref();
        }
        r
    }
}

/// What a quiet poll returns: whether it ended pending.
pub trait Pending {
    fn is_pending(&self) -> bool;
}

impl<T> Pending for Poll<T> {
    fn is_pending(&self) -> bool {
        Poll::is_pending(self)
    }
}

impl<T> Pending for (bool, Poll<T>) {
    fn is_pending(&self) -> bool {
        self.1.is_pending()
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
            self.dropped.store(true, Ordering::Relaxed);
            return;
        }
        self.woke.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = &*task {
            w.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A task waker that counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counted() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    impl Count {
        fn get(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
    }

    /// A poll that wakes its own task, then returns `r`.
    fn waking<T>(r: Poll<T>) -> impl FnOnce(&mut Context<'_>) -> Poll<T> {
        move |cx| {
            cx.waker().wake_by_ref();
            r
        }
    }

    /// The waker `quiet` lends out while it polls for `task` (what a future stores).
    fn lent(quiet: &Quiet, task: &Waker) -> Waker {
        match quiet.poll(&mut Context::from_waker(task), |cx| {
            Poll::Ready(cx.waker().clone())
        }) {
            Poll::Ready(w) => w,
            Poll::Pending => unreachable!(),
        }
    }

    #[test]
    fn a_wake_inside_the_poll_is_dropped_and_one_after_it_passes() {
        let (count, task) = counted();
        let mut cx = Context::from_waker(&task);
        let quiet = Quiet::new();
        let _ = quiet.poll(&mut cx, waking(Poll::Ready(())));
        let stored = lent(&quiet, &task);
        assert_eq!(count.get(), 0, "raised while polling");
        stored.wake_by_ref();
        assert_eq!(count.get(), 1, "raised afterwards");
        // From another thread while this one polls: passes.
        let _ = quiet.poll(&mut cx, |_| {
            let w = stored.clone();
            std::thread::spawn(move || w.wake()).join().unwrap();
            Poll::Ready(())
        });
        assert_eq!(count.get(), 2);
    }

    #[test]
    fn a_wake_after_the_last_poll_reaches_the_next_owner() {
        let ((first, task), (next, next_task)) = (counted(), counted());
        let quiet = Quiet::new();
        lent(&quiet, &task).wake_by_ref();
        quiet.hand_to(&next_task);
        assert_eq!(first.get(), 1);
        assert_eq!(next.get(), 1, "passed on");
        // Handed on again with no wake since: nothing to pass.
        quiet.hand_to(&next_task);
        assert_eq!(next.get(), 1);
    }

    #[test]
    fn a_poll_that_woke_itself_and_yields_wakes_the_task() {
        let (count, task) = counted();
        let mut cx = Context::from_waker(&task);
        let quiet = Quiet::new();
        let r = quiet.poll(&mut cx, waking(Poll::<()>::Pending));
        assert!(r.is_pending());
        assert_eq!(count.get(), 1, "nothing else would poll it again");
        // A ready poll needs no wake, and the dropped one is not carried over.
        let _ = quiet.poll(&mut cx, waking(Poll::Ready(())));
        let _ = quiet.poll(&mut cx, |_| Poll::<()>::Pending);
        assert_eq!(count.get(), 1);
    }
}
