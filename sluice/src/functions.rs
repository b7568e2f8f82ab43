//! `sluice functions …`: a client of a node's Lambda-compatible control API.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use sluice_core::model::{parse, Environment, Format, FunctionConfig, Validate};

/// Where the node's API is.
#[derive(Debug, Clone, Args)]
pub struct Endpoint {
    /// The node's API address.
    #[arg(
        long,
        env = "SLUICE_ENDPOINT",
        default_value = "http://127.0.0.1:9000",
        global = true
    )]
    pub endpoint: String,
}

#[derive(Debug, Subcommand)]
pub enum FunctionsCommand {
    /// Create a function from flags or from a JSON/YAML file with CreateFunction's fields.
    ///
    /// Example: sluice functions create --name echo --code /srv/echo --memory 256
    Create {
        /// The function's name (1–64 letters, digits, '-' and '_').
        #[arg(long, required_unless_present = "file")]
        name: Option<String>,
        /// A directory (or .zip) holding an executable `bootstrap`, as an absolute path.
        #[arg(long, required_unless_present = "file")]
        code: Option<String>,
        /// Memory in MiB, 128–10240.
        #[arg(long, default_value_t = 128)]
        memory: i64,
        /// Timeout in seconds, 1–900.
        #[arg(long, default_value_t = 3)]
        timeout: i64,
        /// Environment variable NAME=VALUE (repeatable).
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Reserved concurrency (0 stops all invocations).
        #[arg(long)]
        reserved_concurrency: Option<i64>,
        /// Read the function from this file instead (.json, .yaml or .yml), with Lambda's names:
        /// FunctionName, Code.Path, MemorySize, Timeout, Environment.Variables, …
        #[arg(long, conflicts_with_all = ["name", "code"])]
        file: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// List functions.
    List {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Show one function as JSON.
    Get {
        /// The function's name.
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Set how a function's asynchronous invocations are retried and where their records go
    /// (PutFunctionEventInvokeConfig).
    ///
    /// Example: sluice functions put-event-invoke-config echo --max-retries 1 --on-failure kafka://echo-failed
    PutEventInvokeConfig {
        /// The function's name.
        name: String,
        /// Retries after a function error, 0–2 (Lambda's default 2).
        #[arg(long, default_value_t = 2)]
        max_retries: i64,
        /// Oldest an event may get before it is dropped to on-failure, 60–21600 s.
        #[arg(long, default_value_t = 21_600)]
        max_age: i64,
        /// Where success records go: kafka://<topic>.
        #[arg(long)]
        on_success: Option<String>,
        /// Where failure records go: kafka://<topic>.
        #[arg(long)]
        on_failure: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Keep N sandboxes of a function booted ahead of load (PutProvisionedConcurrencyConfig).
    ///
    /// The fleet's workers boot the sandboxes in the background: the answer says IN_PROGRESS
    /// until all N are ready, then READY (see get-provisioned-concurrency). N must be at least 1,
    /// at most the function's reserved concurrency when it has one, and leave the account 100
    /// unreserved concurrent executions. Putting again replaces the count.
    ///
    /// Example: sluice functions put-provisioned-concurrency --function echo --count 2
    PutProvisionedConcurrency {
        /// The function's name.
        #[arg(long)]
        function: String,
        /// How many sandboxes to keep booted (1 or more).
        #[arg(long)]
        count: i64,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Show a function's provisioned concurrency: requested, allocated and available sandboxes,
    /// and Status (IN_PROGRESS while the fleet boots them, READY once all are booted).
    ///
    /// Example: sluice functions get-provisioned-concurrency --function echo
    GetProvisionedConcurrency {
        /// The function's name.
        #[arg(long)]
        function: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Stop keeping sandboxes booted for a function (DeleteProvisionedConcurrencyConfig); the
    /// function keeps running on demand, with cold starts.
    ///
    /// Example: sluice functions delete-provisioned-concurrency --function echo
    DeleteProvisionedConcurrency {
        /// The function's name.
        #[arg(long)]
        function: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete a function (and its event-invoke and provisioned-concurrency configs).
    Delete {
        /// The function's name.
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

pub async fn run(cmd: FunctionsCommand) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    match cmd {
        FunctionsCommand::Create {
            name,
            code,
            memory,
            timeout,
            env,
            reserved_concurrency,
            file,
            endpoint,
        } => {
            let config = match file {
                Some(path) => {
                    let text =
                        std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
                    parse::<FunctionConfig>(&text, Format::from_path(&path))
                        .with_context(|| format!("in {path}"))?
                }
                None => {
                    let mut variables = BTreeMap::new();
                    for pair in env {
                        let (k, v) = pair
                            .split_once('=')
                            .with_context(|| format!("--env takes NAME=VALUE, got {pair:?}"))?;
                        variables.insert(k.to_owned(), v.to_owned());
                    }
                    let code = code.unwrap_or_default();
                    let code = std::fs::canonicalize(&code)
                        .with_context(|| format!("--code {code}: no such file or directory"))?;
                    let config = FunctionConfig {
                        memory_size: memory,
                        timeout,
                        environment: (!variables.is_empty()).then_some(Environment { variables }),
                        reserved_concurrent_executions: reserved_concurrency,
                        ..FunctionConfig::from_path(
                            name.unwrap_or_default(),
                            code.display().to_string(),
                        )
                    };
                    config.validate().context("invalid function")?;
                    config
                }
            };
            let url = format!("{}/2015-03-31/functions", endpoint.endpoint);
            let out = call(http.post(&url).json(&config)).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        FunctionsCommand::List { json, endpoint } => {
            let url = format!("{}/2015-03-31/functions/", endpoint.endpoint);
            let out = call(http.get(&url)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_table(&out);
            }
        }
        FunctionsCommand::Get { name, endpoint } => {
            let url = format!("{}/2015-03-31/functions/{name}", endpoint.endpoint);
            println!(
                "{}",
                serde_json::to_string_pretty(&call(http.get(&url)).await?)?
            );
        }
        FunctionsCommand::PutEventInvokeConfig {
            name,
            max_retries,
            max_age,
            on_success,
            on_failure,
            endpoint,
        } => {
            let dest =
                |d: Option<String>| d.map_or_else(|| json!({}), |d| json!({ "Destination": d }));
            let body = json!({
                "MaximumRetryAttempts": max_retries,
                "MaximumEventAgeInSeconds": max_age,
                "DestinationConfig": { "OnSuccess": dest(on_success), "OnFailure": dest(on_failure) },
            });
            let url = format!(
                "{}/2019-09-25/functions/{name}/event-invoke-config",
                endpoint.endpoint
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&call(http.put(&url).json(&body)).await?)?
            );
        }
        FunctionsCommand::PutProvisionedConcurrency {
            function,
            count,
            endpoint,
        } => {
            let body = json!({ "ProvisionedConcurrentExecutions": count });
            let out = call(http.put(provisioned_url(&endpoint, &function)).json(&body)).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        FunctionsCommand::GetProvisionedConcurrency { function, endpoint } => {
            let out = call(http.get(provisioned_url(&endpoint, &function))).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        FunctionsCommand::DeleteProvisionedConcurrency { function, endpoint } => {
            call(http.delete(provisioned_url(&endpoint, &function))).await?;
            println!("deleted the provisioned concurrency of {function}");
        }
        FunctionsCommand::Delete { name, endpoint } => {
            let url = format!("{}/2015-03-31/functions/{name}", endpoint.endpoint);
            call(http.delete(&url)).await?;
            println!("deleted {name}");
        }
    }
    Ok(())
}

/// The provisioned-concurrency resource of `function` (no Qualifier: Sluice has only `$LATEST`).
fn provisioned_url(endpoint: &Endpoint, function: &str) -> String {
    format!(
        "{}/2019-09-30/functions/{function}/provisioned-concurrency",
        endpoint.endpoint
    )
}

fn print_table(list: &Value) {
    let empty = Vec::new();
    let functions = list["Functions"].as_array().unwrap_or(&empty);
    println!(
        "{:<32} {:>7} {:>8} {:>9}  LAST MODIFIED",
        "NAME", "MEMORY", "TIMEOUT", "REVISION"
    );
    for f in functions {
        println!(
            "{:<32} {:>7} {:>8} {:>9}  {}",
            f["FunctionName"].as_str().unwrap_or("?"),
            f["MemorySize"].to_string(),
            f["Timeout"].to_string(),
            f["RevisionId"].as_str().unwrap_or("?"),
            f["LastModified"].as_str().unwrap_or("?"),
        );
    }
    println!("{} function(s)", functions.len());
}

/// Sends a request and returns its JSON body, turning Lambda errors into readable ones.
pub(crate) async fn call(req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let resp = req
        .send()
        .await
        .context("cannot reach the Sluice API (is a node running? see --endpoint)")?;
    let status = resp.status();
    let kind = resp
        .headers()
        .get("x-amzn-ErrorType")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.bytes().await.context("read the API's response")?;
    let value: Value = if body.is_empty() {
        json!(null)
    } else {
        serde_json::from_slice(&body).unwrap_or(json!(null))
    };
    if !status.is_success() {
        let message = value["message"]
            .as_str()
            .or(value["Message"].as_str())
            .unwrap_or("");
        bail!(
            "{} ({}): {message}",
            kind.unwrap_or_else(|| "error".into()),
            status.as_u16()
        );
    }
    Ok(value)
}
