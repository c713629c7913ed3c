//! The ops room against real files, timers and Redis processes.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use ipnet::IpNet;
use opsgate::ops::gate::decide_at;
use opsgate::ops::{
    FleetControl, FleetStatus, Maintenance, MaintenanceBody, MaintenanceChange,
    MaintenanceSettings, Mode, Source, client_ip, decide, fleet_set,
};
use tokio::sync::watch;

use crate::support::init_tls;
use crate::support::redis::RedisServer;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_static(value));
    }
    map
}

const CLIENT: &str = "203.0.113.7";

/// Whether a request passes the gate with maintenance on.
fn passes(settings: &MaintenanceSettings, method: Method, path: &str) -> bool {
    decide(settings, true, &method, path, ip(CLIENT), &HeaderMap::new()).is_none()
}

#[test]
fn writes_mode_blocks_only_writes() {
    let settings = MaintenanceSettings::default();
    for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
        assert!(passes(&settings, method, "/api/x"));
    }
    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        assert!(!passes(&settings, method, "/api/x"));
    }
    // Maintenance off: nothing is blocked.
    assert!(
        decide(
            &settings,
            false,
            &Method::POST,
            "/api",
            ip(CLIENT),
            &HeaderMap::new()
        )
        .is_none()
    );
}

#[test]
fn all_mode_blocks_everything_but_exempt_paths_on_segment_boundaries() {
    let settings = MaintenanceSettings {
        mode: Mode::All,
        ..MaintenanceSettings::default()
    };
    assert!(!passes(&settings, Method::GET, "/api/x"));
    assert!(!passes(&settings, Method::HEAD, "/"));
    for path in ["/_health", "/_health/", "/_health/ready", "/metrics"] {
        assert!(passes(&settings, Method::GET, path), "{path}");
        assert!(passes(&settings, Method::POST, path), "{path}");
    }
    for path in ["/_healthx", "/_health_x/ready", "/metricsx", "/api/_health"] {
        assert!(!passes(&settings, Method::GET, path), "{path}");
    }
}

#[test]
fn reject_carries_status_retry_after_and_the_body_the_client_prefers() {
    let settings = MaintenanceSettings {
        status: StatusCode::from_u16(599).unwrap(),
        retry_after: Duration::from_millis(120_500),
        page: Some(Bytes::from_static(b"<h1>back soon</h1>")),
        ..MaintenanceSettings::default()
    };
    let browser = headers(&[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")]);
    let reject = decide(&settings, true, &Method::POST, "/a", ip(CLIENT), &browser).unwrap();
    assert_eq!(reject.status.as_u16(), 599);
    assert_eq!(reject.retry_after_secs, 121);
    assert_eq!(
        reject.body,
        MaintenanceBody::Page(Bytes::from_static(b"<h1>back soon</h1>"))
    );

    let curl = headers(&[("accept", "*/*")]);
    let reject = decide(&settings, true, &Method::POST, "/a", ip(CLIENT), &curl).unwrap();
    assert_eq!(
        reject.body,
        MaintenanceBody::Body {
            content_type: HeaderValue::from_static("application/json"),
            body: Bytes::from_static(br#"{"detail":"maintenance"}"#),
        }
    );
}

#[test]
fn bypass_by_header_cookie_and_allowed_ip() {
    let settings = MaintenanceSettings {
        mode: Mode::All,
        bypass_token: Some("s3cret".into()),
        allow_ips: vec![net("10.0.0.0/8"), net("2001:db8::/32")],
        ..MaintenanceSettings::default()
    };
    let check = |ip_addr: &str, h: &HeaderMap| {
        decide(&settings, true, &Method::POST, "/api", ip(ip_addr), h).is_none()
    };
    assert!(!check(CLIENT, &HeaderMap::new()));
    assert!(check(
        CLIENT,
        &headers(&[("x-maintenance-bypass", "s3cret")])
    ));
    assert!(!check(
        CLIENT,
        &headers(&[("x-maintenance-bypass", "s3cre")])
    ));
    assert!(!check(
        CLIENT,
        &headers(&[("x-maintenance-bypass", "s3cret ")])
    ));
    assert!(check(
        CLIENT,
        &headers(&[("cookie", "a=1; opsgate_bypass=s3cret; b=2")])
    ));
    assert!(check(
        CLIENT,
        &headers(&[("cookie", "a=1"), ("cookie", "opsgate_bypass=s3cret")])
    ));
    assert!(!check(
        CLIENT,
        &headers(&[("cookie", "opsgate_bypass=nope")])
    ));
    assert!(!check(
        CLIENT,
        &headers(&[("cookie", "xopsgate_bypass=s3cret")])
    ));
    assert!(check("10.1.2.3", &HeaderMap::new()));
    assert!(check("::ffff:10.1.2.3", &HeaderMap::new()));
    assert!(check("2001:db8::1", &HeaderMap::new()));
    assert!(!check("11.0.0.1", &HeaderMap::new()));

    // An empty token never matches an empty header.
    let empty = MaintenanceSettings {
        bypass_token: Some(String::new()),
        ..settings.clone()
    };
    assert!(
        decide(
            &empty,
            true,
            &Method::POST,
            "/api",
            ip(CLIENT),
            &headers(&[("x-maintenance-bypass", "")])
        )
        .is_some()
    );
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let trusted = [net("10.0.0.0/8")];
    let settings = MaintenanceSettings {
        mode: Mode::All,
        allow_ips: vec![net("192.0.2.0/24")],
        ..MaintenanceSettings::default()
    };
    let spoof = HeaderValue::from_static("192.0.2.10");
    let gate = |client: IpAddr| {
        decide(
            &settings,
            true,
            &Method::POST,
            "/api",
            client,
            &HeaderMap::new(),
        )
        .is_none()
    };

    // An untrusted peer claiming an allowed address: ignored, no bypass.
    let client = client_ip(ip(CLIENT), Some(&spoof), &trusted);
    assert_eq!(client, ip(CLIENT));
    assert!(!gate(client));

    // A trusted proxy forwarding an allowed client: believed.
    let client = client_ip(ip("10.0.0.5"), Some(&spoof), &trusted);
    assert_eq!(client, ip("192.0.2.10"));
    assert!(gate(client));

    // Through a trusted proxy, a client-supplied left part cannot win: the rightmost
    // untrusted address is the client.
    let chain = HeaderValue::from_static("192.0.2.10, 198.51.100.1, 10.0.0.9");
    let client = client_ip(ip("10.0.0.5"), Some(&chain), &trusted);
    assert_eq!(client, ip("198.51.100.1"));
    assert!(!gate(client));

    // No header, or only trusted hops: the leftmost trusted hop is all we know.
    assert_eq!(client_ip(ip("10.0.0.5"), None, &trusted), ip("10.0.0.5"));
    let hops = HeaderValue::from_static("10.0.0.1, 10.0.0.2");
    assert_eq!(
        client_ip(ip("10.0.0.5"), Some(&hops), &trusted),
        ip("10.0.0.1")
    );
    // Garbage stops the walk at the last verified hop.
    let junk = HeaderValue::from_static("192.0.2.10, nonsense, 10.0.0.2");
    assert_eq!(
        client_ip(ip("10.0.0.5"), Some(&junk), &trusted),
        ip("10.0.0.2")
    );
}

async fn wait_change(
    rx: &mut watch::Receiver<MaintenanceChange>,
    within: Duration,
    what: impl Fn(&MaintenanceChange) -> bool,
) -> MaintenanceChange {
    let found = tokio::time::timeout(within, rx.wait_for(|c| what(c)))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|change| change.clone());
    match found {
        Some(change) => change,
        None => panic!(
            "no matching change within {within:?}; last: {:?}",
            *rx.borrow()
        ),
    }
}

#[tokio::test]
async fn every_source_holds_maintenance_and_the_override_wins() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("maintenance");
    std::fs::write(&flag, b"").unwrap();
    let now = SystemTime::now();
    let settings = MaintenanceSettings {
        enabled: true,
        env_on: true,
        flag_file: Some(flag.clone()),
        windows: vec![(
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )],
        ..MaintenanceSettings::default()
    };
    let maintenance = Maintenance::new(settings.clone());
    let mut changes = maintenance.subscribe();
    assert!(maintenance.is_on());
    maintenance.set_fleet(Some(true));
    let status = maintenance.status();
    assert_eq!(
        status.held_by,
        vec![
            Source::Config,
            Source::Env,
            Source::FlagFile,
            Source::Window,
            Source::Fleet
        ]
    );
    let change = wait_change(&mut changes, Duration::from_secs(1), |c| {
        c.source == Some(Source::Fleet)
    })
    .await;
    assert!(change.enabled);

    maintenance.set_override(Some(false), Some("testing".into()));
    assert!(!maintenance.is_on());
    let change = wait_change(&mut changes, Duration::from_secs(1), |c| !c.enabled).await;
    assert_eq!(change.source, Some(Source::Override));
    assert!(change.held_by.is_empty());
    let json = serde_json::to_value(maintenance.status()).unwrap();
    assert_eq!(json["enabled"], false);
    assert_eq!(json["sources"]["override"], false);
    assert_eq!(json["sources"]["fleet"], true);
    assert_eq!(json["reason"], "testing");

    maintenance.set_override(None, None);
    assert!(maintenance.is_on());
    assert_eq!(maintenance.status().reason, None);

    // Each source alone turns it on and is the one named.
    let cases: [(Source, MaintenanceSettings); 4] = [
        (
            Source::Config,
            MaintenanceSettings {
                enabled: true,
                ..Default::default()
            },
        ),
        (
            Source::Env,
            MaintenanceSettings {
                env_on: true,
                ..Default::default()
            },
        ),
        (
            Source::FlagFile,
            MaintenanceSettings {
                flag_file: Some(flag.clone()),
                ..Default::default()
            },
        ),
        (
            Source::Window,
            MaintenanceSettings {
                windows: settings.windows.clone(),
                ..Default::default()
            },
        ),
    ];
    for (source, settings) in cases {
        let single = Maintenance::new(settings);
        assert!(single.is_on(), "{source:?}");
        assert_eq!(single.status().held_by, vec![source]);
        single.set_override(Some(false), None);
        assert!(!single.is_on(), "{source:?}");
        single.set_override(None, None);
        assert!(single.is_on(), "{source:?}");
    }
    let fleet_only = Maintenance::new(MaintenanceSettings::default());
    assert!(!fleet_only.is_on());
    assert_eq!(fleet_only.status().sources.fleet, None);
    fleet_only.set_fleet(Some(true));
    assert!(fleet_only.is_on());
    assert_eq!(fleet_only.status().held_by, vec![Source::Fleet]);
    fleet_only.set_override(Some(true), Some("forced".into()));
    assert_eq!(fleet_only.status().held_by, vec![Source::Override]);
    fleet_only.set_fleet(Some(false));
    assert!(fleet_only.is_on(), "the override holds it");
    fleet_only.set_override(None, None);
    assert!(!fleet_only.is_on());
}

#[tokio::test]
async fn reload_keeps_override_fleet_and_env_and_reevaluates_the_rest() {
    let maintenance = Maintenance::new(MaintenanceSettings {
        env_on: true,
        ..Default::default()
    });
    maintenance.set_fleet(Some(false));
    maintenance.set_override(Some(false), Some("hold".into()));
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("flag");
    std::fs::write(&flag, b"").unwrap();
    maintenance.update_settings(MaintenanceSettings {
        enabled: true,
        mode: Mode::All,
        flag_file: Some(flag),
        ..Default::default()
    });
    let status = maintenance.status();
    assert!(!status.enabled);
    assert_eq!(status.mode, Mode::All);
    assert!(status.sources.config && status.sources.env && status.sources.flag_file);
    assert_eq!(status.sources.fleet, Some(false));
    assert_eq!(status.sources.override_on, Some(false));
    assert_eq!(status.reason.as_deref(), Some("hold"));
    maintenance.set_override(None, None);
    maintenance.update_settings(MaintenanceSettings::default());
    assert_eq!(maintenance.status().held_by, vec![Source::Env]);
}

#[tokio::test]
async fn flag_file_created_and_removed_at_runtime_is_noticed_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    // The directory does not exist yet: polling covers it until it does.
    let flag_dir = dir.path().join("later");
    let flag = flag_dir.join("maintenance");
    let maintenance = Maintenance::new(MaintenanceSettings {
        flag_file: Some(flag.clone()),
        ..Default::default()
    });
    let mut changes = maintenance.subscribe();
    assert!(!maintenance.is_on());

    std::fs::create_dir(&flag_dir).unwrap();
    let started = Instant::now();
    std::fs::write(&flag, b"").unwrap();
    let change = wait_change(&mut changes, Duration::from_secs(2), |c| c.enabled).await;
    assert_eq!(change.held_by, vec![Source::FlagFile]);
    eprintln!("flag created (new dir) noticed in {:?}", started.elapsed());

    let started = Instant::now();
    std::fs::remove_file(&flag).unwrap();
    wait_change(&mut changes, Duration::from_secs(2), |c| !c.enabled).await;
    eprintln!("flag removed noticed in {:?}", started.elapsed());

    // An atomic rename into place, as config management tools write files.
    let started = Instant::now();
    let tmp = flag_dir.join(".maintenance.tmp");
    std::fs::write(&tmp, b"").unwrap();
    std::fs::rename(&tmp, &flag).unwrap();
    wait_change(&mut changes, Duration::from_secs(2), |c| c.enabled).await;
    eprintln!("flag renamed in noticed in {:?}", started.elapsed());

    // The directory itself goes away and comes back.
    std::fs::remove_dir_all(&flag_dir).unwrap();
    wait_change(&mut changes, Duration::from_secs(2), |c| !c.enabled).await;
    std::fs::create_dir(&flag_dir).unwrap();
    std::fs::write(&flag, b"").unwrap();
    wait_change(&mut changes, Duration::from_secs(2), |c| c.enabled).await;

    // A reload that drops the flag file turns the source off at once.
    maintenance.update_settings(MaintenanceSettings::default());
    assert!(!maintenance.is_on());
}

#[tokio::test]
async fn window_turns_on_at_start_and_off_at_end_with_retry_after_to_its_end() {
    let now = SystemTime::now();
    let (start, end) = (
        now + Duration::from_millis(300),
        now + Duration::from_millis(2300),
    );
    let maintenance = Maintenance::new(MaintenanceSettings {
        windows: vec![(start, end)],
        ..Default::default()
    });
    let settings = maintenance.settings();
    let mut changes = maintenance.subscribe();
    assert!(!maintenance.is_on());

    let change = wait_change(&mut changes, Duration::from_secs(2), |c| c.enabled).await;
    assert_eq!(change.source, Some(Source::Window));
    assert!(SystemTime::now() >= start);
    let reject = decide(
        &settings,
        maintenance.is_on(),
        &Method::POST,
        "/a",
        ip(CLIENT),
        &HeaderMap::new(),
    )
    .expect("inside the window");
    assert!(
        (1..=2).contains(&reject.retry_after_secs),
        "{}",
        reject.retry_after_secs
    );

    wait_change(&mut changes, Duration::from_secs(3), |c| !c.enabled).await;
    assert!(SystemTime::now() >= end);

    // The clock-injected form gives exact seconds to the end.
    let at = start + Duration::from_millis(500);
    let reject = decide_at(
        &settings,
        true,
        &Method::POST,
        "/a",
        ip(CLIENT),
        &HeaderMap::new(),
        at,
    )
    .unwrap();
    assert_eq!(reject.retry_after_secs, 2);
    let after = end + Duration::from_secs(1);
    let reject = decide_at(
        &settings,
        true,
        &Method::POST,
        "/a",
        ip(CLIENT),
        &HeaderMap::new(),
        after,
    )
    .unwrap();
    assert_eq!(reject.retry_after_secs, 300);
}

// ---- Redis ----------------------------------------------------------------------------

async fn wait_status(
    fleet: &FleetControl,
    within: Duration,
    what: impl Fn(&FleetStatus) -> bool,
) -> FleetStatus {
    let mut rx = fleet.subscribe();
    match tokio::time::timeout(within, rx.wait_for(|s| what(s))).await {
        Ok(Ok(status)) => status.clone(),
        _ => panic!(
            "fleet status not reached within {within:?}: {:?}",
            fleet.status()
        ),
    }
}

async fn wait_fleet(maintenance: &Maintenance, within: Duration, value: Option<bool>) {
    let mut rx = maintenance.subscribe();
    let found = tokio::time::timeout(within, async {
        loop {
            if maintenance.sources().fleet == value {
                return;
            }
            let _ = rx.changed().await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "fleet source not {value:?} within {within:?}: {:?}",
        maintenance.sources()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_follow_one_fleet_set_within_a_second() {
    init_tls();
    let redis = RedisServer::start();
    let key = "opsgate:test:maintenance";
    // A long poll: only the pub/sub message can make the deadline.
    let poll = Duration::from_secs(30);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let maintenance = Maintenance::new(MaintenanceSettings::default());
        let fleet = FleetControl::start(&redis.url(), key, poll, maintenance.clone()).unwrap();
        nodes.push((maintenance, fleet));
    }
    for (maintenance, fleet) in &nodes {
        wait_status(fleet, Duration::from_secs(5), |s| s.connected).await;
        // Absent key reads off, not unknown.
        assert_eq!(maintenance.sources().fleet, Some(false));
        assert!(!maintenance.is_on());
    }

    let started = Instant::now();
    fleet_set(&redis.url(), key, true).await.unwrap();
    for (maintenance, _) in &nodes {
        wait_fleet(maintenance, Duration::from_secs(1), Some(true)).await;
        assert!(maintenance.is_on());
        assert_eq!(maintenance.status().held_by, vec![Source::Fleet]);
    }
    eprintln!("three nodes on after {:?}", started.elapsed());

    fleet_set(&redis.url(), key, false).await.unwrap();
    for (maintenance, _) in &nodes {
        wait_fleet(maintenance, Duration::from_secs(1), Some(false)).await;
        assert!(!maintenance.is_on());
    }

    // A bare PUBLISH applies at once too.
    redis.cli(&["publish", key, "1"]);
    for (maintenance, _) in &nodes {
        wait_fleet(maintenance, Duration::from_secs(1), Some(true)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_reads_a_key_set_without_publish() {
    init_tls();
    let redis = RedisServer::start();
    let key = "fleet-poll";
    let maintenance = Maintenance::new(MaintenanceSettings::default());
    let fleet = FleetControl::start(
        &redis.url(),
        key,
        Duration::from_millis(200),
        maintenance.clone(),
    )
    .unwrap();
    wait_status(&fleet, Duration::from_secs(5), |s| s.connected).await;
    redis.cli(&["set", key, "TRUE"]);
    wait_fleet(&maintenance, Duration::from_secs(2), Some(true)).await;
    redis.cli(&["set", key, "bogus"]);
    redis.cli(&["del", key]);
    wait_fleet(&maintenance, Duration::from_secs(2), Some(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_the_last_state_and_reconnects() {
    init_tls();
    let mut redis = RedisServer::start_with(&["--requirepass", "hunter2"]);
    let key = "fleet-outage";
    let maintenance = Maintenance::new(MaintenanceSettings::default());
    let url = format!("redis://:hunter2@127.0.0.1:{}", redis.port);
    let fleet =
        FleetControl::start(&url, key, Duration::from_millis(300), maintenance.clone()).unwrap();
    assert_eq!(
        fleet.status().url,
        format!("redis://:<redacted>@127.0.0.1:{}", redis.port)
    );
    wait_status(&fleet, Duration::from_secs(5), |s| s.connected).await;
    fleet_set(&url, key, true).await.unwrap();
    wait_fleet(&maintenance, Duration::from_secs(1), Some(true)).await;

    redis.kill();
    let status = wait_status(&fleet, Duration::from_secs(3), |s| !s.connected).await;
    let error = status.last_error.expect("an error is shown");
    assert!(!error.contains("hunter2"), "{error}");
    // Keep the last known value for a few polls.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(maintenance.sources().fleet, Some(true));
    assert!(maintenance.is_on());
    assert!(!fleet.status().connected);

    // Back, empty (nothing is saved): reconnects and reads the key as absent.
    redis.restart();
    let started = Instant::now();
    wait_status(&fleet, Duration::from_secs(5), |s| s.connected).await;
    eprintln!("reconnected after {:?}", started.elapsed());
    wait_fleet(&maintenance, Duration::from_secs(2), Some(false)).await;

    // fleet_set against a dead server fails with the password redacted.
    redis.kill();
    let error = fleet_set(&url, key, true).await.unwrap_err().to_string();
    assert!(!error.contains("hunter2"), "{error}");
}

#[test]
fn invalid_url_is_rejected_at_start() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let maintenance = Maintenance::new(MaintenanceSettings::default());
        let error = FleetControl::start(
            "redis://u:pw@[::1",
            "k",
            Duration::from_secs(1),
            maintenance,
        )
        .unwrap_err()
        .to_string();
        assert!(!error.contains("pw@"), "{error}");
    });
}
