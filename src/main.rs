//! The `wsrelay` binary: parse the configuration, start logging, bind the
//! listeners, run until SIGTERM/SIGINT, drain, exit 0.

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use wsrelay::config::{self, Config, EXIT_BAD_CONFIG, LoadError, Loaded, LogFormat};
use wsrelay::{Listeners, run};

/// mimalloc: less fragmentation than glibc's per-thread arenas for many
/// small, long-lived session allocations (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let Loaded { config, check_only } = match config::load(std::env::args_os()) {
        Ok(l) => l,
        Err(LoadError::Cli(e)) => {
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_BAD_CONFIG as u8),
            };
        }
        Err(LoadError::Config(e)) => {
            eprintln!("wsrelay: bad configuration: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    if check_only {
        let _ = writeln!(std::io::stdout(), "configuration is valid");
        return ExitCode::SUCCESS;
    }
    init_logging(&config);

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.worker_threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsrelay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let bind = |key: &'static str, addr| async move {
            listen(addr).map_err(|e| eprintln!("wsrelay: cannot listen on {addr} ({key}): {e}"))
        };
        let (Ok(public), Ok(admin)) =
            (bind("listen", config.listen).await, bind("admin-listen", config.admin_listen).await)
        else {
            return ExitCode::FAILURE;
        };
        match run(config, Listeners { public, admin }, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "wsrelay failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Binds a listener with a deep accept backlog (the kernel caps it at
/// `net.core.somaxconn`): a burst of clients reconnecting at once must not
/// overflow it and wait a second for their SYN to be retried.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

fn init_logging(config: &Config) {
    // The level was validated with the config.
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder.with_ansi(std::io::stderr().is_terminal()).init();
        }
    }
}

/// Completes on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(1);
    });
}
