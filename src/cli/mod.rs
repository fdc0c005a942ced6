//! The commands. Each returns its exit code: 0 success, 2 usage, 78 configuration, 1 the rest.

mod client;
mod ctl;
mod demo;
mod redrive;
mod send;
mod tail;
mod dev;
mod run;
mod validate;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "A Kafka sidecar: consume, call your service, publish its answer, commit what is safe."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Run {
        /// The config file.
        #[arg(
            short = 'c',
            long = "config",
            env = "FERRY_CONFIG",
            default_value = "ferry.yaml"
        )]
        config: PathBuf,
    },
    /// Check a config file and print every error with its line and column.
    Validate {
        #[arg(
            short = 'c',
            long = "config",
            env = "FERRY_CONFIG",
            default_value = "ferry.yaml"
        )]
        config: PathBuf,
        /// Treat missing environment variables and secret files as placeholders.
        #[arg(long)]
        env_optional: bool,
    },
    /// Print the JSON Schema of the config format (for editors and CI checks).
    Schema,
    /// Everything on one machine: an embedded broker, an example service, sample records.
    Demo {
        /// How many sample records to send.
        #[arg(long, default_value_t = 300)]
        records: u32,
    },
    /// Produce test records: one, many (`--count`, `--rate`), or one per JSON line.
    Send(send::SendArgs),
    /// Print a topic's records with key, headers, partition and offset.
    Tail(tail::TailArgs),
    /// Send a route's dead letters back to be handled again, once each.
    Redrive(redrive::RedriveArgs),
    /// Talk to a running sidecar: status, pause, resume, drain.
    Ctl {
        verb: ctl::Verb,
        /// The sidecar's admin endpoint.
        #[arg(long, env = "FERRY_ADMIN_URL", default_value = "http://127.0.0.1:9464")]
        admin: String,
        /// The admin token (needed when the endpoint is not on loopback).
        #[arg(long, env = "FERRY_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Only this route (all routes when absent).
        #[arg(long)]
        route: Option<String>,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Local development tools.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Run an embedded Kafka-protocol broker until interrupted; prints its address.
    Broker {
        /// Also accept connections on this loopback port.
        #[arg(long)]
        port: Option<u16>,
        /// Topics to create, as NAME or NAME:PARTITIONS.
        #[arg(long = "topic", value_name = "NAME[:PARTITIONS]")]
        topics: Vec<String>,
    },
}

/// Parses the command line and runs the command.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run { config } => run::run(&config).await,
            Command::Validate { config, env_optional } => validate::validate(&config, env_optional),
            Command::Send(args) => send::send(args).await,
            Command::Tail(args) => tail::tail(args).await,
            Command::Redrive(args) => redrive::redrive(args).await,
            Command::Schema => match serde_json::to_string_pretty(&crate::config::schema::schema()) {
                Ok(text) => {
                    println!("{text}");
                    0
                }
                Err(e) => fail("cannot print the schema", &e.into()),
            },
            Command::Demo { records } => demo::demo(records).await,
            Command::Dev {
                command: DevCommand::Broker { port, topics },
            } => dev::broker(port, &topics).await,
            Command::Ctl {
                verb,
                admin,
                token,
                route,
                json,
            } => {
                let target = ctl::Target {
                    admin: &admin,
                    token: token.as_deref(),
                    route: route.as_deref(),
                    json,
                };
                ctl::ctl(verb, target).await
            }
        }
    });
    // In-flight blocking work (a stuck librdkafka call) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// Prints an error chain for a command that failed, and returns exit code 1.
fn fail(context: &str, e: &anyhow::Error) -> i32 {
    eprintln!("error: {context}: {e:#}");
    1
}
