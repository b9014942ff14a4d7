//! The Pendo Engage API client: token verify, metadata schema, the bulk custom-value write, and
//! aggregation reads. Every request waits on the Pendo limiter first, retries included.
//!
//! Errors are classified here, once, into [`PendoError`] kinds; the writer decides what each kind
//! means for the outbox (Vector's `RetryLogic`, supabase/etl's error policy).

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value as Json;

use crate::config::PendoSettings;
use crate::domain::Kind;
use crate::limiter::RateLimiter;
pub use crate::limiter::parse_retry_after;
use crate::metrics::record_request;

/// What the operator should check when Pendo refuses the key.
pub const AUTH_HINT: &str = "check the integration key, its region (pendo.region / pendo.base_url) and that it has write access";

/// A classified Pendo failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PendoError {
    /// 429, 5xx, timeouts, dropped connections, unreadable 2xx bodies: try again later.
    #[error("Pendo is unavailable ({status}): {message}")]
    Transient {
        status: String,
        message: String,
        retry_after: Option<Duration>,
    },
    /// 408: the request ran past Pendo's 5-minute cap; a smaller batch may pass.
    #[error("Pendo timed out the request (408): {message}")]
    TooSlow { message: String },
    /// 413: the body is larger than Pendo (or a proxy before it) takes; a smaller batch may
    /// pass. Treated as a 408: the batch is halved, not sent again at the same size.
    #[error("Pendo refused the request as too large (413): {message}")]
    TooLarge { message: String },
    /// Not sent at all, by this process's choice (its leader lease may have passed): the
    /// batch goes back to the outbox untouched.
    #[error("not sent: {reason}")]
    NotSent { reason: String },
    /// 400 for the whole batch (malformed, undeclared field, bad value).
    #[error("Pendo rejected the request (400): {message}")]
    BadRequest { message: String },
    /// 401/403: the key is wrong, revoked, for another region, or read-only.
    #[error("Pendo refused the integration key ({status}); {AUTH_HINT}")]
    Auth { status: u16 },
    /// A 2xx whose body does not account for the batch (empty, or counts that do not add up to
    /// what was sent): not a confirmation. Retried; a batch still unaccounted for is bisected.
    #[error("Pendo answered 2xx without accounting for the batch: {message}")]
    Unaccounted { message: String },
    /// Any other status: not retried automatically.
    #[error("Pendo answered {status}: {message}")]
    Unexpected { status: u16, message: String },
}

impl PendoError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            PendoError::Transient { .. } | PendoError::Unaccounted { .. }
        )
    }

    /// 408 and 413: the same request will fail again; a smaller one may pass.
    pub fn wants_smaller_batch(&self) -> bool {
        matches!(
            self,
            PendoError::TooSlow { .. } | PendoError::TooLarge { .. }
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PendoError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The body of a 200 from the bulk write. Every key is optional and unknown keys are ignored:
/// the response shape is only partly documented.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BulkResult {
    pub total: Option<u64>,
    pub updated: Option<u64>,
    pub failed: Option<u64>,
    pub missing: Vec<String>,
    /// Errors Pendo attributed to an id we sent, with their text.
    pub errors: Vec<(String, String)>,
    /// Errors we could not attribute to an id (their text).
    pub unattributed: Vec<String>,
}

impl BulkResult {
    /// One line for the history: what Pendo answered for a batch of `sent` records.
    pub fn summary(&self, sent: usize) -> String {
        let failed = self.missing.len() + self.errors.len();
        let updated = self.updated.map_or_else(
            || sent.saturating_sub(failed).to_string(),
            |n| n.to_string(),
        );
        let mut line = format!(
            "2xx for {sent} records: {updated} updated, {} missing, {} with errors",
            self.missing.len(),
            self.errors.len()
        );
        if !self.unattributed.is_empty() {
            line.push_str(&format!(
                ", {} unattributed: {}",
                self.unattributed.len(),
                excerpt(&self.unattributed.join("; "))
            ));
        }
        line
    }

    /// Why a 2xx body does not confirm a batch of `sent` records, if it does not: no result
    /// at all (`{}`, `[]`, anything but an object with Pendo's keys), or counts that do not add
    /// up (`total` ≠ sent, or `updated` + `failed` ≠ sent, with `failed` = missing + errors when
    /// absent). Pendo documents total = updated + failed and failed = missing + errors.
    pub fn unaccounted(body: &Json, sent: usize) -> Option<String> {
        let Some(o) = body.as_object() else {
            return Some(format!(
                "the body is not a result object: {}",
                excerpt(&body.to_string())
            ));
        };
        const KEYS: [&str; 5] = ["total", "updated", "failed", "missing", "errors"];
        if !KEYS.iter().any(|k| o.contains_key(*k)) {
            return Some(format!(
                "the body has no result: {}",
                excerpt(&body.to_string())
            ));
        }
        let num = |k: &str| o.get(k).and_then(Json::as_u64);
        let len = |k: &str| o.get(k).and_then(Json::as_array).map_or(0, Vec::len) as u64;
        let sent = sent as u64;
        if let Some(total) = num("total")
            && total != sent
        {
            return Some(format!("total {total} for {sent} records sent"));
        }
        if let Some(updated) = num("updated") {
            let failed = num("failed").unwrap_or(len("missing") + len("errors"));
            if updated + failed != sent {
                return Some(format!(
                    "updated {updated} + failed {failed} for {sent} records sent"
                ));
            }
        }
        None
    }

    /// Parses a 200 body against the ids that were sent.
    pub fn parse(body: &Json, sent_ids: &[&str]) -> BulkResult {
        let num = |k: &str| body.get(k).and_then(Json::as_u64);
        let id_text = |v: &Json| match v {
            Json::String(s) => Some(s.clone()),
            Json::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let missing = body
            .get("missing")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(id_text).collect())
            .unwrap_or_default();
        let mut errors = Vec::new();
        let mut unattributed = Vec::new();
        for e in body
            .get("errors")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            match e {
                Json::Object(o) => {
                    let id = ["id", "visitorId", "accountId"]
                        .iter()
                        .find_map(|k| o.get(*k).and_then(id_text));
                    let text = ["error", "message", "reason"]
                        .iter()
                        .find_map(|k| o.get(*k).and_then(Json::as_str).map(str::to_owned))
                        .unwrap_or_else(|| e.to_string());
                    match id.filter(|id| sent_ids.contains(&id.as_str())) {
                        Some(id) => errors.push((id, text)),
                        None => unattributed.push(text),
                    }
                }
                Json::String(s) => match error_string_id(s, sent_ids) {
                    Some(id) => errors.push((id.to_owned(), s.clone())),
                    None => unattributed.push(s.clone()),
                },
                other => unattributed.push(other.to_string()),
            }
        }
        let mut result = BulkResult {
            total: num("total"),
            updated: num("updated"),
            failed: num("failed"),
            missing,
            errors,
            unattributed,
        };
        // A failure count larger than what was itemised means some ids failed silently: treat
        // the gap as unattributed so the writer bisects instead of trusting the batch.
        let itemised =
            (result.missing.len() + result.errors.len() + result.unattributed.len()) as u64;
        if let Some(failed) = result.failed
            && failed > itemised
        {
            result.unattributed.push(format!(
                "Pendo reported {failed} failures but itemised {itemised}"
            ));
        }
        result
    }
}

/// The id a string error (`"<id>: <text>"`, or just `"<id>"`) is about, among the ids sent:
/// the whole string when it is an id, else the one sent id that the string starts with,
/// followed by `:`. Ids can hold colons: with `acme` and `acme:eu` in one batch,
/// `"acme:eu: bad type"` could be either's, so it is nobody's here (unattributed: the writer
/// splits the batch until each error names one id). Given to `acme` by its prefix, it let
/// `acme:eu` be confirmed into the shadow although Pendo refused it.
fn error_string_id<'a>(s: &str, sent_ids: &[&'a str]) -> Option<&'a str> {
    if let Some(id) = sent_ids.iter().find(|id| **id == s) {
        return Some(*id);
    }
    let mut named = sent_ids.iter().filter(|id| {
        s.strip_prefix(**id)
            .is_some_and(|rest| rest.starts_with(':'))
    });
    match (named.next(), named.next()) {
        (Some(id), None) => Some(*id),
        _ => None,
    }
}

/// What `token/verify` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub valid: bool,
    pub write_access: bool,
}

/// The Pendo API client. Cheap to clone.
#[derive(Clone)]
pub struct PendoClient {
    http: reqwest::Client,
    base: String,
    key: SecretString,
    limiter: RateLimiter,
}

impl std::fmt::Debug for PendoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendoClient")
            .field("base", &self.base)
            .field("key", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

impl PendoClient {
    pub fn new(settings: &PendoSettings, key: SecretString) -> PendoClient {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("pendo-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client builds (rustls, no custom roots)");
        PendoClient {
            http,
            base: settings.api_base(),
            key,
            limiter: RateLimiter::per_second(settings.requests_per_second),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The same client with another key (a rotated key file): the HTTP client and the limiter
    /// are shared, so a key probe counts against the same Pendo rate as the writes.
    pub fn with_key(&self, key: SecretString) -> PendoClient {
        PendoClient {
            key,
            ..self.clone()
        }
    }

    /// Whether two clients share one limiter.
    pub fn shares_limiter_with(&self, other: &PendoClient) -> bool {
        self.limiter.same_as(&other.limiter)
    }

    /// `GET /api/v1/token/verify`.
    pub async fn verify_token(&self) -> Result<TokenInfo, PendoError> {
        let body = self.get_json("/api/v1/token/verify").await?;
        Ok(TokenInfo {
            valid: body.get("valid").and_then(Json::as_bool).unwrap_or(false),
            write_access: body
                .get("writeAccess")
                .and_then(Json::as_bool)
                .unwrap_or(false),
        })
    }

    /// `GET /api/v1/metadata/schema/{kind}`: custom field key → Pendo `Type`.
    pub async fn custom_schema(&self, kind: Kind) -> Result<BTreeMap<String, String>, PendoError> {
        let body = self
            .get_json(&format!("/api/v1/metadata/schema/{kind}"))
            .await?;
        Ok(body
            .get("custom")
            .and_then(Json::as_object)
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        let t = v
                            .get("Type")
                            .or_else(|| v.get("type"))
                            .and_then(Json::as_str)
                            .unwrap_or("")
                            .to_owned();
                        (k.clone(), t)
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// One attempt of `POST /api/v1/metadata/{kind}/custom/value` with a root-array body.
    pub async fn set_values(
        &self,
        kind: Kind,
        body: &Json,
        create: bool,
        sent_ids: &[&str],
    ) -> Result<BulkResult, PendoError> {
        let mut path = format!("/api/v1/metadata/{kind}/custom/value");
        if create {
            path.push_str("?create=true");
        }
        let json = self
            .send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await?;
        if let Some(message) = BulkResult::unaccounted(&json, sent_ids.len()) {
            tracing::warn!(%message, records = sent_ids.len(), "Pendo's 2xx does not account for the batch; not a confirmation.");
            return Err(PendoError::Unaccounted { message });
        }
        Ok(BulkResult::parse(&json, sent_ids))
    }

    /// The custom values Pendo holds now for `fields` of one entity (`why --live`), by an
    /// aggregation filtered on the id: its rows are the shape the audit reads (the per-entity
    /// `GET /api/v1/{kind}/{id}` body is not documented). `None`: Pendo has no such entity.
    /// Transient failures are retried a few times (Retry-After honoured, capped at `retry_max`).
    pub async fn entity_values(
        &self,
        kind: Kind,
        id: &str,
        fields: &[String],
        retry_max: Duration,
    ) -> Result<Option<serde_json::Map<String, Json>>, PendoError> {
        let id_key = kind.id_key();
        let mut select = serde_json::Map::new();
        select.insert(id_key.to_owned(), Json::from(id_key));
        for (i, f) in fields.iter().enumerate() {
            // Aliases that cannot collide with the id key or each other.
            select.insert(format!("f{i}"), Json::from(format!("metadata.custom.{f}")));
        }
        let source = match kind {
            Kind::Account => serde_json::json!({ "accounts": null }),
            Kind::Visitor => serde_json::json!({ "visitors": null }),
        };
        // A JSON string literal is a valid filter string literal: quotes and backslashes escaped.
        let filter = format!("{id_key} == {}", Json::from(id));
        let request = serde_json::json!({
            "response": { "mimeType": "application/json" },
            "request": {
                "requestId": "pendo-sync-why",
                "pipeline": [
                    { "source": source },
                    { "filter": filter },
                    { "select": select },
                    { "limit": 2 },
                ]
            }
        });
        let mut delay = Duration::from_millis(500);
        let mut attempt = 1;
        let rows = loop {
            match self.aggregate(&request).await {
                Ok(rows) => break rows,
                Err(e) if e.is_transient() && attempt < 4 => {
                    let wait = e.retry_after().unwrap_or(delay).min(retry_max);
                    tokio::time::sleep(wait).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let row = rows
            .into_iter()
            .find(|r| row_id(r, id_key).as_deref() == Some(id));
        Ok(row.map(|row| {
            fields
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    (
                        f.clone(),
                        row.get(format!("f{i}")).cloned().unwrap_or(Json::Null),
                    )
                })
                .collect()
        }))
    }

    /// One page of the ids Pendo knows for `kind`, in id order: `skip` rows skipped, at most
    /// `limit`, only those `filter` (a Pendo filter expression) keeps. An id-only read: no
    /// metadata travels. One attempt; the caller decides what a failure means.
    pub async fn ids_page(
        &self,
        kind: Kind,
        filter: Option<&str>,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<String>, PendoError> {
        let id_key = kind.id_key();
        let source = match kind {
            Kind::Account => serde_json::json!({ "accounts": null }),
            Kind::Visitor => serde_json::json!({ "visitors": null }),
        };
        let mut pipeline = vec![
            serde_json::json!({ "source": source }),
            serde_json::json!({ "identified": id_key }),
        ];
        if let Some(filter) = filter {
            pipeline.push(serde_json::json!({ "filter": filter }));
        }
        pipeline.extend([
            serde_json::json!({ "select": { id_key: id_key } }),
            serde_json::json!({ "sort": [id_key] }),
            serde_json::json!({ "skip": skip }),
            serde_json::json!({ "limit": limit }),
        ]);
        let request = serde_json::json!({
            "response": { "mimeType": "application/json" },
            "request": { "requestId": format!("pendo-sync-ids-{kind}"), "pipeline": pipeline }
        });
        let rows = self.aggregate(&request).await?;
        Ok(rows.iter().filter_map(|r| row_id(r, id_key)).collect())
    }

    /// One attempt of `POST /api/v1/aggregation`; returns the `results` rows.
    pub async fn aggregate(&self, request: &Json) -> Result<Vec<Json>, PendoError> {
        let body = self
            .send(
                self.http
                    .post(format!("{}/api/v1/aggregation", self.base))
                    .json(request),
            )
            .await?;
        Ok(body
            .get("results")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default())
    }

    async fn get_json(&self, path: &str) -> Result<Json, PendoError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// Sends one request through the limiter and classifies the answer.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Json, PendoError> {
        self.limiter.acquire().await;
        let response = request
            .header("x-pendo-integration-key", self.key.expose_secret())
            .header("content-type", "application/json")
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                record_request("pendo", None);
                return Err(PendoError::Transient {
                    status: if e.is_timeout() {
                        "timeout"
                    } else {
                        "connection"
                    }
                    .into(),
                    message: describe_reqwest_error(&e),
                    retry_after: None,
                });
            }
        };
        let status = response.status().as_u16();
        record_request("pendo", Some(status));
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let text = match crate::http::body_text(response, crate::http::MAX_BODY_BYTES).await {
            Ok(t) => t,
            Err(e) if e.is_too_large() => {
                return Err(PendoError::Unexpected {
                    status,
                    message: e.to_string(),
                });
            }
            Err(e) => {
                return Err(PendoError::Transient {
                    status: status.to_string(),
                    message: e.to_string(),
                    retry_after,
                });
            }
        };
        match status {
            200..=299 => serde_json::from_str(&text).map_err(|e| PendoError::Transient {
                // Pendo may have applied the write; sending it again is harmless.
                status: status.to_string(),
                message: format!("unreadable body ({e}): {}", excerpt(&text)),
                retry_after: None,
            }),
            401 | 403 => Err(PendoError::Auth { status }),
            408 => Err(PendoError::TooSlow {
                message: excerpt(&text),
            }),
            413 => Err(PendoError::TooLarge {
                message: excerpt(&text),
            }),
            400 => Err(PendoError::BadRequest {
                message: excerpt(&text),
            }),
            429 | 500..=599 => Err(PendoError::Transient {
                status: status.to_string(),
                message: excerpt(&text),
                retry_after,
            }),
            _ => Err(PendoError::Unexpected {
                status,
                message: excerpt(&text),
            }),
        }
    }
}

/// The id of an aggregation row: Pendo's ids are strings, but a numeric one may come back as a
/// JSON number.
pub fn row_id(row: &Json, id_key: &str) -> Option<String> {
    match row.get(id_key) {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// A short, single-line excerpt of a body for messages (an HTML error page can be long).
pub fn excerpt(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut: String = flat.chars().take(200).collect();
    if cut.len() < flat.len() {
        format!("{cut}…")
    } else if cut.is_empty() {
        "(empty body)".into()
    } else {
        cut
    }
}

/// reqwest's Display can include the URL; ours carries no secret (the key travels in a header),
/// but keep the message to the error's kind and cause chain.
fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_partial_success_with_both_error_shapes() {
        let body = json!({"total": 4, "updated": 1, "failed": 3, "missing": ["b"],
            "errors": [{"id": "c", "error": "bad type"}, "d: too long"], "kind": "visitor"});
        let r = BulkResult::parse(&body, &["a", "b", "c", "d"]);
        assert_eq!(r.missing, vec!["b"]);
        assert_eq!(
            r.errors,
            vec![
                ("c".into(), "bad type".into()),
                ("d".into(), "d: too long".into())
            ]
        );
        assert!(r.unattributed.is_empty());
    }

    #[test]
    fn a_string_error_goes_to_the_one_id_it_names_never_to_a_prefix_of_it() {
        // `acme:eu` failed; `acme` did not. With both sent, the text could be either's: it is
        // left unattributed (the writer splits the batch), whatever order the ids were sent in.
        let body = json!({"total": 2, "updated": 1, "failed": 1,
            "errors": ["acme:eu: value \"x\" for field \"arr\" is not a valid number"]});
        for sent in [["acme", "acme:eu"], ["acme:eu", "acme"]] {
            let r = BulkResult::parse(&body, &sent);
            assert!(r.errors.is_empty(), "{r:?}");
            assert_eq!(r.unattributed.len(), 1, "{r:?}");
        }
        // Sent alone, it is `acme:eu`'s.
        let r = BulkResult::parse(&body, &["acme:eu"]);
        assert_eq!(r.errors[0].0, "acme:eu", "{r:?}");
        // An error only `acme` can be named by stays with `acme`.
        let body = json!({"errors": ["acme: too long"]});
        let r = BulkResult::parse(&body, &["acme:eu", "acme"]);
        assert_eq!(r.errors, vec![("acme".into(), "acme: too long".into())]);
        // The bare id, exactly.
        let r = BulkResult::parse(&json!({"errors": ["acme:eu"]}), &["acme", "acme:eu"]);
        assert_eq!(r.errors[0].0, "acme:eu");
        let r = BulkResult::parse(&json!({"errors": ["acme"]}), &["acme:eu", "acme"]);
        assert_eq!(r.errors[0].0, "acme");
        // A sent id that is only a prefix of a word is not a match.
        let r = BulkResult::parse(&json!({"errors": ["acmeco: bad"]}), &["acme"]);
        assert!(r.errors.is_empty() && r.unattributed.len() == 1, "{r:?}");
        let sent = ["acme", "acme:eu"];
        assert_eq!(error_string_id("acme:eu: x", &sent), None);
        assert_eq!(error_string_id("acme:eu: x", &["acme:eu"]), Some("acme:eu"));
        assert_eq!(error_string_id("other: x", &sent), None);
    }

    #[test]
    fn a_413_is_a_reason_to_send_less_like_a_408() {
        let e = PendoError::TooLarge {
            message: "Request Entity Too Large".into(),
        };
        assert!(e.wants_smaller_batch() && !e.is_transient());
        assert!(e.to_string().contains("413"), "{e}");
        let slow = PendoError::TooSlow {
            message: String::new(),
        };
        assert!(slow.wants_smaller_batch());
    }

    #[test]
    fn a_client_with_a_rotated_key_shares_the_limiter() {
        let settings: crate::config::PendoSettings = crate::config::Settings::from_toml_with_env(
            concat!(
                "[state]\npath = \"x.db\"\n[pendo]\nintegration_key = \"a\"\n",
                "[hubspot]\naccess_token = \"t\"\n",
                "[[mappings]]\nname = \"m\"\nsource = \"hubspot\"\nobject = \"contacts\"\n",
                "kind = \"visitor\"\nid = \"email\"\n[mappings.fields]\n",
                "stage = { from = \"lifecyclestage\", type = \"string\" }\n"
            ),
            Default::default(),
        )
        .map(|s| s.pendo)
        .unwrap_or_else(|e| panic!("{e}"));
        let first = PendoClient::new(&settings, SecretString::from("a"));
        let rotated = first.with_key(SecretString::from("b"));
        assert!(rotated.shares_limiter_with(&first));
        assert!(!PendoClient::new(&settings, SecretString::from("b")).shares_limiter_with(&first));
    }

    #[test]
    fn an_empty_or_unbalanced_2xx_does_not_account_for_the_batch() {
        assert!(BulkResult::unaccounted(&json!({}), 2).is_some());
        assert!(BulkResult::unaccounted(&json!([]), 2).is_some());
        assert!(BulkResult::unaccounted(&json!({"kind": "visitor"}), 2).is_some());
        assert!(
            BulkResult::unaccounted(&json!({"total": 3, "updated": 3, "failed": 0}), 2).is_some()
        );
        assert!(BulkResult::unaccounted(&json!({"updated": 1, "failed": 0}), 2).is_some());
        assert!(
            BulkResult::unaccounted(
                &json!({"total": 2, "updated": 1, "failed": 1, "missing": ["b"]}),
                2
            )
            .is_none()
        );
        assert!(BulkResult::unaccounted(&json!({"updated": 1, "missing": ["b"]}), 2).is_none());
    }

    #[test]
    fn unitemised_failures_are_unattributed() {
        let body = json!({"total": 2, "updated": 1, "failed": 1});
        let r = BulkResult::parse(&body, &["a", "b"]);
        assert_eq!(r.unattributed.len(), 1);
        let r = BulkResult::parse(&json!({"errors": ["something broke"]}), &["a", "b"]);
        assert_eq!(r.unattributed, vec!["something broke"]);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
