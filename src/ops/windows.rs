//! Scheduled maintenance windows: the window source and the Retry-After inside one.
//!
//! A background task owned by [`super::Maintenance`] flips the window source at each
//! start and end; the gate asks [`remaining_at`] only when it rejects a request.

use std::time::{Duration, SystemTime};

/// Longest single sleep, so a wall clock that jumps is noticed within this time.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Whether `now` falls in a window (start inclusive, end exclusive).
pub fn active_at(windows: &[(SystemTime, SystemTime)], now: SystemTime) -> bool {
    windows
        .iter()
        .any(|&(start, end)| start <= now && now < end)
}

/// Time from `now` to the end of the active window, following windows that overlap or
/// touch it; `None` outside every window.
pub fn remaining_at(windows: &[(SystemTime, SystemTime)], now: SystemTime) -> Option<Duration> {
    let mut end = windows
        .iter()
        .filter(|&&(start, end)| start <= now && now < end)
        .map(|&(_, end)| end)
        .max()?;
    // A chain of overlapping windows keeps maintenance on until the last one ends.
    loop {
        let extended = windows
            .iter()
            .filter(|&&(start, later)| start <= end && later > end)
            .map(|&(_, later)| later)
            .max();
        match extended {
            Some(later) => end = later,
            None => break,
        }
    }
    end.duration_since(now).ok()
}

/// The first start or end strictly after `now`.
fn next_boundary(windows: &[(SystemTime, SystemTime)], now: SystemTime) -> Option<SystemTime> {
    windows
        .iter()
        .flat_map(|&(start, end)| [start, end])
        .filter(|&at| at > now)
        .min()
}

/// Reports whether a window is active at start and at every boundary, until no boundary
/// is left or `report` answers false (its owner is gone).
pub(crate) async fn run(
    windows: Vec<(SystemTime, SystemTime)>,
    mut report: impl FnMut(bool) -> bool + Send,
) {
    loop {
        let now = SystemTime::now();
        if !report(active_at(&windows, now)) {
            return;
        }
        let Some(next) = next_boundary(&windows, now) else {
            return;
        };
        let wait = next.duration_since(now).unwrap_or_default().min(MAX_SLEEP);
        // One extra millisecond so the wall clock is past the boundary when we wake.
        tokio::time::sleep(wait + Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn start_is_inclusive_and_end_exclusive() {
        let windows = [(at(100), at(200))];
        assert!(!active_at(&windows, at(99)));
        assert!(active_at(&windows, at(100)));
        assert!(active_at(&windows, at(199)));
        assert!(!active_at(&windows, at(200)));
    }

    #[test]
    fn remaining_follows_overlapping_windows() {
        let windows = [
            (at(100), at(200)),
            (at(150), at(300)),
            (at(300), at(400)),
            (at(500), at(600)),
        ];
        assert_eq!(
            remaining_at(&windows, at(120)),
            Some(Duration::from_secs(280))
        );
        assert_eq!(remaining_at(&windows, at(450)), None);
        assert_eq!(
            remaining_at(&windows, at(550)),
            Some(Duration::from_secs(50))
        );
    }

    #[test]
    fn next_boundary_is_strictly_later() {
        let windows = [(at(100), at(200))];
        assert_eq!(next_boundary(&windows, at(50)), Some(at(100)));
        assert_eq!(next_boundary(&windows, at(100)), Some(at(200)));
        assert_eq!(next_boundary(&windows, at(200)), None);
    }
}
