//! `sluice mappings …`: event source mappings through a node's Lambda-compatible API.

use anyhow::Context;
use clap::Subcommand;
use serde_json::Value;
use sluice_core::model::{parse, EventSourceMappingConfig, Format};

use crate::functions::{call, Endpoint};

#[derive(Debug, Subcommand)]
pub enum MappingsCommand {
    /// Create a mapping from a JSON or YAML file with CreateEventSourceMapping's fields
    /// (FunctionName, Topics, StartingPosition, BatchSize, …), checked before it is sent.
    Create {
        /// The file (.json, .yaml or .yml).
        file: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// List mappings (optionally of one function).
    List {
        /// Only this function's mappings.
        #[arg(long)]
        function: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Show one mapping.
    Get {
        /// The mapping's UUID.
        uuid: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Change a mapping with a JSON object of UpdateEventSourceMapping's fields, e.g.
    /// '{"BatchSize":500}' or '{"Enabled":false}'.
    Update {
        /// The mapping's UUID.
        uuid: String,
        /// The fields to change, as JSON.
        changes: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete a mapping (its consumer group and offsets stay in Kafka).
    Delete {
        /// The mapping's UUID.
        uuid: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

pub async fn run(cmd: MappingsCommand) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let base = |e: &Endpoint| format!("{}/2015-03-31/event-source-mappings/", e.endpoint);
    let out: Value = match cmd {
        MappingsCommand::Create { file, endpoint } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("read {file}"))?;
            let config: EventSourceMappingConfig =
                parse(&text, Format::from_path(&file)).with_context(|| format!("in {file}"))?;
            call(http.post(base(&endpoint)).json(&config)).await?
        }
        MappingsCommand::List { function, endpoint } => {
            let mut req = http.get(base(&endpoint));
            if let Some(f) = function {
                req = req.query(&[("FunctionName", f)]);
            }
            call(req).await?
        }
        MappingsCommand::Get { uuid, endpoint } => {
            call(http.get(format!("{}{uuid}", base(&endpoint)))).await?
        }
        MappingsCommand::Update {
            uuid,
            changes,
            endpoint,
        } => {
            let body: Value =
                serde_json::from_str(&changes).context("the changes must be a JSON object")?;
            call(http.put(format!("{}{uuid}", base(&endpoint))).json(&body)).await?
        }
        MappingsCommand::Delete { uuid, endpoint } => {
            call(http.delete(format!("{}{uuid}", base(&endpoint)))).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
