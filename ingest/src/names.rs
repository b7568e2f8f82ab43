//! Function names as Lambda takes them: every operation that names a function in its path (or in
//! a `FunctionName` field) accepts the name, a partial ARN or a full ARN. A middleware turns the
//! path's ARN into the bare name before routing (after the signature was checked on the path as
//! sent), so each handler sees one spelling.

use axum::extract::{Request, State};
use axum::http::Uri;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sluice_core::model::FunctionRef;

use crate::{AccountSettings, ApiError, ApiState};

/// The function `reference` names on this node's account and region, or Lambda's error.
///
/// # Errors
/// 400 for a malformed reference; 404 for another account or region, or a qualifier other than
/// `$LATEST` (Sluice has no versions or aliases yet).
pub(crate) fn function_name(
    account: &AccountSettings,
    reference: &str,
) -> Result<String, ApiError> {
    let r = FunctionRef::parse(reference).map_err(ApiError::invalid)?;
    let elsewhere = r
        .account
        .as_deref()
        .is_some_and(|a| a != account.account_id)
        || r.region.as_deref().is_some_and(|g| g != account.region);
    if elsewhere {
        return Err(ApiError::not_found(format!(
            "Function not found: {reference} (this endpoint serves account {} in {})",
            account.account_id, account.region
        )));
    }
    match r.qualifier.as_deref() {
        None | Some("$LATEST") => Ok(r.name),
        Some(q) => Err(ApiError::not_found(format!(
            "Function not found: {}:{q} (Sluice has only $LATEST; versions and aliases are not \
             supported yet)",
            account.function_arn(&r.name)
        ))),
    }
}

/// Rewrites `/<api date>/functions/<reference>/…` to carry the bare function name.
pub(crate) async fn bare_names(
    State(state): State<ApiState>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').collect();
    // ["", "2015-03-31", "functions", "<reference>", ...]
    let Some(raw) = segments
        .get(3)
        .filter(|_| segments.get(2) == Some(&"functions"))
    else {
        return next.run(req).await;
    };
    let decoded = percent_decode(raw, false);
    if !decoded.contains(':') {
        return next.run(req).await;
    }
    let name = match function_name(&state.account, &decoded) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let mut rebuilt: Vec<&str> = segments.clone();
    rebuilt[3] = &name;
    let mut uri = rebuilt.join("/");
    if let Some(q) = req.uri().query() {
        uri.push('?');
        uri.push_str(q);
    }
    match uri.parse::<Uri>() {
        Ok(u) => *req.uri_mut() = u,
        Err(_) => return ApiError::invalid(format!("bad function name in {path}")).into_response(),
    }
    next.run(req).await
}

/// `%3A` → `:` and the like (a path segment as clients send an ARN in it); with
/// `plus_is_space`, `+` is a space (a query string's encoding).
pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if plus_is_space && bytes[i] == b'+' {
            b' '
        } else {
            bytes[i]
        });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns_of_this_account_name_the_function_and_others_are_not_found() {
        let a = AccountSettings::default();
        let arn = a.function_arn("f");
        assert_eq!(function_name(&a, &arn).expect("arn"), "f");
        assert_eq!(
            function_name(&a, &format!("{arn}:$LATEST")).expect("latest"),
            "f"
        );
        assert_eq!(
            function_name(&a, "000000000000:function:f").expect("partial"),
            "f"
        );
        assert_eq!(function_name(&a, "f").expect("name"), "f");
        let other = function_name(&a, "arn:aws:lambda:eu-west-1:000000000000:function:f")
            .expect_err("region");
        assert_eq!(other.status, axum::http::StatusCode::NOT_FOUND);
        let v = function_name(&a, &format!("{arn}:3")).expect_err("version");
        assert!(v.message.contains("only $LATEST"), "{}", v.message);
        assert_eq!(
            function_name(&a, "a:b:c").expect_err("bad").status,
            axum::http::StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn percent_decoding_keeps_what_is_not_an_escape() {
        assert_eq!(
            percent_decode("arn%3Aaws%3alambda", false),
            "arn:aws:lambda"
        );
        assert_eq!(percent_decode("a%2", false), "a%2");
        assert_eq!(percent_decode("%", false), "%");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_decode("a+b", true), "a b");
    }
}
