//! The binary: parse the configuration, start logging, run, map the result
//! to an exit status (2: bad configuration, 1: failed to start).

use std::process::ExitCode;

use pushwire::config::{self, Command};

fn main() -> ExitCode {
    let cfg = match config::parse(std::env::args_os().skip(1), |k| std::env::var(k).ok()) {
        Ok(Command::Run(c)) => c,
        Ok(Command::Help) => {
            print!("{}", config::help());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("pushwire {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("pushwire: {e}");
            return ExitCode::from(2);
        }
    };
    // journald adds its own timestamps, but a terminal wants them.
    let logger = simple_logger::SimpleLogger::new()
        .with_level(cfg.log_level)
        .with_utc_timestamps();
    if logger.init().is_err() {
        eprintln!("pushwire: cannot start logging");
    }
    for w in cfg.warnings() {
        log::warn!("{w}");
    }
    match pushwire::run(*cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}
