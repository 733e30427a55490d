//! Query-string handling shared by the read endpoints: Consul's `parse`
//! (dc, consistency, blocking parameters, token) with its error texts.

use std::time::Duration;

/// Decoded `key=value` pairs in request order; `?stale` yields `("stale", "")`.
#[derive(Clone, Debug, Default)]
pub struct QueryParams(pub Vec<(String, String)>);

impl QueryParams {
    pub fn parse(raw: Option<&str>) -> QueryParams {
        let pairs = raw
            .unwrap_or_default()
            .split('&')
            .filter(|part| !part.is_empty())
            .map(|part| {
                let (k, v) = part.split_once('=').unwrap_or((part, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        QueryParams(pairs)
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    /// First value, like Go's `url.Values.Get`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
}

/// `application/x-www-form-urlencoded` decoding; malformed escapes are kept
/// literally instead of failing, as Go's lenient callers mostly see them.
fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses Go's `time.ParseDuration` syntax ("10s", "1m30s", "1.5h", "0").
pub fn parse_go_duration(input: &str) -> Option<Duration> {
    let s = input.strip_prefix('+').unwrap_or(input);
    if let Some(positive) = s.strip_prefix('-') {
        // Negative waits are valid Go durations; Consul then uses the default.
        return parse_go_duration(positive).map(|_| Duration::ZERO);
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut total_nanos: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_nanos += number * nanos_per_unit;
    }
    if !total_nanos.is_finite() || total_nanos > u64::MAX as f64 {
        return None;
    }
    Some(Duration::from_nanos(total_nanos as u64))
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

/// The parsed common query options of a read endpoint.
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    /// `index`; 0 means "do not block".
    pub min_index: u64,
    /// Effective maximum wait before jitter (default 5m, capped at 10m).
    pub wait: Duration,
    pub consistency: &'static str,
    pub pretty: bool,
    /// `node-meta=key:value` filters, all of which must match.
    pub node_meta: Vec<(String, String)>,
}

/// A request-level error with Consul's status and plain-text body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

/// Checks `?dc=`; Consul forwards other datacenters and fails with this text
/// when it knows no route.
pub fn check_datacenter(requested: Option<&str>, local: &str) -> Result<(), ApiError> {
    match requested {
        Some(dc) if !dc.is_empty() && dc != local => {
            Err(ApiError::new(500, "No path to datacenter"))
        }
        _ => Ok(()),
    }
}

pub fn read_options(params: &QueryParams, local_dc: &str) -> Result<ReadOptions, ApiError> {
    check_datacenter(params.get("dc"), local_dc)?;
    let stale = params.has("stale");
    let consistent = params.has("consistent");
    if stale && consistent {
        return Err(ApiError::new(
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ));
    }
    let mut wait = DEFAULT_WAIT;
    if let Some(raw) = params.get("wait").filter(|w| !w.is_empty()) {
        let parsed =
            parse_go_duration(raw).ok_or_else(|| ApiError::new(400, "Invalid wait time"))?;
        // Consul treats non-positive waits as "use the default".
        if !parsed.is_zero() {
            wait = parsed.min(MAX_WAIT);
        }
    }
    let mut min_index = 0;
    if let Some(raw) = params.get("index").filter(|i| !i.is_empty()) {
        min_index = raw
            .parse::<u64>()
            .map_err(|_| ApiError::new(400, "Invalid index"))?;
    }
    if params.get("filter").is_some_and(|f| !f.is_empty()) {
        return Err(ApiError::new(
            400,
            "Failed to create boolean expression evaluator: consul-double does not implement ?filter expressions",
        ));
    }
    let node_meta = params
        .all("node-meta")
        .into_iter()
        .map(|pair| match pair.split_once(':') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (pair.to_string(), String::new()),
        })
        .collect();
    Ok(ReadOptions {
        min_index,
        wait,
        consistency: if stale {
            "stale"
        } else if consistent {
            "consistent"
        } else {
            "leader"
        },
        pretty: params.has("pretty"),
        node_meta,
    })
}

/// Random extra wait of up to `wait / 16`, as Consul adds to spread wakeups.
pub fn jitter(wait: Duration) -> Duration {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    let max_nanos = (wait / 16).as_nanos() as u64;
    if max_nanos == 0 {
        return Duration::ZERO;
    }
    // RandomState is randomly keyed per instance: a cheap entropy source.
    let random = RandomState::new().hash_one(std::time::Instant::now());
    Duration::from_nanos(random % max_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("s"), None);
        assert_eq!(parse_go_duration("5x"), None);
    }

    #[test]
    fn query_parsing_and_options() {
        let p = QueryParams::parse(Some("index=7&wait=20m&stale&node-meta=a%3Ab&tag=x+y"));
        assert_eq!(p.get("tag"), Some("x y"));
        let o = read_options(&p, "dc1").unwrap();
        assert_eq!(o.min_index, 7);
        assert_eq!(o.wait, MAX_WAIT);
        assert_eq!(o.consistency, "stale");
        assert_eq!(o.node_meta, [("a".to_string(), "b".to_string())]);

        let bad = |q: &str| read_options(&QueryParams::parse(Some(q)), "dc1").unwrap_err();
        assert_eq!(bad("wait=10").message, "Invalid wait time");
        assert_eq!(bad("index=x").message, "Invalid index");
        assert_eq!(bad("dc=dc9").status, 500);
        assert_eq!(bad("stale&consistent").status, 400);
        assert_eq!(bad("filter=Service%20%3D%3D%20x").status, 400);
        assert!(read_options(&QueryParams::parse(Some("dc=dc1")), "dc1").is_ok());
    }

    #[test]
    fn jitter_is_bounded() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_secs(16)) < Duration::from_secs(1));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn percent_decoding_is_lenient() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
