//! `relay`: TURN server with a kernel fast path.

use clap::Parser;
use relay::{
    cli::{Cli, Command, CtlCommand},
    control::client,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => relay::daemon::serve(*args),
        Command::Ctl(ctl) => match ctl.command {
            CtlCommand::Allocations { json } => client::allocations(ctl.admin, json),
            CtlCommand::Metrics => client::request(ctl.admin, "GET", "/metrics").map(|text| {
                print!("{text}");
            }),
            CtlCommand::Fastpath { first, second } => client::fastpath(ctl.admin, &first, &second),
            CtlCommand::Reload => client::reload(ctl.admin),
            CtlCommand::Drain { deadline } => relay::control::drain::drain(ctl.admin, deadline),
            CtlCommand::Status { json } => relay::control::drain::status(ctl.admin, json),
            CtlCommand::Disconnect { allocation, user } => {
                client::disconnect(ctl.admin, allocation, user.as_deref())
            }
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("relay: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
