//! Lambda's asynchronous invocation record, as on-success and on-failure destinations get it.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// Why a record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    /// The function succeeded (on-success).
    Success,
    /// Every attempt failed (on-failure).
    RetriesExhausted,
    /// The event grew older than `MaximumEventAgeInSeconds` before it could run (on-failure).
    EventAgeExceeded,
    /// The function's reserved concurrency is 0 (on-failure, no attempt).
    ZeroReservedConcurrency,
}

/// `requestContext`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestContext {
    /// The invocation's request id.
    pub request_id: String,
    /// `arn:…:function:<name>:$LATEST`.
    pub function_arn: String,
    /// Why the record was written.
    pub condition: Condition,
    /// Invocations made.
    pub approximate_invoke_count: u32,
}

/// `responseContext` (absent when the function never ran).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseContext {
    /// 200 when the function ran.
    pub status_code: u16,
    /// `$LATEST`.
    pub executed_version: String,
    /// `Unhandled` for a function error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_error: Option<String>,
}

/// The record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InvocationRecord {
    /// `1.0`.
    pub version: String,
    /// When the record was written, ISO 8601 UTC with milliseconds.
    pub timestamp: String,
    /// Which invocation, and why.
    pub request_context: RequestContext,
    /// The event, verbatim: the caller's JSON text byte for byte (so a redrive re-submits exactly
    /// what was sent: a top-level string keeps its quotes, big integers all their digits), or a
    /// JSON string when the event was not JSON text.
    pub request_payload: Box<RawValue>,
    /// The event's exact bytes, base64, only when `requestPayload` cannot hold them verbatim (not
    /// UTF-8 JSON, or JSON with surrounding whitespace). A Sluice extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_payload_base64: Option<String>,
    /// How the function answered, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_context: Option<ResponseContext>,
    /// What it answered (its response, or its error body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_payload: Option<Value>,
}

/// Bytes as JSON when they are JSON, else as a string.
#[must_use]
pub fn json_or_string(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

impl InvocationRecord {
    /// A record for `condition`. `response` is `(function_error, payload)` when the function ran.
    #[must_use]
    pub fn new(
        request_id: &str,
        function_arn: &str,
        condition: Condition,
        invoke_count: u32,
        request_payload: &[u8],
        response: Option<(Option<String>, &[u8])>,
        now_ms: i64,
    ) -> Self {
        let (response_context, response_payload) = match response {
            Some((function_error, payload)) => (
                Some(ResponseContext {
                    status_code: 200,
                    executed_version: "$LATEST".into(),
                    function_error,
                }),
                Some(json_or_string(payload)),
            ),
            None => (None, None),
        };
        let verbatim = std::str::from_utf8(request_payload)
            .ok()
            .and_then(|text| RawValue::from_string(text.to_owned()).ok())
            .filter(|raw| raw.get().as_bytes() == request_payload);
        let request_payload_base64 = verbatim.is_none().then(|| B64.encode(request_payload));
        Self {
            version: "1.0".into(),
            timestamp: iso8601(now_ms),
            request_context: RequestContext {
                request_id: request_id.to_owned(),
                function_arn: format!("{function_arn}:$LATEST"),
                condition,
                approximate_invoke_count: invoke_count,
            },
            request_payload: verbatim.unwrap_or_else(|| {
                RawValue::from_string(json_or_string(request_payload).to_string())
                    .expect("a serialized Value is JSON")
            }),
            request_payload_base64,
            response_context,
            response_payload,
        }
    }

    /// The function's name, from the ARN.
    #[must_use]
    pub fn function_name(&self) -> Option<&str> {
        let arn = self
            .request_context
            .function_arn
            .strip_suffix(":$LATEST")
            .unwrap_or(&self.request_context.function_arn);
        arn.rsplit(':').next()
    }

    /// The original event, byte for byte, to re-submit.
    #[must_use]
    pub fn request_bytes(&self) -> Vec<u8> {
        if let Some(bytes) = self
            .request_payload_base64
            .as_deref()
            .and_then(|b| B64.decode(b).ok())
        {
            return bytes;
        }
        self.request_payload.get().as_bytes().to_vec()
    }
}

/// `2019-11-14T18:16:05.568Z`.
#[must_use]
pub fn iso8601(ms: i64) -> String {
    sluice_core::time::iso8601(ms, "Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_record_has_lambdas_shape() {
        let r = InvocationRecord::new(
            "e4b46cbf",
            "arn:aws:lambda:us-east-2:123456789012:function:my-function",
            Condition::RetriesExhausted,
            3,
            br#"{"ORDER_IDS":["9e07af03"]}"#,
            Some((Some("Unhandled".into()), br#"{"errorMessage":"boom"}"#)),
            1_573_755_365_568,
        );
        let v = serde_json::to_value(&r).expect("json");
        assert_eq!(v["version"], "1.0");
        assert_eq!(v["timestamp"], "2019-11-14T18:16:05.568Z");
        assert_eq!(v["requestContext"]["requestId"], "e4b46cbf");
        assert_eq!(
            v["requestContext"]["functionArn"],
            "arn:aws:lambda:us-east-2:123456789012:function:my-function:$LATEST"
        );
        assert_eq!(v["requestContext"]["condition"], "RetriesExhausted");
        assert_eq!(v["requestContext"]["approximateInvokeCount"], 3);
        assert_eq!(v["requestPayload"]["ORDER_IDS"][0], "9e07af03");
        assert_eq!(v["responseContext"]["statusCode"], 200);
        assert_eq!(v["responseContext"]["executedVersion"], "$LATEST");
        assert_eq!(v["responseContext"]["functionError"], "Unhandled");
        assert_eq!(v["responsePayload"]["errorMessage"], "boom");
        assert_eq!(r.function_name(), Some("my-function"));
    }

    #[test]
    fn an_expired_event_has_no_response_context() {
        let r = InvocationRecord::new(
            "id",
            "arn:f",
            Condition::EventAgeExceeded,
            0,
            b"not json",
            None,
            0,
        );
        let v = serde_json::to_value(&r).expect("json");
        assert!(v.get("responseContext").is_none());
        assert_eq!(v["requestPayload"], "not json");
        assert_eq!(r.request_bytes(), b"not json");
    }

    #[test]
    fn the_request_payload_survives_the_record_byte_for_byte() {
        for payload in [
            &br#""a top-level string""#[..],
            br#"{"id":123456789012345678901234567890,"f":1.0000000000000000001}"#,
            br#"{ "spaced" : [ 1 , 2 ] }"#,
            b" {\"padded\":true}\n",
            b"not json",
            b"\xff\xfe binary",
            b"null",
        ] {
            let r = InvocationRecord::new(
                "id",
                "arn:f",
                Condition::RetriesExhausted,
                1,
                payload,
                None,
                0,
            );
            let wire = serde_json::to_vec(&r).expect("encode");
            let back: InvocationRecord = serde_json::from_slice(&wire).expect("decode");
            assert_eq!(
                back.request_bytes(),
                payload,
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        // JSON text stays readable JSON in the record (Lambda's shape), with no extension field.
        let r = InvocationRecord::new(
            "id",
            "arn:f",
            Condition::Success,
            1,
            br#"{"big":12345678901234567890123}"#,
            None,
            0,
        );
        let wire = String::from_utf8(serde_json::to_vec(&r).expect("encode")).expect("utf8");
        assert!(
            wire.contains(r#""requestPayload":{"big":12345678901234567890123}"#),
            "{wire}"
        );
        assert!(!wire.contains("requestPayloadBase64"), "{wire}");
    }
}
