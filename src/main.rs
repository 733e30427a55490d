use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;
use workersd::cli::{Cli, Command, LogFormat};
use workersd::sources::file;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("WORKERSD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

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
            init_logging(args.run.log_format);
            run_async(workersd::runtime::run_kubernetes(*args))
        }
        Command::Standalone(args) => {
            init_logging(args.run.log_format);
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
        Err(e) => {
            eprintln!("workersd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("workersd: {e:#}");
            ExitCode::from(1)
        }
    }
}
