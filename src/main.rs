//! opsgate's entry point: parse the command line, set up logging and TLS, load the
//! config (exit 2 before binding anything when it is bad), run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

use opsgate::app::{self, ConfigSource};
use opsgate::cli::{Cli, Command};
use opsgate::config::{self, Overrides};

/// jemalloc, as TiKV and Apollo Router use on Linux: hyper hands each connection a fresh
/// 8 KiB read buffer per request (the last one is still shared with the request or
/// response it holds), and the handler's boxed state is another 5.7 KiB. glibc serves
/// those sizes outside its per-thread cache, through its locked slow path; jemalloc's
/// thread cache takes them. Measured: 2.9% fewer instructions per request, 7-11% less CPU
/// per small request, +0.5 MiB idle RSS (docs/benchmarks.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // One crypto provider for every rustls user (proxy, probes, Redis, PostgreSQL).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let (_log_guard, access_log) = opsgate::telemetry::logging::init(cli.log_format);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("opsgate: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(dispatch(cli.command, access_log));
    // Background tasks may still log; stop them before the log writer flushes and exits.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

/// One worker thread per CPU this process may use (`TOKIO_WORKER_THREADS` overrides; a
/// cgroup CPU limit and the affinity mask count). With one, a current-thread runtime, as
/// linkerd2-proxy does: a sidecar given one core pays nothing for a work-stealing
/// scheduler (cross-thread wake-ups, poll-time statistics) on every wake-up.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        // Set here: tokio would read the variable again and panic on a value it cannot use.
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all().build()
}

async fn dispatch(cmd: Command, access_log: opsgate::telemetry::access::AccessLog) -> ExitCode {
    match cmd {
        Command::Run {
            config,
            listen,
            upstream,
            admin,
        } => {
            let path = config::resolve_path(config.config.as_deref());
            if path.is_none() && upstream.is_none() {
                eprintln!(
                    "opsgate: no config file (looked for {}) and no --upstream: nothing to proxy to\n\
                     try: opsgate run --upstream http://127.0.0.1:3000",
                    config::DEFAULT_PATHS.join(", ")
                );
                return ExitCode::from(2);
            }
            let source = ConfigSource {
                path,
                overrides: Overrides {
                    listen,
                    upstream,
                    admin_listen: admin,
                },
            };
            let cfg = match source.load() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            exit_for(app::run(source, cfg, access_log).await)
        }
        Command::CheckConfig { config } => {
            let path = config::resolve_path(config.config.as_deref());
            let Some(path) = path else {
                eprintln!(
                    "opsgate: no config file found (looked for {})",
                    config::DEFAULT_PATHS.join(", ")
                );
                return ExitCode::from(2);
            };
            match config::load(Some(&path), &Overrides::default(), &app::env_lookup) {
                Ok(_) => {
                    println!("{}: ok", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Probe { url, timeout } => match opsgate::probe::probe(&url, timeout).await {
            Ok(status) if (200..400).contains(&status) => ExitCode::SUCCESS,
            Ok(status) => {
                eprintln!("probe {url}: status {status}");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("probe {url}: {e}");
                ExitCode::from(1)
            }
        },
        Command::Demo { listen, admin } => {
            let app_listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("opsgate demo: cannot start the demo app: {e}");
                    return ExitCode::from(1);
                }
            };
            let app_addr = app_listener
                .local_addr()
                .expect("bound listener has an address");
            tokio::spawn(opsgate::demo::serve_app(app_listener));
            let text = opsgate::demo::demo_config(listen, admin, app_addr);
            let cfg =
                match config::parse_str(&text, "<demo>", &Overrides::default(), &app::env_lookup) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(2);
                    }
                };
            // Fail on a busy port before printing a banner of commands that would not work.
            let opsgate = opsgate::demo::invocation();
            let mut busy = Vec::new();
            let mut way_out = String::new();
            for (what, flag, addr) in [("proxy", "--listen", listen), ("admin", "--admin", admin)] {
                if let Err(e) = std::net::TcpListener::bind(addr) {
                    let mut other = addr;
                    other.set_port(addr.port().wrapping_add(1).max(1));
                    busy.push(format!("{addr} (the {what} port): {e}"));
                    way_out.push_str(&format!(" {flag} {other}"));
                }
            }
            if !busy.is_empty() {
                eprintln!(
                    "opsgate demo: cannot listen on {}\n\
                     is another opsgate or demo running? stop it, or try: {opsgate} demo{way_out}",
                    busy.join("; ")
                );
                return ExitCode::from(1);
            }
            println!("{}", opsgate::demo::banner(listen, admin, &opsgate));
            let source = ConfigSource {
                path: None,
                overrides: Overrides::default(),
            };
            exit_for(app::run(source, cfg, access_log).await)
        }
        Command::Check { config, json } => {
            let cfg = match load_for_checks(config.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let results = opsgate::health::check_once(&cfg.checks).await;
            if json {
                println!("{}", opsgate::health::render::cli_json(&results));
            } else {
                print!("{}", opsgate::health::render::cli_table(&results));
            }
            ExitCode::from(opsgate::health::render::cli_exit_code(&results) as u8)
        }
        Command::Wait { config, timeout } => {
            let cfg = match load_for_checks(config.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match opsgate::health::wait_for_critical(&cfg.checks, timeout).await {
                Ok(()) => {
                    println!("critical checks pass");
                    ExitCode::SUCCESS
                }
                Err(failing) => {
                    eprintln!(
                        "opsgate wait: timed out after {}; still failing: {}",
                        config::format_duration(timeout),
                        failing.join(", ")
                    );
                    ExitCode::from(1)
                }
            }
        }
        Command::Ctl(args) => ExitCode::from(opsgate::ctl::run(args).await),
        Command::Inject(args) => inject(args),
    }
}

/// `opsgate inject`: exit 0 with the YAML on stdout, 2 with one error on stderr.
fn inject(args: opsgate::cli::InjectArgs) -> ExitCode {
    use std::io::Read;
    let fail = |msg: String| {
        eprintln!("opsgate inject: {msg}");
        ExitCode::from(2)
    };
    let mut checks = Vec::new();
    for (list, critical) in [(&args.check, true), (&args.soft_check, false)] {
        for c in list {
            match c.split_once('=') {
                Some((name, url)) if !name.is_empty() && !url.is_empty() => {
                    checks.push((name.to_string(), url.to_string(), critical));
                }
                _ => return fail(format!("--check {c:?}: expected NAME=URL")),
            }
        }
    }
    let config = match &args.config {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => Some(t),
            Err(e) => return fail(format!("{}: {e}", p.display())),
        },
        None => None,
    };
    let opts = opsgate::inject::Options {
        image: args.image,
        container: args.container,
        upstream_port: args.upstream_port,
        checks,
        maintenance: args.maintenance,
        config,
        native_sidecar: !args.no_native_sidecar,
    };
    let stdin = args.files.is_empty() || args.files.iter().any(|f| f.as_os_str() == "-");
    let mut text = String::new();
    // A directory stands for its .yaml/.yml/.json files, sorted, as with `kubectl apply -f DIR`.
    let mut files = Vec::new();
    for f in &args.files {
        if f.as_os_str() == "-" {
            continue;
        }
        if f.is_dir() {
            let entries = match std::fs::read_dir(f) {
                Ok(e) => e,
                Err(e) => return fail(format!("{}: {e}", f.display())),
            };
            let mut found: Vec<_> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
                })
                .collect();
            found.sort();
            if found.is_empty() {
                return fail(format!("{}: no .yaml, .yml or .json files", f.display()));
            }
            files.extend(found);
        } else {
            files.push(f.clone());
        }
    }
    for f in &files {
        match std::fs::read_to_string(f) {
            Ok(t) => {
                text.push_str("\n---\n");
                text.push_str(&t);
            }
            Err(e) => return fail(format!("{}: {e}", f.display())),
        }
    }
    if stdin {
        let mut t = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut t) {
            return fail(format!("stdin: {e}"));
        }
        text.push_str("\n---\n");
        text.push_str(&t);
    }
    match opsgate::inject::inject(&text, &opts) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.to_string()),
    }
}

fn load_for_checks(explicit: Option<&std::path::Path>) -> Result<config::Config, ExitCode> {
    let Some(path) = config::resolve_path(explicit) else {
        eprintln!(
            "opsgate: no config file found (looked for {})",
            config::DEFAULT_PATHS.join(", ")
        );
        return Err(ExitCode::from(2));
    };
    config::load(Some(&path), &Overrides::default(), &app::env_lookup).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn exit_for(r: Result<(), app::RunError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // On a terminal the log line and the stderr line would say the same thing twice;
            // log collectors (stdout not a terminal) still get the event.
            use std::io::IsTerminal;
            if !(std::io::stdout().is_terminal() && std::io::stderr().is_terminal()) {
                tracing::error!(error = %e, "opsgate failed");
            }
            eprintln!("opsgate: {e}");
            ExitCode::from(1)
        }
    }
}
