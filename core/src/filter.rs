//! Event filtering for Kafka event source mappings: Lambda's `FilterCriteria`.
//!
//! [`FilterSet`] is the compiled form of `FilterCriteria.Filters[].Pattern`; a poller asks it
//! whether each record goes to the function. Lambda drops records that no filter matches but still
//! commits their offsets along with the batch's, so the poller must treat them as done.
//!
//! Matching follows Lambda's subset of EventBridge patterns:
//!
//! - A pattern is a JSON object whose top-level fields are `key` and/or `value`, one per part of
//!   the record. Both parts are decoded as UTF-8 (invalid sequences become U+FFFD, as a JVM does)
//!   and parsed as JSON; a part that is not JSON is matched as a plain string.
//! - Under `key`/`value`, an object matches the JSON document field by field (ANDed), and an array
//!   of conditions matches the part itself (`{"value": [{"prefix": "abc"}]}` for a plain-string
//!   value). As Lambda drops records whose format differs from the pattern's, an object pattern
//!   never matches a part that is not a JSON object (or an array holding objects), and a condition
//!   list never matches a part that is a JSON object.
//! - A leaf is an array of conditions, ORed: literals (string, number, `true`/`false`, `null`),
//!   `prefix`, `suffix`, `equals-ignore-case`, `anything-but` (a value, a list, or
//!   `{"prefix"|"suffix": ..}`), `numeric` (one or two comparisons) and `exists`.
//! - Strings match exactly, with no case folding; a number literal matches a JSON number with the
//!   same canonical text, so `300` does not match `300.0`, and numbers never match strings.
//! - Conditions apply to leaf values (not objects). When the event field is an array, a condition
//!   matches when any element does; a field that is missing, an object, or an array holding no
//!   leaf fails every condition except `{"exists": false}`. An object pattern applied to an array
//!   of objects matches when one element matches all of its fields.
//! - A record passes when any filter matches; an empty set passes everything.
//!
//! Threading: compiled once per mapping; matching is pure, allocation-light and `Send + Sync`.

use serde_json::{Map, Number, Value};

/// A filter pattern that Lambda would reject when the mapping is created or updated.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The pattern string is not JSON.
    #[error("FilterCriteria.Filters[{index}].Pattern is not valid JSON: {source}")]
    ParsePattern {
        /// Position of the filter in `FilterCriteria.Filters`.
        index: usize,
        /// What the JSON parser found.
        #[source]
        source: serde_json::Error,
    },
    /// The pattern is JSON but not a valid filter pattern.
    #[error("FilterCriteria.Filters[{index}].Pattern at {path}: {reason}")]
    InvalidPattern {
        /// Position of the filter in `FilterCriteria.Filters`.
        index: usize,
        /// Where in the pattern the problem is, as a JSON path (`$.value.price[0].numeric`).
        path: String,
        /// What is wrong there.
        reason: String,
    },
}

impl FilterError {
    /// Position of the offending filter in `FilterCriteria.Filters`.
    #[must_use]
    pub fn index(&self) -> usize {
        match self {
            Self::ParsePattern { index, .. } | Self::InvalidPattern { index, .. } => *index,
        }
    }
}

/// A compiled set of filters, ORed. An empty set lets every record through.
#[derive(Debug, Default, Clone)]
pub struct FilterSet {
    filters: Vec<Filter>,
    /// Whether any filter looks at the record key (so the key is parsed only when needed).
    uses_key: bool,
    /// Whether any filter looks at the record value.
    uses_value: bool,
}

impl FilterSet {
    /// Compiles patterns, each a JSON string as in `FilterCriteria.Filters[].Pattern`.
    ///
    /// # Errors
    ///
    /// [`FilterError::ParsePattern`] when a pattern is not JSON, and
    /// [`FilterError::InvalidPattern`] when it breaks the pattern grammar: not an object, a
    /// top-level field other than `key`/`value`, a leaf that is not a non-empty array, an unknown
    /// operator, or a malformed operand (for example a `numeric` array that is not one or two
    /// comparisons). Both name the filter's index.
    pub fn compile(patterns: &[String]) -> Result<FilterSet, FilterError> {
        let filters = patterns
            .iter()
            .enumerate()
            .map(|(index, pattern)| Filter::compile(index, pattern))
            .collect::<Result<Vec<_>, _>>()?;
        let uses_key = filters.iter().any(|f| f.key.is_some());
        let uses_value = filters.iter().any(|f| f.value.is_some());
        Ok(FilterSet {
            filters,
            uses_key,
            uses_value,
        })
    }

    /// Whether a Kafka record passes: `key` and `value` are the raw record bytes (`None` when the
    /// record has no key, or is a tombstone).
    #[must_use]
    pub fn matches(&self, key: Option<&[u8]>, value: Option<&[u8]>) -> bool {
        if self.filters.is_empty() {
            return true;
        }
        let key = key.filter(|_| self.uses_key).map(decode);
        let value = value.filter(|_| self.uses_value).map(decode);
        self.filters
            .iter()
            .any(|filter| filter.matches(key.as_ref(), value.as_ref()))
    }

    /// Whether the set has no filters (every record passes).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }
}

/// Decodes one part of a record the way Lambda does: UTF-8 text, parsed as JSON when it is JSON,
/// otherwise kept as a plain string.
fn decode(bytes: &[u8]) -> Value {
    let text = String::from_utf8_lossy(bytes);
    serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned()))
}

/// One compiled pattern: the conditions on each part of the record, ANDed.
#[derive(Debug, Clone)]
struct Filter {
    key: Option<Node>,
    value: Option<Node>,
}

impl Filter {
    fn compile(index: usize, pattern: &str) -> Result<Filter, FilterError> {
        let root: Value = serde_json::from_str(pattern)
            .map_err(|source| FilterError::ParsePattern { index, source })?;
        let cx = Compiler { index };
        let Value::Object(top) = root else {
            return Err(cx.invalid(
                "$",
                format!("a pattern must be a JSON object, got {}", kind(&root)),
            ));
        };
        if top.is_empty() {
            return Err(cx.invalid("$", "a pattern must filter on `key` and/or `value`"));
        }
        let mut filter = Filter {
            key: None,
            value: None,
        };
        for (name, sub) in &top {
            let slot = match name.as_str() {
                "key" => &mut filter.key,
                "value" => &mut filter.value,
                other => {
                    return Err(cx.invalid(
                        "$",
                        format!(
                        "unknown field `{other}`: Kafka patterns filter on `key` and `value` only"
                    ),
                    ))
                }
            };
            *slot = Some(cx.node(&format!("$.{name}"), sub)?);
        }
        Ok(filter)
    }

    fn matches(&self, key: Option<&Value>, value: Option<&Value>) -> bool {
        self.key.as_ref().is_none_or(|node| node.matches_part(key))
            && self
                .value
                .as_ref()
                .is_none_or(|node| node.matches_part(value))
    }
}

/// A compiled pattern node.
#[derive(Debug, Clone)]
enum Node {
    /// An object: every named field must match.
    Fields(Vec<(String, Node)>),
    /// An array of conditions: one must match.
    Leaf(Vec<Condition>),
}

impl Node {
    /// Matches a whole record part, applying Lambda's format rule before the pattern.
    fn matches_part(&self, part: Option<&Value>) -> bool {
        match self {
            Node::Fields(_) => part.is_some_and(holds_object) && self.matches(part),
            Node::Leaf(_) => !matches!(part, Some(Value::Object(_))) && self.matches(part),
        }
    }

    /// Matches the event value at this node's position (`None` when the field is missing).
    fn matches(&self, event: Option<&Value>) -> bool {
        match self {
            Node::Fields(fields) => match event {
                Some(Value::Object(map)) => Self::fields_match(fields, map),
                Some(Value::Array(items)) => {
                    let mut saw_object = false;
                    let hit = any_object(items, &mut |map| {
                        saw_object = true;
                        Self::fields_match(fields, map)
                    });
                    // An array with no objects in it has none of the fields.
                    hit || (!saw_object && Self::fields_missing_match(fields))
                }
                _ => Self::fields_missing_match(fields),
            },
            Node::Leaf(conditions) => conditions.iter().any(|c| c.matches_field(event)),
        }
    }

    fn fields_match(fields: &[(String, Node)], map: &Map<String, Value>) -> bool {
        fields
            .iter()
            .all(|(name, node)| node.matches(map.get(name)))
    }

    /// Whether the fields match an event that has none of them (only `exists: false` can).
    fn fields_missing_match(fields: &[(String, Node)]) -> bool {
        fields.iter().all(|(_, node)| node.matches(None))
    }
}

/// One condition in a leaf array.
#[derive(Debug, Clone)]
enum Condition {
    Literal(Literal),
    Prefix(String),
    Suffix(String),
    EqualsIgnoreCase(String),
    AnythingBut(Exclusion),
    Numeric(NumericRange),
    Exists(bool),
}

impl Condition {
    /// Matches the event value of a field (`None` when missing) against this condition.
    fn matches_field(&self, event: Option<&Value>) -> bool {
        match self {
            Condition::Exists(want) => event.is_some_and(|v| any_leaf(v, &mut |_| true)) == *want,
            _ => event.is_some_and(|v| any_leaf(v, &mut |leaf| self.matches_leaf(leaf))),
        }
    }

    /// Matches one leaf value (never an object or an array).
    fn matches_leaf(&self, leaf: &Value) -> bool {
        match self {
            Condition::Literal(literal) => literal.matches(leaf),
            Condition::Prefix(prefix) => leaf
                .as_str()
                .is_some_and(|s| s.starts_with(prefix.as_str())),
            Condition::Suffix(suffix) => {
                leaf.as_str().is_some_and(|s| s.ends_with(suffix.as_str()))
            }
            Condition::EqualsIgnoreCase(expected) => {
                leaf.as_str().is_some_and(|s| eq_ignore_case(s, expected))
            }
            Condition::AnythingBut(exclusion) => !exclusion.excludes(leaf),
            Condition::Numeric(range) => leaf.as_f64().is_some_and(|x| range.contains(x)),
            Condition::Exists(want) => *want,
        }
    }
}

/// A literal to compare with a leaf value.
#[derive(Debug, Clone)]
enum Literal {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
}

impl Literal {
    fn matches(&self, leaf: &Value) -> bool {
        match (self, leaf) {
            (Literal::Null, Value::Null) => true,
            (Literal::Bool(a), Value::Bool(b)) => a == b,
            (Literal::String(a), Value::String(b)) => a == b,
            (Literal::Number(a), Value::Number(b)) => same_number_text(a, b),
            _ => false,
        }
    }
}

/// Whether two JSON numbers have the same canonical text: Lambda compares numbers as strings,
/// so `300` and `300.0` differ. `Number`'s equality already tells integers from floats; only the
/// sign of zero (`0.0` and `-0.0` compare equal as floats) needs a second look.
fn same_number_text(a: &Number, b: &Number) -> bool {
    a == b && a.as_f64().map(f64::is_sign_negative) == b.as_f64().map(f64::is_sign_negative)
}

/// What `anything-but` excludes.
#[derive(Debug, Clone)]
enum Exclusion {
    Literals(Vec<Literal>),
    Prefix(String),
    Suffix(String),
}

impl Exclusion {
    fn excludes(&self, leaf: &Value) -> bool {
        match self {
            Exclusion::Literals(literals) => literals.iter().any(|l| l.matches(leaf)),
            Exclusion::Prefix(prefix) => leaf
                .as_str()
                .is_some_and(|s| s.starts_with(prefix.as_str())),
            Exclusion::Suffix(suffix) => {
                leaf.as_str().is_some_and(|s| s.ends_with(suffix.as_str()))
            }
        }
    }
}

/// One end of a numeric range.
#[derive(Debug, Clone, Copy)]
struct Bound {
    value: f64,
    inclusive: bool,
}

/// A `numeric` condition: `=` is a range whose ends are both the value, inclusive.
#[derive(Debug, Clone, Copy)]
struct NumericRange {
    lower: Option<Bound>,
    upper: Option<Bound>,
}

impl NumericRange {
    fn contains(&self, x: f64) -> bool {
        self.lower.is_none_or(|b| {
            if b.inclusive {
                x >= b.value
            } else {
                x > b.value
            }
        }) && self.upper.is_none_or(|b| {
            if b.inclusive {
                x <= b.value
            } else {
                x < b.value
            }
        })
    }
}

/// Calls `f` on each leaf of `value` (itself, or the leaves in a possibly nested array) until it
/// returns true. Objects are not leaves.
fn any_leaf(value: &Value, f: &mut impl FnMut(&Value) -> bool) -> bool {
    match value {
        Value::Array(items) => items.iter().any(|item| any_leaf(item, f)),
        Value::Object(_) => false,
        leaf => f(leaf),
    }
}

/// Calls `f` on each object in a possibly nested array until it returns true.
fn any_object(items: &[Value], f: &mut impl FnMut(&Map<String, Value>) -> bool) -> bool {
    items.iter().any(|item| match item {
        Value::Object(map) => f(map),
        Value::Array(inner) => any_object(inner, f),
        _ => false,
    })
}

/// Whether a record part is a JSON object, or an array holding one.
fn holds_object(value: &Value) -> bool {
    match value {
        Value::Object(_) => true,
        Value::Array(items) => items.iter().any(holds_object),
        _ => false,
    }
}

/// Case-insensitive equality without allocating.
fn eq_ignore_case(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_lowercase)
        .eq(b.chars().flat_map(char::to_lowercase))
}

/// The name of a JSON value's type, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Compiles one pattern, remembering which filter it is for error messages.
struct Compiler {
    index: usize,
}

impl Compiler {
    fn invalid(&self, path: &str, reason: impl Into<String>) -> FilterError {
        FilterError::InvalidPattern {
            index: self.index,
            path: path.to_owned(),
            reason: reason.into(),
        }
    }

    fn node(&self, path: &str, value: &Value) -> Result<Node, FilterError> {
        match value {
            Value::Object(fields) => {
                if fields.is_empty() {
                    return Err(
                        self.invalid(path, "an object in a pattern must name at least one field")
                    );
                }
                fields
                    .iter()
                    .map(|(name, sub)| {
                        Ok((name.clone(), self.node(&format!("{path}.{name}"), sub)?))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Node::Fields)
            }
            Value::Array(conditions) => {
                if conditions.is_empty() {
                    return Err(self.invalid(path, "an empty condition array matches nothing"));
                }
                conditions
                    .iter()
                    .enumerate()
                    .map(|(i, c)| self.condition(&format!("{path}[{i}]"), c))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Node::Leaf)
            }
            other => Err(self.invalid(
                path,
                format!(
                    "a pattern field must be an array of conditions or an object of fields, got {}",
                    kind(other)
                ),
            )),
        }
    }

    fn condition(&self, path: &str, value: &Value) -> Result<Condition, FilterError> {
        match value {
            Value::Null => Ok(Condition::Literal(Literal::Null)),
            Value::Bool(b) => Ok(Condition::Literal(Literal::Bool(*b))),
            Value::Number(n) => Ok(Condition::Literal(Literal::Number(n.clone()))),
            Value::String(s) => Ok(Condition::Literal(Literal::String(s.clone()))),
            Value::Array(_) => Err(self.invalid(path, "a condition cannot be an array")),
            Value::Object(operator) => self.operator(path, operator),
        }
    }

    fn operator(
        &self,
        path: &str,
        operator: &Map<String, Value>,
    ) -> Result<Condition, FilterError> {
        let mut entries = operator.iter();
        let (Some((name, operand)), None) = (entries.next(), entries.next()) else {
            return Err(self.invalid(
                path,
                format!(
                    "a condition object must hold exactly one operator, got {}",
                    operator.len()
                ),
            ));
        };
        let path = format!("{path}.{name}");
        match name.as_str() {
            "prefix" => Ok(Condition::Prefix(self.string(&path, name, operand)?)),
            "suffix" => Ok(Condition::Suffix(self.string(&path, name, operand)?)),
            "equals-ignore-case" => Ok(Condition::EqualsIgnoreCase(
                self.string(&path, name, operand)?,
            )),
            "anything-but" => Ok(Condition::AnythingBut(self.exclusion(&path, operand)?)),
            "numeric" => Ok(Condition::Numeric(self.numeric(&path, operand)?)),
            "exists" => match operand {
                Value::Bool(b) => Ok(Condition::Exists(*b)),
                other => Err(self.invalid(
                    &path,
                    format!("`exists` takes true or false, got {}", kind(other)),
                )),
            },
            other => Err(self.invalid(
                &path,
                format!(
                    "unknown operator `{other}` (supported: prefix, suffix, equals-ignore-case, \
                     anything-but, numeric, exists)"
                ),
            )),
        }
    }

    fn string(&self, path: &str, operator: &str, operand: &Value) -> Result<String, FilterError> {
        match operand {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.invalid(
                path,
                format!("`{operator}` takes a string, got {}", kind(other)),
            )),
        }
    }

    fn exclusion(&self, path: &str, operand: &Value) -> Result<Exclusion, FilterError> {
        let literal = |path: &str, value: &Value| match value {
            Value::String(s) => Ok(Literal::String(s.clone())),
            Value::Number(n) => Ok(Literal::Number(n.clone())),
            other => Err(self.invalid(
                path,
                format!(
                    "`anything-but` excludes strings or numbers, got {}",
                    kind(other)
                ),
            )),
        };
        match operand {
            Value::Array(values) => {
                if values.is_empty() {
                    return Err(self.invalid(path, "`anything-but` needs at least one value"));
                }
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| literal(&format!("{path}[{i}]"), v))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Exclusion::Literals)
            }
            Value::Object(inner) => {
                let mut entries = inner.iter();
                match (entries.next(), entries.next()) {
                    (Some((name, sub)), None) if name == "prefix" => Ok(Exclusion::Prefix(
                        self.string(&format!("{path}.prefix"), name, sub)?,
                    )),
                    (Some((name, sub)), None) if name == "suffix" => Ok(Exclusion::Suffix(
                        self.string(&format!("{path}.suffix"), name, sub)?,
                    )),
                    _ => Err(self.invalid(
                        path,
                        "`anything-but` takes a value, a list of values, or one of \
                         {\"prefix\": ..} and {\"suffix\": ..}",
                    )),
                }
            }
            single => literal(path, single).map(|l| Exclusion::Literals(vec![l])),
        }
    }

    fn numeric(&self, path: &str, operand: &Value) -> Result<NumericRange, FilterError> {
        let Value::Array(items) = operand else {
            return Err(self.invalid(
                path,
                format!(
                    "`numeric` takes an array such as [\">\", 0, \"<=\", 5], got {}",
                    kind(operand)
                ),
            ));
        };
        if items.len() != 2 && items.len() != 4 {
            return Err(self.invalid(
                path,
                format!(
                    "`numeric` takes one or two comparisons (2 or 4 elements), got {} elements",
                    items.len()
                ),
            ));
        }
        let mut range = NumericRange {
            lower: None,
            upper: None,
        };
        for (i, pair) in items.chunks_exact(2).enumerate() {
            let [op, number] = pair else {
                continue; // chunks_exact(2) yields pairs only.
            };
            let op_path = format!("{path}[{}]", 2 * i);
            let Value::String(op) = op else {
                return Err(self.invalid(
                    &op_path,
                    format!("expected a comparison (=, <, <=, >, >=), got {}", kind(op)),
                ));
            };
            let num_path = format!("{path}[{}]", 2 * i + 1);
            let Some(value) = number.as_number().and_then(Number::as_f64) else {
                return Err(self.invalid(
                    &num_path,
                    format!("expected a number after `{op}`, got {}", kind(number)),
                ));
            };
            match op.as_str() {
                "=" if items.len() == 4 => {
                    return Err(
                        self.invalid(&op_path, "`=` cannot be combined with another comparison")
                    )
                }
                "=" => {
                    let bound = Bound {
                        value,
                        inclusive: true,
                    };
                    range.lower = Some(bound);
                    range.upper = Some(bound);
                }
                ">" | ">=" => {
                    if range.lower.is_some() {
                        return Err(
                            self.invalid(&op_path, "two lower bounds (> or >=) in one range")
                        );
                    }
                    range.lower = Some(Bound {
                        value,
                        inclusive: op == ">=",
                    });
                }
                "<" | "<=" => {
                    if range.upper.is_some() {
                        return Err(
                            self.invalid(&op_path, "two upper bounds (< or <=) in one range")
                        );
                    }
                    range.upper = Some(Bound {
                        value,
                        inclusive: op == "<=",
                    });
                }
                other => {
                    return Err(self.invalid(
                        &op_path,
                        format!("unknown comparison `{other}` (supported: =, <, <=, >, >=)"),
                    ))
                }
            }
        }
        if let (Some(lo), Some(hi)) = (range.lower, range.upper) {
            if lo.value > hi.value || (lo.value == hi.value && !(lo.inclusive && hi.inclusive)) {
                return Err(self.invalid(path, "the range is empty: no number can match it"));
            }
        }
        Ok(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(patterns: &[&str]) -> Result<FilterSet, FilterError> {
        FilterSet::compile(&patterns.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>())
    }

    fn set(patterns: &[&str]) -> FilterSet {
        compile(patterns).expect("patterns are valid")
    }

    /// Checks, for each `(value, passes)`, whether a keyless record with that value passes.
    #[track_caller]
    fn check(pattern: &str, cases: &[(&str, bool)]) {
        let filters = set(&[pattern]);
        for (value, expected) in cases {
            let got = filters.matches(None, Some(value.as_bytes()));
            assert_eq!(got, *expected, "pattern {pattern} on value {value}");
        }
    }

    /// The (index, path, reason) of a compile error that must be `InvalidPattern`.
    #[track_caller]
    fn invalid(patterns: &[&str]) -> (usize, String, String) {
        match compile(patterns) {
            Err(FilterError::InvalidPattern {
                index,
                path,
                reason,
            }) => (index, path, reason),
            other => panic!("expected InvalidPattern for {patterns:?}, got {other:?}"),
        }
    }

    #[test]
    fn empty_set_passes_every_record() {
        let filters = set(&[]);
        assert!(filters.is_empty());
        assert!(FilterSet::default().is_empty());
        assert!(filters.matches(None, None));
        assert!(filters.matches(Some(b"k"), Some(b"not json")));
        assert!(filters.matches(None, Some(br#"{"a":1}"#)));
        assert!(!set(&[r#"{"value":{"a":[1]}}"#]).is_empty());
    }

    #[test]
    fn string_literal_matches_exactly_without_case_folding() {
        check(
            r#"{"value":{"device_ID":["AB1234"]}}"#,
            &[
                (r#"{"device_ID":"AB1234"}"#, true),
                (r#"{"device_ID":"ab1234"}"#, false),
                (r#"{"device_ID":"AB12345"}"#, false),
                (r#"{"other":"AB1234"}"#, false),
            ],
        );
    }

    #[test]
    fn values_in_a_leaf_are_ored_and_fields_are_anded() {
        check(
            r#"{"value":{"PaymentType":["Credit","Debit"]}}"#,
            &[
                (r#"{"PaymentType":"Credit"}"#, true),
                (r#"{"PaymentType":"Debit"}"#, true),
                (r#"{"PaymentType":"Cash"}"#, false),
            ],
        );
        check(
            r#"{"value":{"Location":["New York"],"Day":["Monday"]}}"#,
            &[
                (r#"{"Location":"New York","Day":"Monday","x":1}"#, true),
                (r#"{"Location":"New York","Day":"Tuesday"}"#, false),
                (r#"{"Location":"New York"}"#, false),
            ],
        );
    }

    #[test]
    fn nested_objects_match_field_by_field() {
        check(
            r#"{"value":{"id":[{"prefix":"AB"}],"session":{"duration":[{"numeric":[">",100]}]}}}"#,
            &[
                (
                    r#"{"id":"AB1234","session":{"start":"t","duration":162}}"#,
                    true,
                ),
                (r#"{"id":"AB1234","session":{"duration":99}}"#, false),
                (r#"{"id":"CD1234","session":{"duration":162}}"#, false),
                (r#"{"id":"AB1234","session":162}"#, false),
                (r#"{"id":"AB1234"}"#, false),
            ],
        );
        check(
            r#"{"value":{"a":{"b":{"c":{"d":["x"]}}}}}"#,
            &[
                (r#"{"a":{"b":{"c":{"d":"x"}}}}"#, true),
                (r#"{"a":{"b":{"c":{"d":"y"}}}}"#, false),
            ],
        );
    }

    #[test]
    fn number_literal_matches_the_same_canonical_text_only() {
        check(
            r#"{"value":{"n":[300]}}"#,
            &[
                (r#"{"n":300}"#, true),
                (r#"{"n":300.0}"#, false),
                (r#"{"n":3.0e2}"#, false),
                (r#"{"n":"300"}"#, false),
                (r#"{"n":301}"#, false),
            ],
        );
        check(
            r#"{"value":{"n":[1.5, -7]}}"#,
            &[
                (r#"{"n":1.5}"#, true),
                (r#"{"n":-7}"#, true),
                (r#"{"n":"1.5"}"#, false),
                (r#"{"n":7}"#, false),
            ],
        );
        check(r#"{"value":{"n":[0.0]}}"#, &[(r#"{"n":-0.0}"#, false)]);
        check(r#"{"value":{"n":["300"]}}"#, &[(r#"{"n":300}"#, false)]);
    }

    #[test]
    fn boolean_null_and_empty_string_literals() {
        check(
            r#"{"value":{"ok":[true]}}"#,
            &[
                (r#"{"ok":true}"#, true),
                (r#"{"ok":false}"#, false),
                (r#"{"ok":"true"}"#, false),
            ],
        );
        check(
            r#"{"value":{"UserID":[null]}}"#,
            &[
                (r#"{"UserID":null}"#, true),
                (r#"{}"#, false),
                (r#"{"UserID":"null"}"#, false),
                (r#"{"UserID":""}"#, false),
            ],
        );
        check(
            r#"{"value":{"LastName":[""]}}"#,
            &[
                (r#"{"LastName":""}"#, true),
                (r#"{"LastName":null}"#, false),
                (r#"{"LastName":" "}"#, false),
                (r#"{}"#, false),
            ],
        );
    }

    #[test]
    fn prefix_and_suffix_match_strings_only() {
        check(
            r#"{"value":{"Region":[{"prefix":"us-"}]}}"#,
            &[
                (r#"{"Region":"us-east-1"}"#, true),
                (r#"{"Region":"us-"}"#, true),
                (r#"{"Region":"eu-west-1"}"#, false),
                (r#"{"Region":"US-east-1"}"#, false),
            ],
        );
        check(
            r#"{"value":{"file":[{"suffix":".png"}]}}"#,
            &[
                (r#"{"file":"a/b.png"}"#, true),
                (r#"{"file":"a/b.png.gz"}"#, false),
            ],
        );
        check(
            r#"{"value":{"n":[{"prefix":"12"}]}}"#,
            &[(r#"{"n":123}"#, false)],
        );
    }

    #[test]
    fn equals_ignore_case_folds_case() {
        check(
            r#"{"value":{"name":[{"equals-ignore-case":"Alice"}]}}"#,
            &[
                (r#"{"name":"alice"}"#, true),
                (r#"{"name":"ALICE"}"#, true),
                (r#"{"name":"Alicia"}"#, false),
                (r#"{"name":1}"#, false),
            ],
        );
        check(
            r#"{"value":{"city":[{"equals-ignore-case":"ÉCOLE"}]}}"#,
            &[(r#"{"city":"école"}"#, true)],
        );
    }

    #[test]
    fn anything_but_excludes_values_and_needs_the_field() {
        check(
            r#"{"value":{"Weather":[{"anything-but":["Raining","Snowing"]}]}}"#,
            &[
                (r#"{"Weather":"Sunny"}"#, true),
                (r#"{"Weather":"raining"}"#, true),
                (r#"{"Weather":"Raining"}"#, false),
                (r#"{"Weather":"Snowing"}"#, false),
                (r#"{}"#, false),
            ],
        );
        check(
            r#"{"value":{"state":[{"anything-but":"initializing"}]}}"#,
            &[
                (r#"{"state":"running"}"#, true),
                (r#"{"state":"initializing"}"#, false),
            ],
        );
        check(
            r#"{"value":{"code":[{"anything-but":[404,500]}]}}"#,
            &[
                (r#"{"code":200}"#, true),
                (r#"{"code":404}"#, false),
                (r#"{"code":"404"}"#, true),
            ],
        );
        check(
            r#"{"value":{"state":[{"anything-but":{"prefix":"init"}}]}}"#,
            &[
                (r#"{"state":"running"}"#, true),
                (r#"{"state":"initializing"}"#, false),
                (r#"{}"#, false),
            ],
        );
        check(
            r#"{"value":{"file":[{"anything-but":{"suffix":".tmp"}}]}}"#,
            &[
                (r#"{"file":"a.txt"}"#, true),
                (r#"{"file":"a.tmp"}"#, false),
            ],
        );
    }

    #[test]
    fn numeric_equals_and_ranges() {
        check(
            r#"{"value":{"Price":[{"numeric":["=",100]}]}}"#,
            &[
                (r#"{"Price":100}"#, true),
                (r#"{"Price":100.0}"#, true), // numeric compares values, not text
                (r#"{"Price":100.5}"#, false),
                (r#"{"Price":"100"}"#, false),
            ],
        );
        check(
            r#"{"value":{"Price":[{"numeric":[">",10,"<=",20]}]}}"#,
            &[
                (r#"{"Price":10}"#, false),
                (r#"{"Price":10.01}"#, true),
                (r#"{"Price":20}"#, true),
                (r#"{"Price":20.5}"#, false),
                (r#"{"Price":"15"}"#, false),
                (r#"{}"#, false),
            ],
        );
        check(
            r#"{"value":{"t":[{"numeric":["<",0,">=",-5]}]}}"#,
            &[
                (r#"{"t":-5}"#, true),
                (r#"{"t":-0.5}"#, true),
                (r#"{"t":0}"#, false),
            ],
        );
        check(
            r#"{"value":{"t":[{"numeric":[">=",1e3]}]}}"#,
            &[(r#"{"t":1000}"#, true), (r#"{"t":999.9}"#, false)],
        );
        check(
            r#"{"value":{"t":[{"numeric":["<=",5,">=",5]}]}}"#,
            &[(r#"{"t":5}"#, true)],
        );
    }

    #[test]
    fn exists_checks_for_a_leaf() {
        check(
            r#"{"value":{"ProductName":[{"exists":true}]}}"#,
            &[
                (r#"{"ProductName":"x"}"#, true),
                (r#"{"ProductName":null}"#, true),
                (r#"{"ProductName":[1]}"#, true),
                (r#"{"Other":"x"}"#, false),
                // EventBridge: exists looks at leaves; an object or an empty array holds none.
                (r#"{"ProductName":{"a":1}}"#, false),
                (r#"{"ProductName":[]}"#, false),
            ],
        );
        check(
            r#"{"value":{"ProductName":[{"exists":false}]}}"#,
            &[
                (r#"{"Other":"x"}"#, true),
                (r#"{"ProductName":{"a":1}}"#, true),
                (r#"{"ProductName":[]}"#, true),
                (r#"{"ProductName":"x"}"#, false),
                (r#"{"ProductName":null}"#, false),
            ],
        );
        check(
            r#"{"value":{"a":{"b":[{"exists":false}]}}}"#,
            &[
                (r#"{"x":1}"#, true),
                (r#"{"a":{"c":1}}"#, true),
                (r#"{"a":5}"#, true),
                (r#"{"a":{"b":1}}"#, false),
            ],
        );
    }

    #[test]
    fn missing_field_fails_every_condition_but_exists_false() {
        for condition in [
            r#""x""#,
            "1",
            "true",
            "null",
            r#""""#,
            r#"{"prefix":"x"}"#,
            r#"{"suffix":"x"}"#,
            r#"{"equals-ignore-case":"x"}"#,
            r#"{"anything-but":["x"]}"#,
            r#"{"anything-but":{"prefix":"x"}}"#,
            r#"{"numeric":[">",0]}"#,
            r#"{"exists":true}"#,
        ] {
            check(
                &format!(r#"{{"value":{{"f":[{condition}]}}}}"#),
                &[(r#"{"g":1}"#, false)],
            );
        }
        check(
            r#"{"value":{"f":[{"exists":false}]}}"#,
            &[(r#"{"g":1}"#, true)],
        );
        check(
            r#"{"value":{"f":["x",{"exists":false}]}}"#,
            &[
                (r#"{"f":"x"}"#, true),
                (r#"{}"#, true),
                (r#"{"f":"y"}"#, false),
            ],
        );
    }

    #[test]
    fn event_array_matches_when_any_element_matches() {
        check(
            r#"{"value":{"tags":["red"]}}"#,
            &[
                (r#"{"tags":["blue","red"]}"#, true),
                (r#"{"tags":[["blue"],["red"]]}"#, true),
                (r#"{"tags":["blue","green"]}"#, false),
            ],
        );
        check(
            r#"{"value":{"scores":[{"numeric":[">",90]}]}}"#,
            &[
                (r#"{"scores":[10,95]}"#, true),
                (r#"{"scores":[10,20]}"#, false),
            ],
        );
        check(
            r#"{"value":{"tags":[{"anything-but":"red"}]}}"#,
            &[
                (r#"{"tags":["red","blue"]}"#, true),
                (r#"{"tags":["red"]}"#, false),
            ],
        );
    }

    #[test]
    fn array_of_objects_matches_one_element_at_a_time() {
        check(
            r#"{"value":{"items":{"sku":["A"],"qty":[{"numeric":[">",1]}]}}}"#,
            &[
                (
                    r#"{"items":[{"sku":"B","qty":5},{"sku":"A","qty":2}]}"#,
                    true,
                ),
                // sku and qty match, but in different elements.
                (
                    r#"{"items":[{"sku":"A","qty":1},{"sku":"B","qty":5}]}"#,
                    false,
                ),
                (r#"{"items":[]}"#, false),
            ],
        );
        check(
            r#"{"value":{"sku":["A"]}}"#,
            &[(r#"[{"sku":"B"},{"sku":"A"}]"#, true)],
        );
    }

    #[test]
    fn filters_are_ored() {
        let filters = set(&[
            r#"{"value":{"kind":["order"]}}"#,
            r#"{"value":{"amount":[{"numeric":[">=",1000]}]}}"#,
        ]);
        assert!(filters.matches(None, Some(br#"{"kind":"order","amount":1}"#)));
        assert!(filters.matches(None, Some(br#"{"kind":"refund","amount":5000}"#)));
        assert!(!filters.matches(None, Some(br#"{"kind":"refund","amount":5}"#)));
        assert!(!filters.matches(None, None));
    }

    #[test]
    fn plain_string_value_matches_a_condition_list() {
        check(
            r#"{"value":[{"prefix":"abc"}]}"#,
            &[("abcd", true), ("xabc", false)],
        );
        check(
            r#"{"value":[{"anything-but":["error"]}]}"#,
            &[("Hello, this is a test.", true), ("error", false)],
        );
        check(
            r#"{"value":["hello world"]}"#,
            &[("hello world", true), ("hello", false)],
        );
        check(r#"{"value":[""]}"#, &[("", true)]);
        check(r#"{"value":[{"exists":true}]}"#, &[("x", true)]);
        // A truncated object is not JSON either.
        check(r#"{"value":[{"prefix":"{\"a\""}]}"#, &[(r#"{"a":"#, true)]);
    }

    #[test]
    fn format_mismatch_drops_the_record() {
        // Object pattern, value that is no JSON object: dropped, even for exists:false.
        check(r#"{"value":{"a":["x"]}}"#, &[("a=x", false)]);
        check(
            r#"{"value":{"a":[{"exists":false}]}}"#,
            &[("plain", false), ("42", false)],
        );
        // Condition list, JSON-object value: dropped too.
        for pattern in [
            r#"{"value":[{"exists":true}]}"#,
            r#"{"value":[{"exists":false}]}"#,
            r#"{"value":[{"anything-but":"x"}]}"#,
        ] {
            check(pattern, &[(r#"{"a":1}"#, false)]);
        }
    }

    #[test]
    fn json_scalar_value_is_matched_as_parsed() {
        check(r#"{"value":[{"numeric":[">",10]}]}"#, &[("42", true)]);
        check(r#"{"value":[42]}"#, &[("42", true)]);
        check(r#"{"value":["42"]}"#, &[("42", false)]);
        check(r#"{"value":["abc"]}"#, &[(r#""abc""#, true)]);
        check(r#"{"value":[true]}"#, &[("true", true)]);
        check(r#"{"value":[null]}"#, &[("null", true)]);
        check(r#"{"value":["b"]}"#, &[(r#"["a","b"]"#, true)]);
    }

    #[test]
    fn missing_value_is_a_missing_field() {
        let tombstone = set(&[r#"{"value":[{"exists":false}]}"#]);
        assert!(tombstone.matches(Some(b"k"), None));
        assert!(!tombstone.matches(Some(b"k"), Some(b"x")));
        assert!(!set(&[r#"{"value":[{"anything-but":"x"}]}"#]).matches(None, None));
        // An object pattern needs a JSON object to look into.
        assert!(!set(&[r#"{"value":{"a":[{"exists":false}]}}"#]).matches(None, None));
    }

    #[test]
    fn key_filter_matches_the_record_key() {
        let json_key = set(&[r#"{"key":{"tenant":["acme"]}}"#]);
        assert!(json_key.matches(Some(br#"{"tenant":"acme"}"#), Some(b"anything")));
        assert!(!json_key.matches(Some(br#"{"tenant":"other"}"#), Some(b"anything")));
        assert!(!json_key.matches(None, Some(br#"{"tenant":"acme"}"#)));
        let plain_key = set(&[r#"{"key":[{"prefix":"user-"}]}"#]);
        assert!(plain_key.matches(Some(b"user-42"), None));
        assert!(!plain_key.matches(Some(b"order-42"), None));
        assert!(!plain_key.matches(None, None));
        let keyless = set(&[r#"{"key":[{"exists":false}]}"#]);
        assert!(keyless.matches(None, Some(b"v")));
        assert!(!keyless.matches(Some(b"k"), Some(b"v")));
    }

    #[test]
    fn key_and_value_in_one_pattern_are_anded() {
        let filters = set(&[r#"{"key":["k1"],"value":{"status":["ok"]}}"#]);
        assert!(filters.matches(Some(b"k1"), Some(br#"{"status":"ok"}"#)));
        assert!(!filters.matches(Some(b"k2"), Some(br#"{"status":"ok"}"#)));
        assert!(!filters.matches(Some(b"k1"), Some(br#"{"status":"bad"}"#)));
        // A value-only pattern never looks at the key.
        let value_only = set(&[r#"{"value":["v"]}"#]);
        assert!(value_only.matches(Some(b"\xff\xfe"), Some(b"v")));
        assert!(value_only.matches(None, Some(b"v")));
    }

    #[test]
    fn invalid_utf8_is_decoded_lossily() {
        let filters = set(&[r#"{"value":[{"prefix":"abc"}]}"#]);
        assert!(filters.matches(None, Some(b"abc\xff\xfe")));
        assert!(!filters.matches(None, Some(b"\xffabc")));
        assert!(set(&[r#"{"value":["a\uFFFDb"]}"#]).matches(None, Some(b"a\xffb")));
    }

    #[test]
    fn pattern_that_is_not_json_is_rejected_with_its_index() {
        let err = compile(&[r#"{"value":["ok"]}"#, "{not json"]).expect_err("second is not JSON");
        assert!(matches!(err, FilterError::ParsePattern { index: 1, .. }));
        assert_eq!(err.index(), 1);
        assert!(err.to_string().contains("Filters[1]"), "{err}");
    }

    #[test]
    fn invalid_patterns_name_the_place_and_the_problem() {
        // (pattern, path, part of the reason)
        #[rustfmt::skip]
        let cases = [
            // Not an object, or nothing to filter on.
            (r#"["value"]"#, "$", "must be a JSON object"),
            ("42", "$", "must be a JSON object"),
            ("{}", "$", "`key` and/or `value`"),
            // Top-level fields other than key/value.
            (r#"{"value":["a"],"topic":["t"]}"#, "$", "unknown field `topic`"),
            (r#"{"data":{"a":["x"]}}"#, "$", "unknown field `data`"),
            // Leaves that are not (non-empty) arrays.
            (r#"{"value":"abc"}"#, "$.value", "array of conditions"),
            (r#"{"value":{"a":"x"}}"#, "$.value.a", "array of conditions"),
            (r#"{"value":{"a":{"b":5}}}"#, "$.value.a.b", "array of conditions"),
            (r#"{"value":{"a":[]}}"#, "$.value.a", "empty condition array"),
            (r#"{"value":{}}"#, "$.value", "at least one field"),
            (r#"{"value":{"a":[["x"]]}}"#, "$.value.a[0]", "cannot be an array"),
            // Operators.
            (r#"{"value":{"a":["x",{"contains":"y"}]}}"#, "$.value.a[1].contains", "unknown operator `contains`"),
            (r#"{"value":{"a":[{"prefix":"x","suffix":"y"}]}}"#, "$.value.a[0]", "exactly one operator, got 2"),
            (r#"{"value":{"a":[{}]}}"#, "$.value.a[0]", "exactly one operator, got 0"),
            (r#"{"value":{"a":[{"prefix":5}]}}"#, "$.value.a[0].prefix", "`prefix` takes a string"),
            (r#"{"value":{"a":[{"suffix":null}]}}"#, "$.value.a[0].suffix", "`suffix` takes a string"),
            (r#"{"value":{"a":[{"equals-ignore-case":[]}]}}"#, "$.value.a[0].equals-ignore-case", "a string"),
            (r#"{"value":{"a":[{"exists":"yes"}]}}"#, "$.value.a[0].exists", "true or false"),
            // anything-but.
            (r#"{"value":{"a":[{"anything-but":[]}]}}"#, "$.value.a[0].anything-but", "at least one value"),
            (r#"{"value":{"a":[{"anything-but":["x",true]}]}}"#, "$.value.a[0].anything-but[1]", "strings or numbers"),
            (r#"{"value":{"a":[{"anything-but":null}]}}"#, "$.value.a[0].anything-but", "strings or numbers"),
            (r#"{"value":{"a":[{"anything-but":{"numeric":[">",1]}}]}}"#, "$.value.a[0].anything-but", "{\"prefix\": ..}"),
            (r#"{"value":{"a":[{"anything-but":{"prefix":1}}]}}"#, "$.value.a[0].anything-but.prefix", "takes a string"),
        ];
        for (pattern, path, reason) in cases {
            let (index, got_path, got_reason) = invalid(&[pattern]);
            assert_eq!((index, got_path.as_str()), (0, path), "{pattern}");
            assert!(got_reason.contains(reason), "{pattern}: {got_reason}");
        }
    }

    #[test]
    fn malformed_numeric_arrays_are_rejected() {
        // (operand, path under the `numeric` operator, part of the reason)
        #[rustfmt::skip]
        let cases = [
            (r#"">""#, "", "takes an array"),
            ("[]", "", "2 or 4 elements"),
            (r#"[">"]"#, "", "2 or 4 elements"),
            (r#"[">",1,"<"]"#, "", "2 or 4 elements"),
            (r#"[">",1,"<",5,"=",3]"#, "", "2 or 4 elements"),
            (r#"[1,">"]"#, "[0]", "expected a comparison"),
            (r#"[">","1"]"#, "[1]", "expected a number after `>`"),
            (r#"["!=",1]"#, "[0]", "unknown comparison `!=`"),
            (r#"[">",1,"=",5]"#, "[2]", "cannot be combined"),
            (r#"[">",1,">=",5]"#, "[2]", "two lower bounds"),
            (r#"["<",1,"<=",5]"#, "[2]", "two upper bounds"),
            (r#"[">",5,"<",1]"#, "", "range is empty"),
            (r#"[">",5,"<=",5]"#, "", "range is empty"),
        ];
        for (operand, path, reason) in cases {
            let pattern = format!(r#"{{"value":{{"p":[{{"numeric":{operand}}}]}}}}"#);
            let (index, got_path, got_reason) = invalid(&[&pattern]);
            assert_eq!(index, 0);
            assert_eq!(got_path, format!("$.value.p[0].numeric{path}"), "{operand}");
            assert!(got_reason.contains(reason), "{operand}: {got_reason}");
        }
    }

    #[test]
    fn error_names_the_filter_index_and_the_place() {
        let err = compile(&[
            r#"{"value":["a"]}"#,
            r#"{"value":{"price":[{"numeric":["~",1]}]}}"#,
        ])
        .expect_err("second filter is invalid");
        assert_eq!(err.index(), 1);
        assert_eq!(
            err.to_string(),
            "FilterCriteria.Filters[1].Pattern at $.value.price[0].numeric[0]: \
             unknown comparison `~` (supported: =, <, <=, >, >=)"
        );
    }
}
