//! `sluice`: the node binary and command-line client.
//!
//! Thin by design: parse the command line, validate configuration, wire the stage crates, wait
//! for a signal, map errors to exit codes (0 success, 1 failure, 2 bad usage).
#![forbid(unsafe_code)]

mod config;
mod dev;
mod functions;
mod invoke_cli;
mod kafka_cli;
mod logs_cli;
mod mappings;
mod node;
mod services;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Sluice runs functions from event streams: a self-hosted re-implementation of AWS Lambda's
/// asynchronous and stream data plane on Kafka and Redis.
///
/// Start here: `sluice dev` runs everything on this machine (it starts a Kafka-compatible broker
/// and Redis when none are reachable); then `sluice functions create --name echo --code ./bundle`
/// and `sluice functions list`. In production run `sluice node` on as many machines as you like,
/// all pointed at the same Kafka cluster and Redis.
#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    propagate_version = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: the Lambda-compatible API, pollers and workers, by role.
    Node(Box<node::NodeConfig>),
    /// Run everything on this machine: start Kafka (tansu) and Redis if they are not reachable,
    /// then a node with every role. Ctrl-C stops what it started.
    Dev(dev::DevArgs),
    /// Create, list, show and delete functions through a node's API.
    #[command(subcommand)]
    Functions(functions::FunctionsCommand),
    /// Create, list, show, update and delete Kafka event source mappings through a node's API.
    #[command(subcommand)]
    Mappings(mappings::MappingsCommand),
    /// Invoke a function (synchronously, as an event, or a dry run) through a node's API.
    Invoke(invoke_cli::InvokeArgs),
    /// Kafka topics (create).
    #[command(subcommand)]
    Topics(kafka_cli::TopicsCommand),
    /// Write records to any Kafka topic, one per input line (kcat-style flags).
    Produce(kafka_cli::ProduceArgs),
    /// Print a function's invocation logs (START, its output, END, REPORT) from every worker,
    /// like `sam logs`: `sluice logs FUNCTION [--follow] [--since 10m] [--request-id ID]`.
    Logs(logs_cli::LogsArgs),
    /// Inspect failure and success destinations.
    #[command(subcommand)]
    Destinations(kafka_cli::DestinationsCommand),
    /// Re-submit the failed events of a destination topic to their functions; resumes where an
    /// interrupted redrive stopped.
    Redrive(kafka_cli::RedriveArgs),
}

fn main() -> ExitCode {
    // A node's config file becomes defaults for its flags: read it while the process has one
    // thread, before the command line is parsed.
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = config::apply_file(&args) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Node(args) => node::run(*args).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Functions(cmd) => functions::run(cmd).await,
            Command::Invoke(args) => invoke_cli::run(args).await,
            Command::Mappings(cmd) => mappings::run(cmd).await,
            Command::Produce(args) => kafka_cli::produce(args).await,
            Command::Topics(cmd) => kafka_cli::topics(cmd).await,
            Command::Destinations(cmd) => kafka_cli::tail(cmd).await,
            Command::Logs(args) => logs_cli::logs(args).await,
            Command::Redrive(args) => kafka_cli::redrive(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
