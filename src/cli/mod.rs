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
    // A command whose output goes into a pipe (`ferry tail … | head`) ends when the reader
    // does, as Unix tools do: Rust's runtime ignores SIGPIPE, which made the next line printed
    // a panic. The sidecar and the embedded broker keep ignoring it: they run for long and
    // their output is a log, not something to pipe. (Sockets never raise it: Rust's and
    // librdkafka's writes to them ask the kernel not to, so the demo's are safe.)
    if !matches!(cli.command, Command::Run { .. } | Command::Dev { .. }) {
        // SAFETY: setting a signal's disposition to its default, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let workers = match worker_threads(std::env::var_os(WORKER_THREADS_VAR).as_deref()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return 78;
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let runtime =
        match crate::wake::count_sleep(builder.worker_threads(workers).enable_all(), workers).build() {
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

/// The environment variable that sets how many threads run ferry's async work.
pub const WORKER_THREADS_VAR: &str = "FERRY_WORKER_THREADS";

/// Threads of the async runtime: one unless `FERRY_WORKER_THREADS` says otherwise.
///
/// One, not one per core: a record's work on the runtime is short, and librdkafka runs the
/// broker I/O on threads of its own, so a second worker mostly adds wake-ups (one worker waking
/// the other to share a task). Measured at 1 000 records/s on two cores: 40 to 46 µs of CPU per
/// record against 58 to 76 µs with two, and the same throughput at full speed
/// (`benches/pipeline.rs`, README "Performance").
fn worker_threads(value: Option<&std::ffi::OsStr>) -> Result<usize, String> {
    let Some(value) = value else {
        return Ok(1);
    };
    value
        .to_str()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| (1..=256).contains(n))
        .ok_or_else(|| {
            format!(
                "{WORKER_THREADS_VAR}={value:?} is not a number of threads: give a whole number from 1 to 256, or unset it for one (the default)"
            )
        })
}

/// Prints an error chain for a command that failed, and returns exit code 1.
fn fail(context: &str, e: &anyhow::Error) -> i32 {
    eprintln!("error: {context}: {e:#}");
    1
}

#[cfg(test)]
mod tests {
    use super::worker_threads;
    use std::ffi::OsStr;

    #[test]
    fn worker_threads_default_to_one_and_take_a_whole_number() {
        let cases: &[(Option<&str>, Option<usize>)] = &[
            (None, Some(1)),
            (Some("1"), Some(1)),
            (Some(" 4 "), Some(4)),
            (Some("256"), Some(256)),
            (Some("0"), None),
            (Some("257"), None),
            (Some("-1"), None),
            (Some("two"), None),
            (Some(""), None),
        ];
        for (value, want) in cases {
            let got = worker_threads(value.map(OsStr::new));
            assert_eq!(got.as_ref().ok(), want.as_ref(), "{value:?}: {got:?}");
            if let Err(e) = got {
                assert!(
                    e.contains("FERRY_WORKER_THREADS") && e.contains("1 to 256"),
                    "the error names the variable and what it takes: {e}"
                );
            }
        }
    }
}
