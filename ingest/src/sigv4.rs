//! AWS Signature Version 4 verification, so that the AWS SDKs and CLI authenticate against a node
//! with the access keys it was given. With no keys configured every request is accepted (signed
//! or not), which is what `sluice dev` does.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::ApiError;

/// Largest body a signed request may have (the Invoke limit plus headroom).
const MAX_SIGNED_BODY_BYTES: usize = 70 * 1024 * 1024;
/// How far a request's `X-Amz-Date` may be from now.
const MAX_SKEW_SECS: i64 = 15 * 60;

/// Access key id → secret.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    keys: Arc<HashMap<String, String>>,
}

impl Credentials {
    /// Credentials from `ACCESS_KEY_ID:SECRET` pairs.
    ///
    /// # Errors
    /// A pair without `:`.
    pub fn parse(pairs: &[String]) -> Result<Self, String> {
        let mut keys = HashMap::new();
        for p in pairs {
            let (id, secret) = p
                .split_once(':')
                .ok_or_else(|| format!("access key {p:?} must be ACCESS_KEY_ID:SECRET"))?;
            keys.insert(id.to_owned(), secret.to_owned());
        }
        Ok(Self {
            keys: Arc::new(keys),
        })
    }

    /// Whether verification is on.
    #[must_use]
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }
}

fn forbidden(message: impl Into<String>) -> Response {
    ApiError {
        status: StatusCode::FORBIDDEN,
        kind: "InvalidSignatureException",
        message: message.into(),
    }
    .into_response()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// RFC 3986 encoding as SigV4 wants it (unreserved characters kept).
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    crate::names::percent_decode(s, true)
}

/// The parts of a SigV4 request that the signature covers.
pub struct SignedRequest<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path as sent (percent-encoded).
    pub path: &'a str,
    /// Query string as sent, without `?`.
    pub query: &'a str,
    /// Header name (any case) and value.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: &'a [u8],
}

/// The canonical request (services other than S3 encode each path segment twice).
#[must_use]
pub fn canonical_request(req: &SignedRequest<'_>, signed_headers: &[&str]) -> String {
    let path = if req.path.is_empty() { "/" } else { req.path };
    let canonical_uri: String = path
        .split('/')
        .map(|seg| uri_encode(seg, false))
        .collect::<Vec<_>>()
        .join("/");
    let mut query: Vec<(String, String)> = req
        .query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    query.sort();
    let canonical_query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut canonical_headers = String::new();
    for name in signed_headers {
        let values: Vec<String> = req
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    // The body's own hash, never a client's claim about it: a signed request replayed with
    // another body must not verify. `verify` refuses a mismatching `x-amz-content-sha256`.
    let payload_hash = hex(&Sha256::digest(req.body));
    format!(
        "{}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{}\n{payload_hash}",
        req.method,
        signed_headers.join(";")
    )
}

/// The keyed MAC over the string to sign of `canonical` for `secret`, date (`YYYYMMDD`), time
/// (`X-Amz-Date`), region and service: finalized it is the signature.
fn signing_mac(
    secret: &str,
    amz_date: &str,
    region: &str,
    service: &str,
    canonical: &str,
) -> Hmac<Sha256> {
    let date = &amz_date[..amz_date.len().min(8)];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&k_signing).expect("HMAC takes keys of any length");
    mac.update(to_sign.as_bytes());
    mac
}

/// The signature of `canonical` for `secret`, date (`YYYYMMDD`), time (`X-Amz-Date`), region and
/// service.
#[must_use]
pub fn signature(
    secret: &str,
    amz_date: &str,
    region: &str,
    service: &str,
    canonical: &str,
) -> String {
    hex(&signing_mac(secret, amz_date, region, service, canonical)
        .finalize()
        .into_bytes())
}

/// Whether `given` (hex) is the signature of `canonical`, compared in constant time.
fn signature_matches(
    secret: &str,
    amz_date: &str,
    region: &str,
    service: &str,
    canonical: &str,
    given: &str,
) -> bool {
    let Some(given) = unhex(given) else {
        return false;
    };
    signing_mac(secret, amz_date, region, service, canonical)
        .verify_slice(&given)
        .is_ok()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `20150830T123600Z` → Unix seconds.
fn amz_date_secs(d: &str) -> Option<i64> {
    if d.len() != 16 || &d[8..9] != "T" || !d.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| d.get(r)?.parse::<i64>().ok();
    let (y, m, day, hh, mm, ss) = (
        n(0..4)?,
        n(4..6)?,
        n(6..8)?,
        n(9..11)?,
        n(11..13)?,
        n(13..15)?,
    );
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Verifies the request's signature when keys are configured; 403 `InvalidSignatureException` /
/// `UnrecognizedClientException` otherwise.
pub async fn verify(State(creds): State<Credentials>, req: Request, next: Next) -> Response {
    if !creds.enabled() {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let Some(auth) = header("authorization") else {
        return forbidden(
            "Missing Authentication Token: requests must be signed with AWS Signature Version 4",
        );
    };
    let Some(rest) = auth.strip_prefix("AWS4-HMAC-SHA256 ") else {
        return forbidden("only AWS4-HMAC-SHA256 signatures are accepted");
    };
    let fields: HashMap<&str, &str> = rest
        .split(',')
        .filter_map(|f| f.trim().split_once('='))
        .collect();
    let (Some(credential), Some(signed), Some(given)) = (
        fields.get("Credential"),
        fields.get("SignedHeaders"),
        fields.get("Signature"),
    ) else {
        return forbidden("the Authorization header lacks Credential, SignedHeaders or Signature");
    };
    let scope: Vec<&str> = credential.split('/').collect();
    if scope.len() != 5 {
        return forbidden("malformed Credential scope");
    }
    let Some(secret) = creds.keys.get(scope[0]) else {
        return ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "UnrecognizedClientException",
            message: "The security token included in the request is invalid.".into(),
        }
        .into_response();
    };
    let Some(amz_date) = header("x-amz-date") else {
        return forbidden("missing X-Amz-Date");
    };
    let Some(when) = amz_date_secs(&amz_date) else {
        return forbidden("malformed X-Amz-Date");
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    if (now - when).abs() > MAX_SKEW_SECS {
        return forbidden(
            "Signature expired: the request time is more than 15 minutes from the server's",
        );
    }
    let bytes = match to_bytes(body, MAX_SIGNED_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => return forbidden("request body too large to verify"),
    };
    if let Some(claimed) = header("x-amz-content-sha256") {
        if claimed == "UNSIGNED-PAYLOAD" {
            return forbidden(
                "x-amz-content-sha256 is UNSIGNED-PAYLOAD: Lambda's API signs the payload; \
                 send the body's SHA-256 (hex) or leave the header out",
            );
        }
        if !claimed.eq_ignore_ascii_case(&hex(&Sha256::digest(&bytes))) {
            return forbidden(
                "The provided x-amz-content-sha256 header does not match what was computed: \
                 the body is not the one that was signed",
            );
        }
    }
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let signed_headers: Vec<&str> = signed.split(';').collect();
    let canonical = canonical_request(
        &SignedRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers,
            body: &bytes,
        },
        &signed_headers,
    );
    if !signature_matches(secret, &amz_date, scope[2], scope[3], &canonical, given) {
        return forbidden(
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.",
        );
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of AWS's SigV4 documentation (IAM ListUsers).
    #[test]
    fn matches_the_documented_example() {
        let req = SignedRequest {
            method: "GET",
            path: "/",
            query: "Action=ListUsers&Version=2010-05-08",
            headers: vec![
                (
                    "Content-Type".into(),
                    "application/x-www-form-urlencoded; charset=utf-8".into(),
                ),
                ("Host".into(), "iam.amazonaws.com".into()),
                ("X-Amz-Date".into(), "20150830T123600Z".into()),
            ],
            body: b"",
        };
        let canonical = canonical_request(&req, &["content-type", "host", "x-amz-date"]);
        assert_eq!(
            hex(&Sha256::digest(canonical.as_bytes())),
            "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
        );
        let sig = signature(
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20150830T123600Z",
            "us-east-1",
            "iam",
            &canonical,
        );
        assert_eq!(
            sig,
            "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    #[test]
    fn a_signature_is_checked_whole_and_hex_decoded() {
        let canonical = "GET\n/\n\nhost:x\n\nhost\ne3b0";
        let sig = signature("k", "20150830T123600Z", "us-east-1", "lambda", canonical);
        let ok = |given: &str| {
            signature_matches(
                "k",
                "20150830T123600Z",
                "us-east-1",
                "lambda",
                canonical,
                given,
            )
        };
        assert!(ok(&sig));
        assert!(ok(&sig.to_uppercase()), "hex case does not matter");
        assert!(!ok(&sig[..62]), "a prefix is not the signature");
        let mut flipped = sig.clone().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        assert!(!ok(&String::from_utf8_lossy(&flipped)));
        assert!(!ok("zz"), "not hex");
        assert!(!ok(""));
    }

    #[test]
    fn the_canonical_request_hashes_the_body_whatever_a_header_claims() {
        let mut req = SignedRequest {
            method: "POST",
            path: "/",
            query: "",
            headers: vec![("Host".into(), "x".into())],
            body: b"new body",
        };
        let plain = canonical_request(&req, &["host"]);
        req.headers.push((
            "x-amz-content-sha256".into(),
            hex(&Sha256::digest(b"original body")),
        ));
        assert_eq!(canonical_request(&req, &["host"]), plain);
        assert!(plain.ends_with(&hex(&Sha256::digest(b"new body"))));
    }

    #[test]
    fn amz_dates_parse() {
        assert_eq!(amz_date_secs("19700101T000000Z"), Some(0));
        assert_eq!(amz_date_secs("20150830T123600Z"), Some(1_440_938_160));
        assert_eq!(amz_date_secs("2015-08-30"), None);
    }
}
