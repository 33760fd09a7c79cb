//! The `idemgate` binary: parse the CLI, load the config, start tracing, run.
//!
//! The edge of the program: the library returns typed errors; here they are
//! `anyhow` errors and become exit codes in one place, [`exit_code`]: 2 for
//! bad input (flags, config), 1 for everything else.

use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Parser;
use idemgate::config::{Cli, Command, Config, ConfigErrors, LogFormat};
use idemgate::metrics::Metrics;
use idemgate::server::{self, Listeners};
use idemgate::telemetry;
use tracing_subscriber::EnvFilter;

mod demo;
mod demo_queue;
mod healthcheck;

/// mimalloc: per-thread heaps. Under load glibc malloc contends on its arena
/// locks when one runtime thread frees what another allocated (every
/// detached upstream call does); see benches/RESULTS.md for what it bought.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::CheckConfig) => check_config(&cli),
        Some(Command::Demo) => demo(),
        Some(Command::Migrate) => migrate(&cli),
        Some(Command::Healthcheck { ready }) => healthcheck(&cli, ready),
        None => serve(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            exit_code(&e)
        }
    }
}

/// Why the command failed, on stderr: each config problem on its line, any
/// other error on one line with its causes.
fn report(e: &anyhow::Error) {
    match e.downcast_ref::<ConfigErrors>() {
        // check-config lists problems bare: its whole output is the list.
        Some(errors) if e.downcast_ref::<CheckConfig>().is_some() => {
            for line in &errors.0 {
                eprintln!("{line}");
            }
        }
        Some(errors) => {
            for line in &errors.0 {
                eprintln!("idemgate: {line}");
            }
        }
        None => eprintln!("idemgate: {e:#}"),
    }
}

/// The one place errors become exit codes.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<ConfigErrors>().is_some() || e.downcast_ref::<Usage>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// A command used wrongly (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(&'static str);

/// The context `check-config` wraps its problems in: listed bare.
#[derive(Debug, thiserror::Error)]
#[error("check-config")]
struct CheckConfig;

/// Builds a tokio runtime.
fn runtime(mut builder: tokio::runtime::Builder) -> anyhow::Result<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

fn serve(cli: &idemgate::config::Cli) -> anyhow::Result<()> {
    // Before the store takes any memory: resident memory then follows the
    // records held (idemgate::pages says why).
    let pages = idemgate::pages::small_pages_only();
    let config = Config::load(&cli.args)?;
    let runtime = runtime(tokio::runtime::Builder::new_multi_thread())?;
    runtime.block_on(async move {
        // The one registry: made here, handed down.
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry).context("cannot set up metrics")?;
        // The exporter's task runs on this runtime.
        let traces = telemetry::init(&config.traces, metrics.trace_spans_dropped.clone())
            .map_err(|e| anyhow!(e))?;
        init_tracing(config.log_format, traces.as_ref().map(|t| t.tracer.clone()));
        if let Some(endpoint) = &config.traces.endpoint {
            tracing::info!(%endpoint, "exporting traces");
        }
        if let Err(e) = pages {
            tracing::warn!(error = %e, "transparent huge pages stay as the system sets them: resident memory may run further above the bytes the store holds");
        }
        let store = server::open_store(&config, &metrics).await?;
        let listeners = Listeners::bind(&config).await?;
        // The addresses bound, not those configured: with port 0 the OS
        // picks, and this line is where a caller learns which.
        let admin = listeners.admin.local_addr().unwrap_or(config.admin_listen);
        match &config.upstream {
            Some(up) => {
                let listen = listeners.proxy_addr().unwrap_or(config.listen);
                tracing::info!(%listen, upstream = %up, %admin, "idemgate proxy started");
            }
            None => tracing::info!(%admin, "idemgate started in dedup-only mode (no upstream)"),
        }
        let routing = server::routing(&config)?;
        let reloads = idemgate::reload::ConfigSource {
            args: cli.args.clone(),
        };
        server::run(
            config,
            store,
            metrics,
            listeners,
            routing,
            Some(reloads),
            shutdown_signal(),
        )
        .await;
        if let Some(t) = traces {
            t.flush(std::time::Duration::from_secs(5)).await;
        }
        tracing::info!("stopped");
        Ok(())
    })
}

fn demo() -> anyhow::Result<()> {
    let runtime = runtime(tokio::runtime::Builder::new_multi_thread())?;
    let report = runtime
        .block_on(demo::run(&mut std::io::stdout()))
        .context("demo")?;
    if report.charges == report.keys {
        Ok(())
    } else {
        Err(anyhow!(
            "demo: {} charges for {} orders",
            report.charges,
            report.keys
        ))
    }
}

fn migrate(cli: &Cli) -> anyhow::Result<()> {
    let config = Config::load(&cli.args)?;
    let runtime = runtime(tokio::runtime::Builder::new_current_thread())?;
    let done = runtime.block_on(async {
        let metrics = Metrics::new(&prometheus::Registry::new()).context("metrics")?;
        anyhow::Ok(server::migrate_store(&config, &metrics).await?)
    })?;
    println!("{done}");
    Ok(())
}

fn healthcheck(cli: &Cli, ready: bool) -> anyhow::Result<()> {
    let config = Config::load(&cli.args)?;
    let runtime = runtime(tokio::runtime::Builder::new_current_thread())?;
    runtime.block_on(healthcheck::check(config.admin_listen, ready))
}

fn check_config(cli: &Cli) -> anyhow::Result<()> {
    if cli.args.config.is_none() {
        return Err(Usage("check-config needs --config FILE").into());
    }
    let config = Config::load(&cli.args).map_err(|e| anyhow::Error::new(e).context(CheckConfig))?;
    print!("{}", config.to_toml());
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (info by default); with a
/// tracer, idemgate's spans also go to OpenTelemetry, whatever the log
/// filter says (each layer filters on its own).
fn init_tracing(format: LogFormat, tracer: Option<opentelemetry_sdk::trace::SdkTracer>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(tracer) = tracer else {
        // One global filter: per-layer filtering costs every event a
        // little (about 2 % of the pass-through rate, measured).
        tracing_subscriber::registry()
            .with(filter)
            .with(logs(format))
            .init();
        return;
    };
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("idemgate", tracing::Level::TRACE),
        );
    tracing_subscriber::registry()
        .with(logs(format).with_filter(filter))
        .with(spans)
        .init();
}

/// The log lines, to stderr, in `format`; colours only on a terminal (a
/// log file or a collector gets plain text).
fn logs<S>(format: LogFormat) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().with_current_span(true).boxed(),
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
