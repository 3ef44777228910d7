//! The `abridge` command: parses flags ([`args`]), hands each subcommand to its module,
//! and maps errors to exit codes ([`args::EXIT_CODES`]; `PipelineError::exit_code`).
//! What a subcommand prints is formatted in its module; the work is the library's.

mod args;
mod cache;
mod check;
mod eval;
mod logging;
mod run;
mod sample;
mod search;
mod sql;
mod status;

use std::process::ExitCode;

use abridge_pipeline::PipelineError;
use clap::Parser;

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    // A panic inside a guarded read of an input file becomes that file's error (named in
    // the run's summary): no panic message for it.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !abridge_operators::scan::inside_guarded_read() {
            report(info);
        }
    }));
    let cli = Cli::parse();
    logging::init(cli.log_format);
    // Failpoints named by FAILPOINTS (test builds only; see operators' fault tests).
    let _failpoints = fail::FailScenario::setup();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args, cli.log_format).await,
            Command::Sql(args) => sql::sql(args).await,
            Command::Search(args) => search::search(args).await,
            Command::Eval(args) => eval::eval(args).await,
            Command::Sample(args) => sample::sample(&args),
            Command::Status(args) => status::status(&args),
            Command::Cache(args) => cache::cache(&args),
            Command::CheckKernels(args) => check::check_kernels(&args),
        }
    });
    // Whatever a stopped run left on blocking threads (a model still loading, say) has no
    // more effect: its writer was joined and its manifest written. Do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = err
                .chain()
                .find_map(|e| e.downcast_ref::<PipelineError>())
                .map_or(1, PipelineError::exit_code);
            tracing::error!(exit_code = code, "{}", message(&err));
            ExitCode::from(code)
        }
    }
}

/// The error and its causes, each cause only where the text so far does not already say it
/// (library errors name their source in their own message).
fn message(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
