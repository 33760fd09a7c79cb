//! The `idemgate` binary: parse the CLI, load the config, start tracing, run.

use std::process::ExitCode;

use clap::Parser;
use idemgate::config::{Cli, Command, Config, LogFormat};
use idemgate::metrics::Metrics;
use idemgate::server::{self, Listeners};
use tracing_subscriber::EnvFilter;

/// mimalloc: per-thread heaps. Under load glibc malloc contends on its arena
/// locks when one runtime thread frees what another allocated (every
/// detached upstream call does); see benches/RESULTS.md for what it bought.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig) => return check_config(&cli),
        Some(Command::Demo) => return demo(),
        Some(Command::Healthcheck { ready }) => return healthcheck(&cli, ready),
        None => {}
    }
    let config = match Config::load(&cli.args) {
        Ok(c) => c,
        Err(errors) => {
            for line in &errors.0 {
                eprintln!("idemgate: {line}");
            }
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_format);
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        // The one registry: made here, handed down.
        let registry = prometheus::Registry::new();
        let metrics = match Metrics::new(&registry) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("idemgate: cannot set up metrics: {e}");
                return ExitCode::FAILURE;
            }
        };
        let store = match server::open_store(&config, &metrics).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("idemgate: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listeners = match Listeners::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("idemgate: {e}");
                return ExitCode::FAILURE;
            }
        };
        match &config.upstream {
            Some(up) => tracing::info!(listen = %config.listen, upstream = %up, admin = %config.admin_listen, "idemgate proxy started"),
            None => tracing::info!(admin = %config.admin_listen, "idemgate started in dedup-only mode (no upstream)"),
        }
        server::run(config, store, metrics, listeners, shutdown_signal()).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Builds a tokio runtime, or says why not.
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("idemgate: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

fn demo() -> ExitCode {
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(idemgate::demo::run(&mut std::io::stdout())) {
        Ok(report) if report.charges == report.keys => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("idemgate demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn healthcheck(cli: &Cli, ready: bool) -> ExitCode {
    let config = match Config::load(&cli.args) {
        Ok(c) => c,
        Err(errors) => {
            for line in &errors.0 {
                eprintln!("idemgate: {line}");
            }
            return ExitCode::from(2);
        }
    };
    let mut addr = config.admin_listen;
    // A wildcard listener is reached on loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let path = if ready { "/readyz" } else { "/healthz" };
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let status = runtime.block_on(async move {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let uri: http::Uri = format!("http://{addr}{path}").parse().ok()?;
        let resp = tokio::time::timeout(std::time::Duration::from_secs(2), client.get(uri))
            .await
            .ok()?
            .ok()?;
        Some(resp.status())
    });
    match status {
        Some(s) if s.is_success() => ExitCode::SUCCESS,
        Some(s) => {
            eprintln!("idemgate: {path} answered {s}");
            ExitCode::FAILURE
        }
        None => {
            eprintln!("idemgate: {path} on {addr} did not answer");
            ExitCode::FAILURE
        }
    }
}

fn check_config(cli: &Cli) -> ExitCode {
    if cli.args.config.is_none() {
        eprintln!("idemgate: check-config needs --config FILE");
        return ExitCode::from(2);
    }
    match Config::load(&cli.args) {
        Ok(c) => {
            print!("{}", c.to_toml());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for line in &errors.0 {
                eprintln!("{line}");
            }
            ExitCode::from(2)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
