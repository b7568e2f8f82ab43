//! Ingest: the HTTP front end, wire-compatible with the AWS Lambda REST API (`/2015-03-31/…`), so
//! the AWS SDKs and CLI work against a node with an endpoint override.
//!
//! Main types: [`ApiState`] (what the handlers share: the configuration store and account
//! settings) and [`router`]. Handlers run on the node's tokio runtime; they read the in-memory
//! configuration view and write through the [`sluice_core::store::ConfigStore`].
//!
//! Errors follow Lambda: an HTTP status, an `x-amzn-ErrorType` header naming the exception, and a
//! JSON body `{"Type": "User", "message": …}`.
#![forbid(unsafe_code)]

mod account;
mod error;
mod functions;
mod invoke;
mod mappings;
mod names;
mod provisioned;
mod settings;
pub mod sigv4;

use axum::extract::DefaultBodyLimit;
use std::sync::Arc;

use axum::routing::{get, post, put};
use axum::Router;
use sluice_core::events::EventProducer;
use sluice_core::invoke::Invoker;
use sluice_core::store::ConfigStore;

pub use error::ApiError;

/// Lambda's limit on a CreateFunction request with an inline zip (50 MiB zip, base64-encoded).
const MAX_CONTROL_BODY_BYTES: usize = 70 * 1024 * 1024;

/// The account a node presents itself as (for ARNs and concurrency).
#[derive(Debug, Clone)]
pub struct AccountSettings {
    /// Region in ARNs, e.g. `us-east-1`.
    pub region: String,
    /// Twelve-digit account id in ARNs.
    pub account_id: String,
    /// Account concurrency limit; reservations must leave 100 unreserved, as in Lambda.
    pub concurrency_limit: u32,
}

impl Default for AccountSettings {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            account_id: "000000000000".into(),
            concurrency_limit: 1000,
        }
    }
}

impl AccountSettings {
    /// The ARN of function `name`.
    #[must_use]
    pub fn function_arn(&self, name: &str) -> String {
        format!(
            "arn:aws:lambda:{}:{}:function:{name}",
            self.region, self.account_id
        )
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The shared configuration.
    pub store: ConfigStore,
    /// Account settings.
    pub account: AccountSettings,
    /// Runs synchronous invocations (`None` on a node without workers).
    pub invoker: Option<Arc<dyn Invoker>>,
    /// Writes asynchronous invocations to the async queue.
    pub events: Option<EventProducer>,
    /// The async queue topic.
    pub async_topic: String,
    /// Kafka (for code given as `Code.ZipFile`, kept in the code topic).
    pub kafka: Option<sluice_core::kafka::KafkaSettings>,
    /// The code topic.
    pub code_topic: String,
    /// The prefix of every topic and consumer group Sluice itself uses on its cluster: mappings
    /// may not read those (they hold every function's events and the configuration).
    pub topic_prefix: String,
    /// Access keys; when any are set, requests must carry a valid SigV4 signature.
    pub credentials: sigv4::Credentials,
}

/// The Lambda-compatible API routes.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route(
            "/2015-03-31/functions",
            get(functions::list_functions).post(functions::create_function),
        )
        .route(
            "/2015-03-31/functions/",
            get(functions::list_functions).post(functions::create_function),
        )
        .route(
            "/2015-03-31/functions/{name}",
            get(functions::get_function).delete(functions::delete_function),
        )
        .route(
            "/2015-03-31/functions/{name}/configuration",
            get(functions::get_function_configuration).put(settings::update_configuration),
        )
        .route(
            "/2015-03-31/functions/{name}/code",
            put(settings::update_code),
        )
        .route(
            "/2019-09-25/functions/{name}/event-invoke-config",
            get(settings::get_eic)
                .put(settings::put_eic)
                .post(settings::update_eic)
                .delete(settings::delete_eic),
        )
        .route(
            "/2017-10-31/functions/{name}/concurrency",
            put(settings::put_concurrency).delete(settings::delete_concurrency),
        )
        .route(
            "/2019-09-30/functions/{name}/concurrency",
            get(settings::get_concurrency),
        )
        .route(
            "/2019-09-30/functions/{name}/provisioned-concurrency",
            get(provisioned::get)
                .put(provisioned::put)
                .delete(provisioned::delete),
        )
        .layer(DefaultBodyLimit::max(MAX_CONTROL_BODY_BYTES))
        .route(
            "/2015-03-31/functions/{name}/invocations",
            post(invoke::invoke).layer(DefaultBodyLimit::max(
                invoke::MAX_SYNC_PAYLOAD_BYTES + 64 * 1024,
            )),
        )
        .route(
            "/2015-03-31/event-source-mappings",
            get(mappings::list).post(mappings::create),
        )
        .route(
            "/2015-03-31/event-source-mappings/",
            get(mappings::list).post(mappings::create),
        )
        .route(
            "/2015-03-31/event-source-mappings/{uuid}",
            get(mappings::get)
                .put(mappings::update)
                .delete(mappings::delete),
        )
        .route(
            "/2019-09-25/functions/{name}/event-invoke-config/list",
            get(account::list_eics),
        )
        .route(
            "/2016-08-19/account-settings",
            get(account::account_settings),
        )
        .route(
            "/2016-08-19/account-settings/",
            get(account::account_settings),
        )
        .route(
            "/2017-03-31/tags/{arn}",
            get(account::list_tags)
                .post(account::tag_resource)
                .delete(account::untag_resource),
        )
        .fallback(account::unknown_operation)
        .with_state(state.clone());
    // Names are made bare after the signature was checked on the path as sent, and before the
    // path is routed (a layer on the routes would run after routing).
    let named = tower_layer::Layer::layer(
        &axum::middleware::from_fn_with_state(state.clone(), names::bare_names),
        api,
    );
    Router::new()
        .fallback_service(named)
        .layer(axum::middleware::from_fn_with_state(
            state.credentials.clone(),
            sigv4::verify,
        ))
}

/// The front end's starter: serves `app` (the Lambda API of [`router`], merged by the caller with
/// whatever else the node serves on the same address, e.g. `/metrics`) on `listener` until
/// `cancel`, then finishes the requests in progress. Runs on `tracker`.
pub fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    cancel: tokio_util::sync::CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) {
    let app = app.layer(tower_http::trace::TraceLayer::new_for_http());
    tracker.spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "API server stopped");
        }
    });
}
