use clap::Parser;
use std::process::ExitCode;
use workersd::cli::{Cli, Command};
use workersd::sources::file;
use workersd::telemetry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { targets } => match file::load_targets(&targets) {
            Ok(found) => {
                println!("{}: OK, {} target(s)", targets.display(), found.len());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for error in &errors {
                    println!("{}: {error}", targets.display());
                }
                println!("{}: {} error(s)", targets.display(), errors.len());
                ExitCode::from(1)
            }
        },
        Command::Crd => {
            print!("{}", workersd::sources::kubernetes::crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Kubernetes(args) => {
            telemetry::init(args.run.log_format);
            run_async(workersd::runtime::run_kubernetes(*args))
        }
        Command::Nomad(args) => {
            telemetry::init(args.run.log_format);
            run_async(workersd::runtime::run_nomad(*args))
        }
        Command::Standalone(args) => {
            telemetry::init(args.run.log_format);
            run_async(workersd::runtime::run_standalone(*args))
        }
    }
}

fn run_async(work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fatal(&anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fatal(&e),
    }
}

/// Reports the error that ends the process, once: as a log line (JSON lines stay parseable),
/// or on plain stderr when `WORKERSD_LOG` filters errors out.
fn fatal(error: &anyhow::Error) -> ExitCode {
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("{error:#}");
    } else {
        eprintln!("workersd: {error:#}");
    }
    ExitCode::from(1)
}
