//! `relay`: TURN server with a kernel fast path.

use clap::Parser;
use relay::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => relay::daemon::serve(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("relay: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
