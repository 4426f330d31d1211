//! The `keyhole` binary: configuration, logging, runtime, exit code.

use std::process::ExitCode;

use keyhole::config::{Config, ConfigError};
use keyhole::proxy::Proxy;

/// Exit code for a configuration that cannot work.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    // Before any thread starts: it reads and removes NOTIFY_SOCKET.
    keyhole::systemd::init();
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
    let env = keyhole::config::process_env();
    runtime.block_on(async {
        keyhole::systemd::spawn_watchdog();
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
        match proxy.run(lifecycle).await {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(e.exit_code())
            }
        }
    })
}
