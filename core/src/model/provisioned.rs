//! Provisioned concurrency (PutProvisionedConcurrencyConfig): how many sandboxes of a function
//! the fleet keeps booted ahead of load.
//!
//! Sluice has no published versions or aliases, so there is at most one configuration per
//! function, and it applies to the function's current code (`$LATEST`).

use serde::{Deserialize, Serialize};

use super::validate::{Validate, Violations};

/// A function's provisioned concurrency, as the store keeps it (named after the function).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProvisionedConcurrencyConfig {
    /// Sandboxes to keep booted: at least 1, at most the function's reserved concurrency when
    /// that is set, and never so many that the account keeps fewer than 100 unreserved.
    pub requested_provisioned_concurrent_executions: u32,
    /// When a user last changed this configuration, ISO 8601 as Lambda prints it
    /// (`2019-11-14T18:16:05.568+0000`, from [`crate::time::iso8601`]).
    pub last_modified: String,
}

impl Validate for ProvisionedConcurrencyConfig {
    fn validate(&self) -> Result<(), Violations> {
        let mut v = Violations::default();
        if self.requested_provisioned_concurrent_executions == 0 {
            v.push(
                "RequestedProvisionedConcurrentExecutions",
                "must be at least 1, got 0",
            );
        }
        v.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse, Format};

    #[test]
    fn serde_uses_lambdas_names_and_round_trips() {
        let c = ProvisionedConcurrencyConfig {
            requested_provisioned_concurrent_executions: 3,
            last_modified: crate::time::iso8601(1_573_755_365_568, "+0000"),
        };
        let text = serde_json::to_string(&c).expect("encodes");
        assert_eq!(
            text,
            r#"{"RequestedProvisionedConcurrentExecutions":3,"LastModified":"2019-11-14T18:16:05.568+0000"}"#
        );
        let back: ProvisionedConcurrencyConfig = parse(&text, Format::Json).expect("valid");
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_fields_and_zero_are_refused() {
        let unknown = parse::<ProvisionedConcurrencyConfig>(
            r#"{"RequestedProvisionedConcurrentExecutions":1,"LastModified":"x","Qualifier":"1"}"#,
            Format::Json,
        )
        .expect_err("unknown field");
        assert!(unknown.to_string().contains("Qualifier"), "{unknown}");
        let zero = parse::<ProvisionedConcurrencyConfig>(
            r#"{"RequestedProvisionedConcurrentExecutions":0,"LastModified":"x"}"#,
            Format::Json,
        )
        .expect_err("zero");
        assert!(
            zero.to_string()
                .contains("RequestedProvisionedConcurrentExecutions must be at least 1, got 0"),
            "{zero}"
        );
    }
}
