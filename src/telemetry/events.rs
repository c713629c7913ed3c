//! Typed operational events (check flips, breaker transitions, maintenance, reloads, drain)
//! with ids and a short history, for `/_ops/events` and `Last-Event-ID` resumes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::{Map, Value};
use tokio::sync::broadcast;

/// How many past events a resumed stream can replay.
const HISTORY: usize = 256;

#[derive(Debug, Clone)]
pub struct Event {
    pub id: u64,
    /// `check`, `breaker`, `maintenance`, `reload`, `drain`.
    pub kind: &'static str,
    /// The `data:` line: JSON with `type`, `at` and the kind's fields.
    pub data: String,
}

pub struct Events {
    /// Live fan-out to every open stream; slow readers lag and resync from `status`.
    tx: broadcast::Sender<Arc<Event>>,
    /// Short replay buffer; written once per event, read on (re)connect only.
    history: Mutex<VecDeque<Arc<Event>>>,
    next_id: AtomicU64,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            next_id: AtomicU64::new(1),
        }
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Events {
    /// Publishes an event; `fields` are merged with `type` and `at`.
    pub fn emit(&self, kind: &'static str, fields: Value) {
        let mut obj = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        obj.insert("type".into(), Value::from(kind));
        obj.insert("at".into(), Value::from(now_rfc3339()));
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        // Id assigned under the lock so history and ids stay in the same order.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let event = Arc::new(Event {
            id,
            kind,
            data: Value::Object(obj).to_string(),
        });
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(event.clone());
        let _ = self.tx.send(event);
    }

    /// Subscribes, returning the events after `last_id` still in history (replayed first).
    pub fn subscribe(
        &self,
        last_id: Option<u64>,
    ) -> (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>) {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        let missed = match last_id {
            Some(last) => history.iter().filter(|e| e.id > last).cloned().collect(),
            None => Vec::new(),
        };
        (missed, rx)
    }

    /// An id for a frame that is not an event of its own (a `status` snapshot): larger than
    /// every event already sent to subscribers, smaller than every later one.
    pub fn reserve_id(&self) -> u64 {
        // Under the history lock, like `emit`: no event can hold a smaller id without
        // having been sent already.
        let _order = self.history.lock().unwrap_or_else(|e| e.into_inner());
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_replays_missed_events_in_order() {
        let ev = Events::default();
        ev.emit("reload", serde_json::json!({"result": "success"}));
        ev.emit("drain", serde_json::json!({"phase": "started"}));
        let (missed, _rx) = ev.subscribe(Some(1));
        assert_eq!(missed.len(), 1);
        assert_eq!(missed[0].kind, "drain");
        let v: Value = serde_json::from_str(&missed[0].data).unwrap();
        assert_eq!(v["type"], "drain");
        assert!(v["at"].as_str().unwrap().ends_with('Z'));
    }
}
