//! The Kafka connection of `send`, `tail` and `redrive`: brokers from `-b` or a config's
//! `kafka` section (`-c`, with its TLS and SASL properties), and `-X key=value` on top.

use std::path::PathBuf;

use rdkafka::ClientConfig;

use crate::config::{self, Config, EXIT_CONFIG, Interpolator};

#[derive(clap::Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Brokers, `host:port[,host:port…]`; default: the config's `kafka.brokers`.
    #[arg(short = 'b', long)]
    pub brokers: Option<String>,
    /// Reuse this config's `kafka` section (brokers, TLS, SASL properties).
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// Any librdkafka property, as `key=value`; repeatable, applied last.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
}

/// Why a command could not connect; carries its exit code.
#[derive(Debug)]
pub struct Refused {
    pub code: i32,
    pub message: String,
}

/// `topic`'s metadata from the brokers `config` names, asked briefly: otherwise librdkafka waits
/// minutes for a broker it cannot reach, saying nothing.
pub fn metadata_of<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    config: &ClientConfig,
    topic: &str,
) -> Result<rdkafka::metadata::Metadata, Refused> {
    client
        .fetch_metadata(Some(topic), std::time::Duration::from_secs(10))
        .map_err(|e| Refused {
            code: 1,
            message: format!(
                "cannot reach the broker at {}: {e} (is it running? check -b or the config's kafka.brokers)",
                config.get("bootstrap.servers").unwrap_or_default()
            ),
        })
}

impl KafkaArgs {
    /// The config, when `-c` names one.
    pub fn load(&self) -> Result<Option<Config>, Refused> {
        let Some(path) = &self.config else {
            return Ok(None);
        };
        config::load(path, &Interpolator::from_env())
            .map(Some)
            .map_err(|errors| Refused {
                code: EXIT_CONFIG,
                message: errors.to_string(),
            })
    }

    /// The librdkafka settings: the config's `kafka` section, then `-b`, then `-X`.
    pub fn client(&self, config: Option<&Config>) -> Result<ClientConfig, Refused> {
        let mut c = match config {
            Some(config) => crate::sidecar::client_config(config),
            None => ClientConfig::new(),
        };
        c.set("client.id", "ferry-cli");
        match (&self.brokers, config) {
            (Some(b), _) => {
                c.set("bootstrap.servers", b);
            }
            (None, Some(_)) => {}
            (None, None) => {
                return Err(Refused {
                    code: 2,
                    message:
                        "say where the brokers are: -b HOST:PORT, or -c FILE to use a config's kafka section"
                            .into(),
                });
            }
        }
        for p in &self.properties {
            let Some((k, v)) = p.split_once('=') else {
                return Err(Refused {
                    code: 2,
                    message: format!("-X {p}: write a librdkafka property as key=value"),
                });
            };
            c.set(k.trim(), v.trim());
        }
        Ok(c)
    }
}

/// A progress bar on stderr for `total` items; hidden when stderr is not a terminal.
pub fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{{bar:40}} {{pos}}/{{len}} {what} {{per_sec}} eta {{eta}}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}
