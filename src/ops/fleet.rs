//! The fleet-wide maintenance toggle: one Redis key shared by every opsgate of a service.
//!
//! A background task started by `app.rs` when `[control]` is set; it feeds
//! [`Maintenance::set_fleet`](super::Maintenance::set_fleet). [`fleet_set`] is what
//! `opsgate ctl fleet maintenance on|off` calls.
//!
//! The key is also the pub/sub channel: a `PUBLISH key on` applies at once, and a `GET`
//! every poll interval catches what a lost message or a reconnect missed. Values are
//! `on`/`off`, `1`/`0`, `true`/`false`; an absent key reads off. While Redis is
//! unreachable the last known value is kept.

use std::time::Duration;

use fred::interfaces::EventInterface;
use fred::prelude::{Builder, ClientLike, Config, KeysInterface, PubsubInterface};
use serde::Serialize;
use tokio::sync::{broadcast::error::RecvError, watch};

use super::{Error, Maintenance, TaskGuard};
use crate::telemetry::redact::redact_url;

/// Bound on connecting (TCP, TLS, AUTH, the connect PING) to Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// First delay before reconnecting; doubles up to the poll interval (1 s..30 s).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The fleet key's connection, for the status page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FleetStatus {
    /// The Redis URL with any password replaced by `<redacted>`.
    pub url: String,
    pub key: String,
    /// Subscribed and the key read at least once on the current connection.
    pub connected: bool,
    /// The last connection or command error (kept after a reconnect, as history).
    pub last_error: Option<String>,
}

/// Follows the fleet key until dropped.
#[derive(Debug)]
pub struct FleetControl {
    /// Latest connection state, written by the task; a watch so the status page and
    /// tests can both read it at any time and wait for it to change.
    status: watch::Receiver<FleetStatus>,
    _task: TaskGuard,
}

impl FleetControl {
    /// Starts following `key` on `redis_url`. Returns at once (the fleet source reads
    /// `null` until the key is first read); fails only on a URL that does not parse.
    /// Must be called inside a tokio runtime.
    ///
    /// Dropping the handle stops the task but leaves the fleet source as it was: when
    /// `[control]` is removed on reload, also call `maintenance.set_fleet(None)`.
    pub fn start(
        redis_url: &str,
        key: &str,
        poll_interval: Duration,
        maintenance: Maintenance,
    ) -> Result<Self, Error> {
        let target = Target::parse(redis_url, key)?;
        maintenance.set_fleet(None);
        let (tx, rx) = watch::channel(FleetStatus {
            url: target.shown_url.clone(),
            key: key.to_owned(),
            connected: false,
            last_error: None,
        });
        let poll_interval = poll_interval.max(Duration::from_millis(10));
        let task = TaskGuard::spawn(follow(target, poll_interval, maintenance, tx));
        Ok(Self {
            status: rx,
            _task: task,
        })
    }

    /// The connection state now.
    pub fn status(&self) -> FleetStatus {
        self.status.borrow().clone()
    }

    /// A receiver that wakes when the connection state changes.
    pub fn subscribe(&self) -> watch::Receiver<FleetStatus> {
        self.status.clone()
    }
}

/// Writes the fleet key and publishes it, so every follower applies it at once and
/// late joiners read it: `SET key on|off` then `PUBLISH key on|off`.
pub async fn fleet_set(redis_url: &str, key: &str, on: bool) -> Result<(), Error> {
    let target = Target::parse(redis_url, key)?;
    let client = target.client().map_err(|e| target.error(&e))?;
    let value = if on { "on" } else { "off" };
    let result = async {
        tokio::time::timeout(CONNECT_TIMEOUT, client.init())
            .await
            .map_err(|_| timeout_error())??;
        client
            .set::<(), _, _>(key, value, None, None, false)
            .await?;
        client.publish::<i64, _, _>(key, value).await?;
        Ok::<(), fred::error::Error>(())
    }
    .await;
    // fred warns on QUIT for a client that never connected: only a live one gets it.
    if client.is_connected() {
        let _ = tokio::time::timeout(Duration::from_secs(1), client.quit()).await;
    }
    result.map_err(|e| target.error(&e))
}

/// Parses a fleet key value; `None` for anything else.
pub fn parse_value(value: &str) -> Option<bool> {
    let value = value.trim();
    ["on", "1", "true"]
        .iter()
        .any(|v| value.eq_ignore_ascii_case(v))
        .then_some(true)
        .or_else(|| {
            ["off", "0", "false"]
                .iter()
                .any(|v| value.eq_ignore_ascii_case(v))
                .then_some(false)
        })
}

/// Where the key lives, with what it takes to talk about it without leaking secrets.
struct Target {
    config: Config,
    key: String,
    shown_url: String,
    password: Option<String>,
}

impl Target {
    fn parse(url: &str, key: &str) -> Result<Self, Error> {
        let shown_url = redact_url(url);
        let config = Config::from_url(url).map_err(|e| Error::InvalidUrl {
            url: shown_url.clone(),
            message: e.details().to_owned(),
        })?;
        Ok(Self {
            password: config.password.clone().filter(|p| !p.is_empty()),
            config,
            key: key.to_owned(),
            shown_url,
        })
    }

    /// A client with no reconnect policy: `follow` owns reconnecting, so it knows when
    /// the connection is down and can back off and log once.
    fn client(&self) -> Result<fred::prelude::Client, fred::error::Error> {
        let mut builder = Builder::from_config(self.config.clone());
        builder.with_connection_config(|c| {
            c.connection_timeout = CONNECT_TIMEOUT;
            c.internal_command_timeout = CONNECT_TIMEOUT;
            c.max_command_attempts = 1;
        });
        builder.build()
    }

    /// An error message that cannot contain the password.
    fn message(&self, error: &fred::error::Error) -> String {
        let message = crate::telemetry::redact::fred_error_text(error);
        match &self.password {
            Some(password) => message.replace(password.as_str(), "<redacted>"),
            None => message,
        }
    }

    fn error(&self, error: &fred::error::Error) -> Error {
        Error::Redis {
            url: self.shown_url.clone(),
            message: self.message(error),
        }
    }
}

fn timeout_error() -> fred::error::Error {
    fred::error::Error::new(fred::error::ErrorKind::Timeout, "timed out")
}

fn closed_error() -> fred::error::Error {
    fred::error::Error::new(fred::error::ErrorKind::IO, "connection closed")
}

/// Connects, follows, and on any failure backs off (with jitter, so a fleet does not
/// reconnect in lockstep) and tries again, forever. Logs once per outage.
async fn follow(
    target: Target,
    poll_interval: Duration,
    maintenance: Maintenance,
    status: watch::Sender<FleetStatus>,
) {
    let max_backoff = poll_interval.clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut backoff = FIRST_BACKOFF;
    let mut down_logged = false;
    let mut last_bad_value: Option<String> = None;
    loop {
        let mut on_connected = || {
            backoff = FIRST_BACKOFF;
            if down_logged {
                tracing::info!(url = %target.shown_url, key = %target.key, "fleet key reconnected");
                down_logged = false;
            }
            status.send_modify(|s| s.connected = true);
        };
        let error = session(
            &target,
            poll_interval,
            &maintenance,
            &mut on_connected,
            &mut last_bad_value,
        )
        .await;
        let message = target.message(&error);
        if down_logged {
            tracing::debug!(url = %target.shown_url, error = %message, "fleet key still unreachable");
        } else {
            tracing::warn!(
                url = %target.shown_url, key = %target.key, error = %message,
                "fleet key unreachable; keeping its last known value and retrying"
            );
            down_logged = true;
        }
        status.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(message);
        });
        let jittered = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::time::sleep(jittered).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// One connection's life: returns the error that ended it.
async fn session(
    target: &Target,
    poll_interval: Duration,
    maintenance: &Maintenance,
    on_connected: &mut impl FnMut(),
    last_bad_value: &mut Option<String>,
) -> fred::error::Error {
    // Two connections: in RESP2 a subscribed connection cannot GET.
    let (subscriber, commands) = match (target.client(), target.client()) {
        (Ok(s), Ok(c)) => (s, c),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let outcome: Result<std::convert::Infallible, fred::error::Error> = async {
        let mut subscriber_task = tokio::time::timeout(CONNECT_TIMEOUT, subscriber.init())
            .await
            .map_err(|_| timeout_error())??;
        let mut commands_task = tokio::time::timeout(CONNECT_TIMEOUT, commands.init())
            .await
            .map_err(|_| timeout_error())??;
        let mut messages = subscriber.message_rx();
        subscriber.subscribe(target.key.as_str()).await?;
        // Subscribed first, then read: a change made in between arrives as a message.
        let read_timeout = poll_interval.max(Duration::from_secs(1));
        let get = || async {
            tokio::time::timeout(
                read_timeout,
                commands.get::<Option<String>, _>(target.key.as_str()),
            )
            .await
            .map_err(|_| timeout_error())?
        };
        let value = get().await?;
        apply(maintenance, target, value.as_deref(), last_bad_value);
        on_connected();
        let mut poll = tokio::time::interval(poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.reset();
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Ok(message) if *message.channel == *target.key => {
                        let value = message.value.as_string();
                        apply(maintenance, target, Some(value.as_deref().unwrap_or("")), last_bad_value);
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return Err(closed_error()),
                },
                _ = poll.tick() => {
                    let value = get().await?;
                    apply(maintenance, target, value.as_deref(), last_bad_value);
                }
                ended = &mut subscriber_task => return Err(ended_error(ended)),
                ended = &mut commands_task => return Err(ended_error(ended)),
            }
        }
    }
    .await;
    let error = match outcome {
        Err(error) => error,
        Ok(never) => match never {},
    };
    // A client that lost its connection gets no QUIT: fred would log a warning for each one,
    // on every reconnect round, and the outage is already logged once.
    for client in [&subscriber, &commands] {
        if client.is_connected() {
            let _ = tokio::time::timeout(Duration::from_millis(200), client.quit()).await;
        }
    }
    error
}

fn ended_error(
    ended: Result<Result<(), fred::error::Error>, tokio::task::JoinError>,
) -> fred::error::Error {
    match ended {
        Ok(Err(error)) => error,
        _ => closed_error(),
    }
}

/// Applies a value read or received; an absent key is off, an unknown value is ignored
/// (and logged once until it changes).
fn apply(
    maintenance: &Maintenance,
    target: &Target,
    value: Option<&str>,
    last_bad_value: &mut Option<String>,
) {
    match value.map_or(Some(false), parse_value) {
        Some(on) => {
            *last_bad_value = None;
            maintenance.set_fleet(Some(on));
        }
        None => {
            let value = value.unwrap_or_default();
            if last_bad_value.as_deref() != Some(value) {
                tracing::warn!(
                    key = %target.key, value,
                    "fleet key holds neither on/off, 1/0 nor true/false; ignored"
                );
                *last_bad_value = Some(value.to_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        for on in ["on", "ON", "1", "true", " True "] {
            assert_eq!(parse_value(on), Some(true), "{on}");
        }
        for off in ["off", "0", "false", "FALSE"] {
            assert_eq!(parse_value(off), Some(false), "{off}");
        }
        assert_eq!(parse_value("maybe"), None);
        assert_eq!(parse_value(""), None);
    }
}
