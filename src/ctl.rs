//! `opsgate ctl`: a small client of the admin API for people and scripts, plus the
//! fleet toggle that writes the Redis key directly.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::cli::{BreakerAction, CtlArgs, CtlCommand, FleetCommand, MaintenanceAction};

/// Runs one `ctl` command; returns the process exit code.
pub async fn run(args: CtlArgs) -> u8 {
    let (method, path, body) = match &args.command {
        CtlCommand::Status => (Method::GET, "/_ops/status".to_string(), None),
        CtlCommand::Maintenance { action } => {
            let body = match action {
                MaintenanceAction::On { reason } => json!({"enabled": true, "reason": reason}),
                MaintenanceAction::Off => json!({"enabled": false}),
                MaintenanceAction::Clear => json!({"enabled": null}),
            };
            (Method::PUT, "/_ops/maintenance".to_string(), Some(body))
        }
        CtlCommand::Breaker { action } => {
            let (name, verb) = match action {
                BreakerAction::Reset { name } => (name, "reset"),
                BreakerAction::Open { name } => (name, "open"),
                BreakerAction::Close { name } => (name, "close"),
            };
            (
                Method::POST,
                format!("/_ops/breakers/{}/{verb}", name.replace(':', "%3A")),
                None,
            )
        }
        CtlCommand::Reload => (Method::POST, "/_ops/reload".to_string(), None),
        CtlCommand::Drain => (Method::POST, "/_ops/drain".to_string(), None),
        CtlCommand::Fleet {
            command: FleetCommand::Maintenance { state, redis, key },
        } => {
            return match crate::ops::fleet_set(redis, key, state == "on").await {
                Ok(()) => {
                    println!("fleet maintenance {state}: {key}");
                    0
                }
                Err(e) => {
                    eprintln!("opsgate ctl: {e}");
                    1
                }
            };
        }
    };
    match request(&args, method, &path, body).await {
        Ok((status, v)) if status.is_success() => {
            if args.json || !matches!(args.command, CtlCommand::Status) {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", summary(&v));
            }
            0
        }
        Ok((status, v)) => {
            let detail = v
                .get("detail")
                .or_else(|| v.get("error"))
                .and_then(Value::as_str)
                .unwrap_or("");
            eprintln!("opsgate ctl: {} {detail}", status.as_u16());
            if status == StatusCode::UNAUTHORIZED {
                eprintln!("hint: pass --token or set OPSGATE_ADMIN_TOKEN");
            }
            1
        }
        Err(e) => {
            eprintln!("opsgate ctl: {}: {e}", args.admin);
            eprintln!("{}", unreachable_hint(&args.admin, &e));
            1
        }
    }
}

async fn request(
    args: &CtlArgs,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), String> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}{path}", args.admin.trim_end_matches('/'));
    let mut req = Request::builder().method(method).uri(&url);
    if let Some(t) = &args.token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let req = req
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| crate::proxy::upstream::ErrorChain(&e).to_string())?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, v))
}

/// What to try when the admin API did not answer: most often no opsgate runs there.
fn unreachable_hint(admin: &str, error: &str) -> String {
    let lower = error.to_ascii_lowercase();
    if lower.contains("refused") {
        format!(
            "hint: no opsgate admin API listens at {admin}; is `opsgate run` (or `opsgate demo`) running? \
             Point ctl at its admin.listen with --admin URL or OPSGATE_ADMIN_URL (default http://127.0.0.1:9901)"
        )
    } else {
        format!(
            "hint: ctl talks to opsgate's admin API (admin.listen); check that {admin} is that address \
             (--admin URL or OPSGATE_ADMIN_URL) and that it is reachable from here"
        )
    }
}

/// A readable `ctl status`: the answers to "is it up, what is it holding back, and why".
fn summary(s: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let health = &s["health"];
    let _ = writeln!(
        out,
        "opsgate {}  up {:.0}s  health {}{}",
        s["version"].as_str().unwrap_or("?"),
        s["uptime_s"].as_f64().unwrap_or(0.0),
        health["status"].as_str().unwrap_or("?"),
        if s["draining"].as_bool() == Some(true) {
            "  DRAINING"
        } else {
            ""
        }
    );
    let m = &s["maintenance"];
    let held: Vec<&str> = m["held_by"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "maintenance: {} (mode {}){}{}",
        if m["enabled"].as_bool() == Some(true) {
            "ON"
        } else {
            "off"
        },
        m["mode"].as_str().unwrap_or("?"),
        if held.is_empty() {
            String::new()
        } else {
            format!(", held by {}", held.join(", "))
        },
        m["reason"]
            .as_str()
            .map(|r| format!(", reason: {r}"))
            .unwrap_or_default()
    );
    if let Some(src) = m["sources"].as_object() {
        let parts: Vec<String> = src.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "  sources: {}", parts.join(" "));
    }
    let _ = writeln!(out, "checks:");
    for c in health["checks"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<20} {:<10} {}{}",
            c["name"].as_str().unwrap_or("?"),
            c["status"].as_str().unwrap_or("?"),
            if c["critical"].as_bool() == Some(true) {
                "critical "
            } else {
                ""
            },
            c["message"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(out, "breakers:");
    for b in s["breakers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<20} {:<11} reason={} calls={} failed={} rejected={}",
            b["name"].as_str().unwrap_or("?"),
            b["state"].as_str().unwrap_or("?"),
            b["reason"].as_str().unwrap_or("-"),
            b["total_calls"],
            b["failed_calls"],
            b["rejected_calls"]
        );
    }
    let lr = &s["config"]["last_reload"];
    let _ = writeln!(
        out,
        "config: {} (last reload {} at {}{})",
        s["config"]["path"].as_str().unwrap_or("<built-in>"),
        lr["result"].as_str().unwrap_or("?"),
        lr["at"].as_str().unwrap_or("?"),
        lr["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_connection_gets_a_hint_about_the_daemon() {
        let h = unreachable_hint(
            "http://127.0.0.1:9901",
            "client error (Connect): tcp connect error: Connection refused (os error 111)",
        );
        assert!(h.contains("is `opsgate run`"), "{h}");
        assert!(h.contains("--admin"), "{h}");
    }
}
