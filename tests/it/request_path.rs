//! The request path against real peers and hostile clients: credentials in upstream URLs,
//! HTTP/2 translation, HTTP versions, client faults, resets, deadlines and abandoned calls.

use std::time::Duration;

use serde_json::Value;

use crate::support::opsgate::{Launch, get};
use crate::support::upstream::Upstream;

/// The values the echo upstream saw for header `name`.
fn seen(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn upstream_url_credentials_are_sent_as_basic_auth_and_never_logged() {
    let app = Upstream::echo("app").await;
    let config = format!(
        "[proxy]\nupstream = \"http://opsuser:s3cretPW@{}\"\n",
        app.addr
    );
    let og = Launch::new()
        .config(&config)
        .env("OPSGATE_LOG", "debug")
        .loopback()
        .start()
        .await;
    // base64("opsuser:s3cretPW")
    let basic = "Basic b3BzdXNlcjpzM2NyZXRQVw==";
    for client_auth in [None, Some("Bearer client-token")] {
        let headers: Vec<(&str, &str)> = client_auth
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        let answer = get(&og.url("/creds"), &headers).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let echo = answer.json();
        assert_eq!(seen(&echo, "authorization"), [basic], "{echo}");
        assert_eq!(
            seen(&echo, "host"),
            [format!("127.0.0.1:{}", og.addr().port())]
        );
    }
    // Positive control: the pool's debug lines (which used to carry the userinfo) are on.
    let pool_logged = og
        .wait_for_log(Duration::from_secs(5), |l| {
            l.to_string().contains("reuse idle connection")
        })
        .await;
    assert!(pool_logged, "no pool debug line: {:?}", og.logs());
    let leaks: Vec<String> = og
        .logs()
        .into_iter()
        .chain(og.stderr())
        .filter(|l| l.contains("s3cretPW") || l.contains("b3BzdXNlcjpzM2NyZXRQVw"))
        .collect();
    assert!(leaks.is_empty(), "credential in log lines: {leaks:#?}");
}
