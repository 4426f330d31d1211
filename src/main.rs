//! The `keyhole` binary: configuration, logging, runtime, exit code.

// Unix-only APIs (clippy.toml) are allowed on Unix (Cargo.toml's [lints]); the
// Windows-shaped check denies them outside the Unix code.
#![cfg_attr(
    keyhole_windows_shape,
    deny(clippy::disallowed_types, clippy::disallowed_methods)
)]

use std::process::ExitCode;

use keyhole::config::{Config, ConfigError};
use keyhole::proxy::Proxy;

/// Exit code for a configuration that cannot work.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    // Before any thread starts: it reads and removes NOTIFY_SOCKET.
    keyhole::systemd::init();
    keyhole::platform::process::note_start();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = keyhole::commands::dispatch(&args) {
        return code;
    }
    let config = match Config::from_process() {
        Ok(config) => config,
        // --help and --version: clap prints them and exits 0.
        Err(ConfigError::Cli(e)) if !e.use_stderr() => e.exit(),
        // A malformed command line is bad configuration like any other:
        // one line, exit 2.
        Err(e) => {
            eprintln!("keyhole: {}", e.one_line());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    keyhole::tls::install_crypto_provider();
    keyhole::logging::init(config.log_format, config.debug_logs);
    let env = keyhole::config::process_env();
    // Bad OTEL_* settings are bad configuration: one line, exit 2, before
    // anything is served.
    #[cfg(feature = "otel")]
    let otel = match keyhole::telemetry::otel::Config::from_env(&env) {
        Ok(otel) => otel,
        Err(e) => {
            eprintln!("keyhole: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    #[cfg(not(feature = "otel"))]
    keyhole::telemetry::note_unsupported(&env);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyhole: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        keyhole::systemd::spawn_watchdog();
        #[cfg(feature = "otel")]
        let otel = otel.map(|otel| keyhole::telemetry::otel::start(otel, &env));
        let lifecycle = std::sync::Arc::new(keyhole::lifecycle::Lifecycle::default());
        // SIGHUP would end the process while it prepares (a Cloud SQL
        // instance may take seconds): from now on it asks for a reload,
        // which runs once keyhole serves.
        if let Err(e) = lifecycle.forward_reload_signal() {
            tracing::warn!(error = %e, "cannot handle SIGHUP yet: a SIGHUP before keyhole is ready ends it");
        }
        let proxy = match Proxy::prepare(&config, env).await {
            Ok(proxy) => proxy,
            Err(e) => {
                eprintln!("keyhole: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let ran = proxy.run(lifecycle).await;
        // Every connection has ended: their last spans and the metrics'
        // final values go out now, within a bounded time.
        #[cfg(feature = "otel")]
        if let Some(otel) = otel {
            otel.shutdown(keyhole::telemetry::otel::FLUSH_WITHIN).await;
        }
        match ran {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(e.exit_code())
            }
        }
    })
}
