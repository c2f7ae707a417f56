//! The `switchyard` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use switchyard::app::{self, exit};

#[derive(Parser)]
#[command(name = "switchyard", version = switchyard::version::LONG, about = "HTTP reverse-proxy load balancer for RPA bots and RPC services")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (for the default `run`).
    #[arg(short, long, default_value = "config/switchyard.yaml", global = true)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Serve traffic (the default).
    Run {
        /// Take the listening sockets over from the running process of this
        /// config, which then drains and exits 0 (zero-downtime upgrade).
        #[arg(long)]
        upgrade: bool,
        /// Where processes of this config meet for an upgrade (default:
        /// /tmp/switchyard-<hash of the config's absolute path>.sock).
        #[arg(long)]
        upgrade_socket: Option<PathBuf>,
    },
    /// Validate the config file; exit 0, or 1 with file:line:col and what is wrong.
    Check,
    /// Print the version and the git commit this binary was built from.
    Version,
    /// Start three sample bots on loopback and the proxy in front of them.
    Demo {
        /// Proxy port on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Start only the bots, for `switchyard run -c config/switchyard.yaml`.
        #[arg(long)]
        bots_only: bool,
    },
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { exit::BAD_USAGE } else { exit::OK };
            let _ = error.print();
            std::process::exit(code);
        }
    };
    let code = match cli.command.unwrap_or(Command::Run { upgrade: false, upgrade_socket: None }) {
        Command::Check => match switchyard::config::load(&cli.config) {
            Ok(config) => {
                // Warnings do not refuse the config: it is ok, with these said.
                for warning in &config.warnings {
                    eprintln!("{warning}");
                }
                println!("{}: ok", cli.config.display());
                exit::OK
            }
            Err(errors) => {
                eprintln!("{errors}");
                exit::BAD_CONFIG
            }
        },
        Command::Run { upgrade, upgrade_socket } => {
            runtime().block_on(app::run(&cli.config, app::RunOptions { upgrade, upgrade_socket }))
        }
        Command::Version => {
            println!("switchyard {}", switchyard::version::LONG);
            exit::OK
        }
        Command::Demo { port, bots_only } => runtime().block_on(switchyard::demo::run(port, bots_only)),
    };
    std::process::exit(code);
}

/// The control plane's runtime (admin, reload, signals, housekeeping; the
/// demo's bots). Requests are served on the workers' own runtimes.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("can start the tokio runtime")
}
