//! Configuration: one TOML file plus `PENDO_SYNC__<SECTION>__<KEY>` environment overrides, read
//! into one typed [`Settings`] and validated before anything else starts.
//!
//! Every failure is a [`ConfigError`] that names the dotted key and what is wrong with it
//! (`pendo.batch_size: must be between 1 and 10000, got 0`); `main` turns it into exit code 2.
//!
//! Secrets (`pendo.integration_key`, `salesforce.private_key`, `salesforce.client_secret`,
//! `salesforce.refresh_token`, `hubspot.access_token`, `hubspot.client_secret`,
//! `hubspot.refresh_token`, `admin.token`, `admin.viewer_token`) each have a direct key and a `_file` twin; giving both is
//! an error. They are held as [`SecretSource`] and only read (from a file) by
//! [`SecretSource::resolve`], at the start of a command that needs them, so `Settings` can be
//! validated on a machine that does not hold the secret files (CI, a laptop checking a config).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::domain::{DateFormat, FieldType, Kind};

/// A configuration problem, named by its dotted key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub state: StateSettings,
    pub pendo: PendoSettings,
    pub salesforce: Option<SalesforceSettings>,
    pub hubspot: Option<HubspotSettings>,
    pub schedule: ScheduleSettings,
    pub admin: AdminSettings,
    /// The guard's defaults (a mapping's `[mappings.guard]` overrides them).
    pub guard: GuardSettings,
    pub notify: NotifySettings,
    pub history: HistorySettings,
    pub mappings: Vec<MappingSettings>,
}

/// `[history]`: how long `why` can tell a value's story.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySettings {
    /// Events older than this are deleted, in small batches off the hot path.
    #[serde(default = "defaults::retention", with = "duration")]
    pub retention: Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            retention: defaults::retention(),
        }
    }
}

/// `[guard]`: how much of a field one cycle may clear or overwrite before it is held.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSettings {
    /// Per Pendo field: clears / values Pendo holds for it, per cycle among the covered records
    /// and over `window` across the mapping.
    #[serde(default = "defaults::max_clear_percent")]
    pub max_clear_percent: f64,
    /// Non-null values replaced by a different non-null value / values Pendo holds for the field
    /// across the mapping, per cycle and over `window`.
    #[serde(default = "defaults::max_overwrite_percent")]
    pub max_overwrite_percent: f64,
    /// Below this many values (the count a percentage is taken of) a field is never held on
    /// percentages.
    #[serde(default = "defaults::min_values")]
    pub min_values: u64,
    /// Clears and overwrites also add up over this rolling window.
    #[serde(default = "defaults::guard_window", with = "duration")]
    pub window: Duration,
}

impl Default for GuardSettings {
    fn default() -> Self {
        GuardSettings {
            max_clear_percent: defaults::max_clear_percent(),
            max_overwrite_percent: defaults::max_overwrite_percent(),
            min_values: defaults::min_values(),
            window: defaults::guard_window(),
        }
    }
}

/// `[mappings.guard]`: a mapping's own limits; what it leaves out comes from `[guard]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardOverrides {
    pub max_clear_percent: Option<f64>,
    pub max_overwrite_percent: Option<f64>,
    pub min_values: Option<u64>,
    #[serde(default, with = "duration_opt")]
    pub window: Option<Duration>,
}

/// What `[notify]` posts about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEvent {
    /// A cycle's changes were held by the guard.
    Hold,
    /// Pendo refused the integration key; the writer waits.
    WriterPaused,
    /// Values went dead (they will not be retried without an operator).
    Dead,
}

impl NotifyEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::Hold => "hold",
            NotifyEvent::WriterPaused => "writer_paused",
            NotifyEvent::Dead => "dead",
        }
    }
}

/// `[notify]`: a webhook (Slack, Mattermost, Teams incoming webhooks show its `text`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySettings {
    #[serde(default)]
    webhook_url: Option<SecretString>,
    #[serde(default)]
    webhook_url_file: Option<PathBuf>,
    /// The URL is a secret (Slack's carry their token).
    #[serde(skip, default)]
    pub webhook_source: SecretSource,
    #[serde(default = "defaults::notify_events")]
    pub events: Vec<NotifyEvent>,
}

impl Default for NotifySettings {
    fn default() -> Self {
        NotifySettings {
            webhook_url: None,
            webhook_url_file: None,
            webhook_source: SecretSource::None,
            events: defaults::notify_events(),
        }
    }
}

/// `[state]`: where the shadow, outbox, watermarks and history live. Exactly one of `path`
/// (a SQLite file: the default, one host) and `url` (a PostgreSQL database: stateless
/// containers, standby replicas).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// The SQLite file. Empty when `url` is set.
    #[serde(default)]
    pub path: PathBuf,
    /// `postgres://user@host:5432/db?sslmode=require`. A secret: it may carry a password.
    #[serde(default)]
    url: Option<SecretString>,
    #[serde(default)]
    password: Option<SecretString>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    /// Filled in by validation from the two keys above (or the URL's own password).
    #[serde(skip, default)]
    pub password_source: SecretSource,
    /// How long a leader that stopped renewing keeps the lease (PostgreSQL).
    #[serde(default = "defaults::lease_ttl", with = "duration")]
    pub lease_ttl: Duration,
}

/// Which back-end a [`StateSettings`] names.
#[derive(Debug, Clone, Copy)]
pub enum StateBackend<'a> {
    Sqlite(&'a Path),
    Postgres(&'a StateSettings),
}

impl StateSettings {
    /// A SQLite state at `path`.
    pub fn sqlite(path: impl Into<PathBuf>) -> StateSettings {
        StateSettings {
            path: path.into(),
            url: None,
            password: None,
            password_file: None,
            password_source: SecretSource::None,
            lease_ttl: defaults::lease_ttl(),
        }
    }

    /// A PostgreSQL state at `url` (tools and tests; the config file is validated instead).
    pub fn postgres(url: &str) -> StateSettings {
        StateSettings {
            url: Some(SecretString::from(url.to_owned())),
            ..StateSettings::sqlite("")
        }
    }

    pub fn backend(&self) -> StateBackend<'_> {
        match &self.url {
            Some(_) => StateBackend::Postgres(self),
            None => StateBackend::Sqlite(&self.path),
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.url.is_some()
    }

    /// The PostgreSQL URL, secret (it may hold a password).
    pub fn url(&self) -> Option<&SecretString> {
        self.url.as_ref()
    }

    /// The state for messages: the file, or the URL with any password replaced by `***`.
    pub fn display(&self) -> String {
        match &self.url {
            None => self.path.display().to_string(),
            Some(url) => redact_url(url.expose_secret()),
        }
    }
}

/// A database URL with its password (if any) replaced by `***`.
///
/// A password pasted without percent-encoding may hold `/`, `?`, `#` or `@` (base64 does), so
/// the user information is taken to end at the last `@` that a host follows, not at the first
/// `/`: a wrong guess hides too much, never too little.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(not a URL)".into();
    };
    let host_end = |from: &str| from.find(['/', '?', '#']).unwrap_or(from.len());
    let looks_like_host = |h: &str| {
        !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:[],_".contains(c))
    };
    let at = rest.match_indices('@').map(|(i, _)| i).rfind(|&i| {
        let after = &rest[i + 1..];
        looks_like_host(&after[..host_end(after)])
    });
    let (userinfo, after) = match at {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    let (host, tail) = after.split_at(host_end(after));
    // Query parameters may carry a password too (`?password=`).
    let tail = if tail.contains("password") {
        tail.split('?').next().unwrap_or("")
    } else {
        tail
    };
    match userinfo {
        Some(userinfo) => {
            let masked = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => userinfo.to_owned(),
            };
            format!("{scheme}://{masked}@{host}{tail}")
        }
        None => format!("{scheme}://{host}{tail}"),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendoSettings {
    #[serde(default = "defaults::region")]
    pub region: String,
    /// Overrides `region` (tests, proxies).
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    integration_key: Option<SecretString>,
    #[serde(default)]
    integration_key_file: Option<PathBuf>,
    /// Filled in by validation from the two keys above.
    #[serde(skip, default)]
    pub integration_key_source: SecretSource,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    #[serde(default = "defaults::pendo_rps")]
    pub requests_per_second: f64,
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "defaults::pendo_timeout", with = "duration")]
    pub timeout: Duration,
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub create_missing: bool,
    /// Ids Pendo does not know are checked again in full this often.
    #[serde(default = "defaults::unmatched_retry", with = "duration")]
    pub unmatched_retry: Duration,
    /// Pendo is asked which ids it newly knows once per poll interval, and never more often
    /// than this.
    #[serde(default = "defaults::discovery_interval", with = "duration")]
    pub discovery_interval: Duration,
    #[serde(default)]
    pub date_format: DateFormat,
    /// First delay between attempts of a failing batch; doubles (with jitter) up to `retry_max`.
    #[serde(default = "defaults::retry_initial", with = "duration")]
    pub retry_initial: Duration,
    /// Longest wait between attempts, and the cap on a server's Retry-After.
    #[serde(default = "defaults::retry_max", with = "duration")]
    pub retry_max: Duration,
}

impl PendoSettings {
    /// The API host for the configured region, or `base_url` when set. No trailing slash.
    pub fn api_base(&self) -> String {
        if let Some(url) = &self.base_url {
            return url.trim_end_matches('/').to_owned();
        }
        region_host(&self.region)
            .unwrap_or("https://app.pendo.io")
            .to_owned()
    }
}

fn region_host(region: &str) -> Option<&'static str> {
    Some(match region {
        "us" => "https://app.pendo.io",
        "eu" => "https://app.eu.pendo.io",
        "us1" => "https://us1.app.pendo.io",
        "jp" => "https://app.jpn.pendo.io",
        "au" => "https://app.au.pendo.io",
        _ => return None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SalesforceAuth {
    Jwt,
    ClientCredentials,
    RefreshToken,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceSettings {
    #[serde(default = "defaults::sf_login_url")]
    pub login_url: String,
    /// The JWT bearer assertion's `aud`. Unset: derived from the kind of org `login_url` points
    /// at (`https://test.salesforce.com` for sandboxes, else `https://login.salesforce.com`),
    /// never copied from `login_url` (a My Domain audience is refused). Set it for an
    /// Experience Cloud site or an org the derivation gets wrong.
    #[serde(default)]
    pub jwt_audience: Option<String>,
    #[serde(default = "defaults::sf_api_version")]
    pub api_version: String,
    pub auth: SalesforceAuth,
    pub client_id: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    private_key: Option<SecretString>,
    #[serde(default)]
    private_key_file: Option<PathBuf>,
    #[serde(default)]
    client_secret: Option<SecretString>,
    #[serde(default)]
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    refresh_token: Option<SecretString>,
    #[serde(default)]
    refresh_token_file: Option<PathBuf>,
    #[serde(skip, default)]
    pub private_key_source: SecretSource,
    #[serde(skip, default)]
    pub client_secret_source: SecretSource,
    #[serde(skip, default)]
    pub refresh_token_source: SecretSource,
    #[serde(default = "defaults::sf_rps")]
    pub requests_per_second: f64,
    #[serde(default = "defaults::sf_daily_percent")]
    pub max_daily_api_percent: f64,
    /// Full pulls expected to return more rows than this use Bulk API 2.0.
    #[serde(default = "defaults::sf_bulk_threshold")]
    pub bulk_threshold: u64,
    #[serde(default = "defaults::crm_timeout", with = "duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HubspotAuth {
    /// Private-app or service-key token sent as Bearer.
    #[default]
    Token,
    /// OAuth refresh-token flow.
    Oauth,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubspotSettings {
    #[serde(default = "defaults::hs_base_url")]
    pub base_url: String,
    /// The CRM path version: `v3`, or a dated version such as `2026-03`.
    #[serde(default = "defaults::hs_api_version")]
    pub api_version: String,
    #[serde(default)]
    pub auth: HubspotAuth,
    #[serde(default)]
    access_token: Option<SecretString>,
    #[serde(default)]
    access_token_file: Option<PathBuf>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    client_secret: Option<SecretString>,
    #[serde(default)]
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    refresh_token: Option<SecretString>,
    #[serde(default)]
    refresh_token_file: Option<PathBuf>,
    #[serde(skip, default)]
    pub access_token_source: SecretSource,
    #[serde(skip, default)]
    pub client_secret_source: SecretSource,
    #[serde(skip, default)]
    pub refresh_token_source: SecretSource,
    #[serde(default = "defaults::hs_per_10s")]
    pub requests_per_10s: u32,
    #[serde(default = "defaults::hs_search_rps")]
    pub search_requests_per_second: f64,
    #[serde(default = "defaults::crm_timeout", with = "duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    #[serde(default = "defaults::poll_interval", with = "duration")]
    pub poll_interval: Duration,
    #[serde(default = "defaults::reconcile_interval", with = "duration")]
    pub reconcile_interval: Duration,
    #[serde(default = "defaults::overlap", with = "duration")]
    pub overlap: Duration,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        ScheduleSettings {
            poll_interval: defaults::poll_interval(),
            reconcile_interval: defaults::reconcile_interval(),
            overlap: defaults::overlap(),
        }
    }
}

/// `[admin]`: the admin port and who may use it (DESIGN "Who may see what").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    #[serde(default = "defaults::admin_listen")]
    pub listen: String,
    /// The operator's token: reads and actions.
    #[serde(default)]
    token: Option<SecretString>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(skip, default)]
    pub token_source: SecretSource,
    /// The viewer's token: reads only.
    #[serde(default)]
    viewer_token: Option<SecretString>,
    #[serde(default)]
    viewer_token_file: Option<PathBuf>,
    #[serde(skip, default)]
    pub viewer_token_source: SecretSource,
    /// Whether reading CRM data (the console, `/v1/*`) needs a credential. Unset: true unless
    /// `listen` is a loopback address. Filled in by validation.
    #[serde(default)]
    read_auth: Option<bool>,
    #[serde(skip, default)]
    pub reads_need_credentials: bool,
    /// Host names (or addresses) the port answers besides the loopback names; empty: a loopback
    /// port answers loopback names only, another answers any name.
    #[serde(default, deserialize_with = "list_or_commas")]
    pub allowed_hosts: Vec<String>,
    /// A header a sign-in proxy sets to the person's name (`X-Forwarded-Email`), believed only
    /// from `trusted_proxies`.
    #[serde(default)]
    pub trusted_user_header: Option<String>,
    /// Addresses or CIDR ranges of the sign-in proxies (`10.0.0.0/8`, `192.168.1.7`).
    #[serde(default, deserialize_with = "list_or_commas")]
    trusted_proxies: Vec<String>,
    #[serde(skip, default)]
    pub trusted_proxy_nets: Vec<ipnet::IpNet>,
    /// The role a person named by the trusted header has: `viewer` (default) or `operator`.
    #[serde(default)]
    pub trusted_role: AdminRole,
    /// How long a console sign-in lasts.
    #[serde(default = "defaults::session_ttl", with = "duration")]
    pub session_ttl: Duration,
}

/// A list written as a TOML array, or as one comma-separated string (how an environment
/// variable gives it: `PENDO_SYNC__ADMIN__ALLOWED_HOSTS=a.example,b.example`).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(list) => list,
        Either::Text(text) => text
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
    })
}

/// What a credential on the admin port allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRole {
    /// Reads: the console's pages and the `/v1` reads.
    #[default]
    Viewer,
    /// Reads and actions: resync, hold decisions, queue actions, live checks.
    Operator,
}

impl AdminRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Viewer => "viewer",
            AdminRole::Operator => "operator",
        }
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: defaults::admin_listen(),
            token: None,
            token_file: None,
            token_source: SecretSource::None,
            viewer_token: None,
            viewer_token_file: None,
            viewer_token_source: SecretSource::None,
            read_auth: None,
            reads_need_credentials: false,
            allowed_hosts: Vec::new(),
            trusted_user_header: None,
            trusted_proxies: Vec::new(),
            trusted_proxy_nets: Vec::new(),
            trusted_role: AdminRole::Viewer,
            session_ttl: defaults::session_ttl(),
        }
    }
}

impl AdminSettings {
    /// Whether `listen` is a loopback address (only this machine reaches the port).
    pub fn is_loopback(&self) -> bool {
        self.listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Salesforce,
    Hubspot,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Salesforce => "salesforce",
            Source::Hubspot => "hubspot",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDelete {
    #[default]
    Keep,
    Clear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNull {
    /// An empty CRM value clears the Pendo field (sends null).
    #[default]
    Clear,
    /// An empty CRM value leaves the Pendo field as it is.
    Keep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdCase {
    #[default]
    Keep,
    Lower,
}

/// One CRM object → one Pendo kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSettings {
    pub name: String,
    pub source: Source,
    pub object: String,
    pub kind: Kind,
    /// CRM field (dotted path) whose value is the Pendo id.
    pub id: String,
    #[serde(default)]
    pub id_case: IdCase,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub on_delete: OnDelete,
    pub fields: BTreeMap<String, FieldSettings>,
    /// This mapping's guard limits over `[guard]`'s.
    #[serde(default)]
    pub guard: GuardOverrides,
    /// The limits in force: `[guard]` with `guard`'s overrides (filled by validation).
    #[serde(skip, default)]
    pub guard_limits: GuardSettings,
}

/// One Pendo custom field fed from one CRM field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSettings {
    pub from: String,
    #[serde(rename = "type")]
    pub field_type: FieldType,
    #[serde(default)]
    pub transform: Option<Transform>,
    #[serde(default)]
    pub on_null: OnNull,
}

/// Connector-side lookups applied to a raw CRM value before coercion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// HubSpot owner id → the owner's email.
    OwnerEmail,
    /// HubSpot owner id → the owner's "First Last".
    OwnerName,
}

impl Transform {
    pub fn as_str(self) -> &'static str {
        match self {
            Transform::OwnerEmail => "owner_email",
            Transform::OwnerName => "owner_name",
        }
    }
}

/// Where a secret comes from. `Debug` never shows an inline value.
#[derive(Clone, Default)]
pub enum SecretSource {
    #[default]
    None,
    Inline(SecretString),
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::None => f.write_str("None"),
            SecretSource::Inline(_) => f.write_str("Inline([REDACTED])"),
            SecretSource::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl SecretSource {
    pub fn is_set(&self) -> bool {
        !matches!(self, SecretSource::None)
    }

    /// Reads the secret. `key` is the config key reported on failure (`pendo.integration_key`).
    /// A file's trailing newline is dropped: secrets written with `echo` work.
    pub fn resolve(&self, key: &str) -> Result<SecretString, ConfigError> {
        match self {
            SecretSource::None => Err(ConfigError::new(
                key,
                format!(
                    "missing: set {key}, {key}_file, or the environment variable {}",
                    env_name(key)
                ),
            )),
            SecretSource::Inline(s) => {
                if s.expose_secret().trim().is_empty() {
                    Err(ConfigError::new(key, "is empty"))
                } else {
                    Ok(s.clone())
                }
            }
            SecretSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(
                        format!("{key}_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let trimmed = text.trim_end_matches(['\n', '\r']);
                if trimmed.trim().is_empty() {
                    return Err(ConfigError::new(
                        format!("{key}_file"),
                        format!("{} is empty", path.display()),
                    ));
                }
                Ok(SecretString::from(trimmed.to_owned()))
            }
        }
    }
}

fn env_name(key: &str) -> String {
    format!(
        "PENDO_SYNC__{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

fn secret_pair(
    key: &str,
    inline: Option<SecretString>,
    file: Option<PathBuf>,
) -> Result<SecretSource, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            key,
            format!("both {key} and {key}_file are set; give one"),
        )),
        (Some(s), None) => Ok(SecretSource::Inline(s)),
        (None, Some(p)) => Ok(SecretSource::File(p)),
        (None, None) => Ok(SecretSource::None),
    }
}

/// `[admin]` beyond `listen` and `token`: the viewer token, who must sign in, the Host names, the
/// sign-in proxy.
fn validate_admin(admin: &mut AdminSettings) -> Result<(), ConfigError> {
    admin.viewer_token_source = secret_pair(
        "admin.viewer_token",
        admin.viewer_token.take(),
        admin.viewer_token_file.take(),
    )?;
    admin.reads_need_credentials = admin.read_auth.unwrap_or(!admin.is_loopback());
    for (i, host) in admin.allowed_hosts.iter_mut().enumerate() {
        let name = host.trim().to_ascii_lowercase();
        let plausible = !name.is_empty()
            && (name.parse::<std::net::IpAddr>().is_ok()
                || name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
        if !plausible {
            return Err(ConfigError::new(
                format!("admin.allowed_hosts[{i}]"),
                format!(
                    "must be a host name or address without scheme, port or path (e.g. \"pendo-sync.internal\"), got {host:?}"
                ),
            ));
        }
        *host = name;
    }
    for (i, net) in admin.trusted_proxies.iter().enumerate() {
        let parsed = net.trim().parse::<ipnet::IpNet>().or_else(|_| {
            net.trim()
                .parse::<std::net::IpAddr>()
                .map(ipnet::IpNet::from)
        });
        match parsed {
            Ok(n) => admin.trusted_proxy_nets.push(n),
            Err(_) => {
                return Err(ConfigError::new(
                    format!("admin.trusted_proxies[{i}]"),
                    format!(
                        "must be an address or a CIDR range (e.g. \"10.0.0.0/8\"), got {net:?}"
                    ),
                ));
            }
        }
    }
    match (
        &admin.trusted_user_header,
        admin.trusted_proxy_nets.is_empty(),
    ) {
        (Some(h), _)
            if h.trim().is_empty()
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            return Err(ConfigError::new(
                "admin.trusted_user_header",
                format!("must be a header name such as \"X-Forwarded-Email\", got {h:?}"),
            ));
        }
        (Some(_), true) => {
            return Err(ConfigError::new(
                "admin.trusted_proxies",
                "admin.trusted_user_header is believed only from listed proxies: list the sign-in proxy's addresses (e.g. [\"10.0.0.0/8\"])",
            ));
        }
        (None, false) => {
            return Err(ConfigError::new(
                "admin.trusted_user_header",
                "admin.trusted_proxies is set but not the header they set: name it (e.g. \"X-Forwarded-Email\")",
            ));
        }
        _ => {}
    }
    if admin.session_ttl < Duration::from_secs(60)
        || admin.session_ttl > Duration::from_secs(30 * 86_400)
    {
        return Err(ConfigError::new(
            "admin.session_ttl",
            format!(
                "{} is out of range; write between \"1m\" and \"30d\" (default \"12h\")",
                humantime::format_duration(admin.session_ttl)
            ),
        ));
    }
    Ok(())
}

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    state: StateSettings,
    pendo: PendoSettings,
    #[serde(default)]
    salesforce: Option<SalesforceSettings>,
    #[serde(default)]
    hubspot: Option<HubspotSettings>,
    #[serde(default)]
    schedule: ScheduleSettings,
    #[serde(default)]
    admin: AdminSettings,
    #[serde(default)]
    guard: GuardSettings,
    #[serde(default)]
    notify: NotifySettings,
    #[serde(default)]
    history: HistorySettings,
    #[serde(default)]
    mappings: Vec<MappingSettings>,
}

impl Settings {
    /// Loads `path` (TOML) with environment overrides from the process environment.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("PENDO_SYNC__"))
            .collect();
        Self::load_with_env(path, vars)
    }

    /// Loads `path` with an explicit set of `PENDO_SYNC__*` variables (tests pass their own).
    pub fn load_with_env(
        path: &Path,
        env: HashMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::from_toml_with_env(&text, env)
    }

    /// Parses TOML text with environment overrides; the whole of validation happens here.
    pub fn from_toml_with_env(
        text: &str,
        env: HashMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let environment = config::Environment::with_prefix("PENDO_SYNC")
            .prefix_separator("__")
            .separator("__")
            // Values stay text: numeric and boolean settings parse their text when deserialized,
            // and a secret such as "007123" reaches us exactly as written.
            .try_parsing(false)
            .source(Some(env));
        let merged = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(environment)
            .build()
            .map_err(|e| ConfigError::new("config", e.to_string()))?;
        let value: config::Value = merged
            .try_deserialize()
            .map_err(|e| ConfigError::new("config", e.to_string()))?;
        let raw: RawSettings = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." {
                "config".to_owned()
            } else {
                path
            };
            let message = e.into_inner().to_string();
            let message = removed_key_message(&key, &message)
                .unwrap_or_else(|| clean_serde_message(&key, &message));
            ConfigError::new(key, message)
        })?;
        validate(raw)
    }

    /// The mapping with `name`, or a usage error naming the known ones.
    pub fn mapping(&self, name: &str) -> Result<&MappingSettings, ConfigError> {
        self.mappings
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.mappings.iter().map(|m| m.name.as_str()).collect();
                ConfigError::new(
                    "--mapping",
                    format!(
                        "no mapping named {name:?}; configured: {}",
                        known.join(", ")
                    ),
                )
            })
    }
}

/// Keys that pendo-sync once accepted and no longer does. A config that still sets one fails as
/// any unknown key does (exit 2, naming the key), but says why the key went away instead of only
/// listing the keys that are accepted.
fn removed_key_message(key: &str, serde_message: &str) -> Option<String> {
    if !serde_message.contains("unknown field") {
        return None;
    }
    let (parent, field) = key.rsplit_once('.')?;
    let in_mapping = parent
        .strip_prefix("mappings[")
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    match field {
        "account_from" if in_mapping => Some(
            "unknown key `account_from`: it was removed because the company id it fetched never \
             reached Pendo (Pendo's custom-value API cannot set a visitor's account); delete it"
                .to_owned(),
        ),
        _ => None,
    }
}

/// serde's messages mention Rust-side details ("variant", "struct"); keep them but tidy the
/// quoting so users see the value they wrote.
fn clean_serde_message(key: &str, msg: &str) -> String {
    // The config crate reports an unknown enum value in its own words ("enum Source does not have
    // variant constructor zoho for key ..."): say it like the other errors, with the choices.
    if let Some(rest) = msg.split("variant constructor ").nth(1) {
        let value = rest.split(" for key").next().unwrap_or(rest).trim();
        let field = key.rsplit('.').next().unwrap_or(key);
        return match accepted_values(field) {
            Some(choices) => format!("unknown value {value:?}; expected one of {choices}"),
            None => format!("unknown value {value:?}"),
        };
    }
    msg.replace("unknown variant", "unknown value")
        .replace("unknown field", "unknown key")
}

/// The accepted values of each enum-valued key, for error messages.
fn accepted_values(field: &str) -> Option<&'static str> {
    Some(match field {
        "source" => "salesforce, hubspot",
        "kind" => "visitor, account",
        "type" => "string, number, boolean, date",
        "on_delete" => "keep, clear",
        "on_null" => "clear, keep",
        "id_case" => "keep, lower",
        "transform" => "owner_email, owner_name",
        "date_format" => "epoch_ms, iso8601",
        "auth" => "jwt, client_credentials, refresh_token (salesforce); token, oauth (hubspot)",
        _ => return None,
    })
}

fn validate_state(mut state: StateSettings) -> Result<StateSettings, ConfigError> {
    let has_path = !state.path.as_os_str().is_empty();
    match (&state.url, has_path) {
        (Some(_), true) => {
            return Err(ConfigError::new(
                "state.path",
                "state.path and state.url are both set; give one: state.path for a SQLite file, state.url for PostgreSQL",
            ));
        }
        (None, false) => {
            return Err(ConfigError::new(
                "state.path",
                "missing: set state.path (a SQLite file) or state.url (a PostgreSQL database)",
            ));
        }
        (None, true) => {
            if state.password.is_some() || state.password_file.is_some() {
                let key = if state.password.is_some() {
                    "state.password"
                } else {
                    "state.password_file"
                };
                return Err(ConfigError::new(
                    key,
                    "is for state.url (PostgreSQL); a SQLite state.path has no password",
                ));
            }
        }
        (Some(url), false) => {
            let text = url.expose_secret();
            if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
                return Err(ConfigError::new(
                    "state.url",
                    format!(
                        "must be a PostgreSQL URL (postgres://user@host:5432/database); got {}",
                        redact_url(text)
                    ),
                ));
            }
            state.password_source = secret_pair(
                "state.password",
                state.password.take(),
                state.password_file.take(),
            )?;
        }
    }
    if state.lease_ttl < Duration::from_secs(3) || state.lease_ttl > Duration::from_secs(600) {
        return Err(ConfigError::new(
            "state.lease_ttl",
            format!(
                "{} is out of range; write between \"3s\" and \"10m\" (default \"15s\")",
                humantime::format_duration(state.lease_ttl)
            ),
        ));
    }
    Ok(state)
}

fn validate(raw: RawSettings) -> Result<Settings, ConfigError> {
    let RawSettings {
        state,
        mut pendo,
        salesforce,
        hubspot,
        schedule,
        mut admin,
        guard,
        mut notify,
        history,
        mappings,
    } = raw;
    if history.retention < Duration::from_secs(3600) {
        return Err(ConfigError::new(
            "history.retention",
            format!(
                "{} is too short to explain anything; write at least \"1h\" (default \"90d\")",
                humantime::format_duration(history.retention)
            ),
        ));
    }

    let state = validate_state(state)?;

    // Pendo
    if pendo.base_url.is_none() && region_host(&pendo.region).is_none() {
        return Err(ConfigError::new(
            "pendo.region",
            format!("must be one of us, eu, us1, jp, au; got {:?}", pendo.region),
        ));
    }
    if let Some(url) = &pendo.base_url {
        check_url("pendo.base_url", url)?;
    }
    pendo.integration_key_source = secret_pair(
        "pendo.integration_key",
        pendo.integration_key.take(),
        pendo.integration_key_file.take(),
    )?;
    if !pendo.integration_key_source.is_set() {
        return Err(ConfigError::new(
            "pendo.integration_key",
            "missing: set pendo.integration_key_file, pendo.integration_key, or PENDO_SYNC__PENDO__INTEGRATION_KEY",
        ));
    }
    check_range("pendo.batch_size", pendo.batch_size as f64, 1.0, 10_000.0)?;
    check_positive(
        "pendo.requests_per_second",
        pendo.requests_per_second,
        10_000.0,
    )?;
    check_range("pendo.max_in_flight", pendo.max_in_flight as f64, 1.0, 64.0)?;
    check_duration("pendo.timeout", pendo.timeout)?;
    check_range("pendo.max_attempts", pendo.max_attempts as f64, 1.0, 1000.0)?;
    check_duration("pendo.unmatched_retry", pendo.unmatched_retry)?;
    check_duration("pendo.discovery_interval", pendo.discovery_interval)?;
    check_duration("pendo.retry_initial", pendo.retry_initial)?;
    if pendo.retry_max < pendo.retry_initial {
        return Err(ConfigError::new(
            "pendo.retry_max",
            "must not be shorter than pendo.retry_initial",
        ));
    }

    // Salesforce
    let salesforce = match salesforce {
        Some(sf) => Some(validate_salesforce(sf)?),
        None => None,
    };
    let hubspot = match hubspot {
        Some(hs) => Some(validate_hubspot(hs)?),
        None => None,
    };

    check_duration("schedule.poll_interval", schedule.poll_interval)?;
    check_duration("schedule.reconcile_interval", schedule.reconcile_interval)?;

    admin.listen.parse::<SocketAddr>().map_err(|_| {
        ConfigError::new(
            "admin.listen",
            format!(
                "must be host:port (e.g. 127.0.0.1:9464), got {:?}",
                admin.listen
            ),
        )
    })?;
    admin.token_source = secret_pair("admin.token", admin.token.take(), admin.token_file.take())?;
    validate_admin(&mut admin)?;

    // Mappings
    if mappings.is_empty() {
        return Err(ConfigError::new(
            "mappings",
            "at least one [[mappings]] entry is needed",
        ));
    }
    let mut names = std::collections::HashSet::new();
    let mut fields_by_kind: HashMap<(Kind, String), String> = HashMap::new();
    for (i, m) in mappings.iter().enumerate() {
        let at = |k: &str| format!("mappings[{i}].{k}");
        if m.name.is_empty()
            || !m
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::new(
                at("name"),
                format!("must be letters, digits, '-' or '_', got {:?}", m.name),
            ));
        }
        if !names.insert(m.name.clone()) {
            return Err(ConfigError::new(
                at("name"),
                format!("{:?} is used by two mappings", m.name),
            ));
        }
        match m.source {
            Source::Salesforce if salesforce.is_none() => {
                return Err(ConfigError::new(
                    at("source"),
                    "is \"salesforce\" but there is no [salesforce] section",
                ));
            }
            Source::Hubspot if hubspot.is_none() => {
                return Err(ConfigError::new(
                    at("source"),
                    "is \"hubspot\" but there is no [hubspot] section",
                ));
            }
            _ => {}
        }
        if !is_identifier(&m.object) {
            return Err(ConfigError::new(
                at("object"),
                format!("{:?} is not a CRM object name", m.object),
            ));
        }
        if !is_field_path(&m.id) {
            return Err(ConfigError::new(
                at("id"),
                format!("{:?} is not a field path", m.id),
            ));
        }
        if let Some(f) = &m.filter {
            if f.trim().is_empty() {
                return Err(ConfigError::new(
                    at("filter"),
                    "is empty; remove it or give a condition",
                ));
            }
            if m.source == Source::Hubspot {
                parse_hubspot_filter(f).map_err(|e| ConfigError::new(at("filter"), e))?;
            }
        }
        if m.fields.is_empty() {
            return Err(ConfigError::new(at("fields"), "maps no fields"));
        }
        for (pendo_field, f) in &m.fields {
            let fk = format!("mappings[{i}].fields.{pendo_field}");
            if !is_identifier(pendo_field) {
                return Err(ConfigError::new(
                    &fk,
                    "a Pendo field key is letters, digits and '_', starting with a letter or '_'",
                ));
            }
            if !is_field_path(&f.from) {
                return Err(ConfigError::new(
                    format!("{fk}.from"),
                    format!(
                        "{:?} is not a plausible CRM field path (e.g. ARR__c or Owner.Email)",
                        f.from
                    ),
                ));
            }
            if let Some(t) = f.transform {
                if m.source != Source::Hubspot {
                    return Err(ConfigError::new(
                        format!("{fk}.transform"),
                        format!("{} only works on HubSpot owner ids", t.as_str()),
                    ));
                }
                if f.field_type != FieldType::String {
                    return Err(ConfigError::new(
                        format!("{fk}.type"),
                        format!(
                            "is {} but transform {} always yields a string; the CRM value can never meet it",
                            f.field_type,
                            t.as_str()
                        ),
                    ));
                }
            }
            if let Some(other) =
                fields_by_kind.insert((m.kind, pendo_field.clone()), m.name.clone())
            {
                return Err(ConfigError::new(
                    &fk,
                    format!(
                        "the {} field {pendo_field:?} is already mapped by mapping {other:?}; one Pendo field has one source",
                        m.kind
                    ),
                ));
            }
        }
    }

    // The guard
    check_guard("guard", &guard)?;
    let mut mappings = mappings;
    for (i, m) in mappings.iter_mut().enumerate() {
        let o = m.guard;
        m.guard_limits = GuardSettings {
            max_clear_percent: o.max_clear_percent.unwrap_or(guard.max_clear_percent),
            max_overwrite_percent: o
                .max_overwrite_percent
                .unwrap_or(guard.max_overwrite_percent),
            min_values: o.min_values.unwrap_or(guard.min_values),
            window: o.window.unwrap_or(guard.window),
        };
        check_guard(&format!("mappings[{i}].guard"), &m.guard_limits)?;
    }
    notify.webhook_source = secret_pair(
        "notify.webhook_url",
        notify.webhook_url.take(),
        notify.webhook_url_file.take(),
    )?;
    if let SecretSource::Inline(url) = &notify.webhook_source {
        check_url("notify.webhook_url", url.expose_secret()).map_err(|_| {
            ConfigError::new(
                "notify.webhook_url",
                "must be an http(s) URL (the value is a secret and is not repeated here)",
            )
        })?;
    }

    Ok(Settings {
        state,
        pendo,
        salesforce,
        hubspot,
        schedule,
        admin,
        guard,
        notify,
        history,
        mappings,
    })
}

fn validate_salesforce(mut sf: SalesforceSettings) -> Result<SalesforceSettings, ConfigError> {
    check_url("salesforce.login_url", &sf.login_url)?;
    if let Some(aud) = sf.jwt_audience.take() {
        // Compared verbatim by Salesforce: no surrounding blanks, no trailing slash.
        let aud = aud.trim().trim_end_matches('/').to_owned();
        check_url("salesforce.jwt_audience", &aud)?;
        sf.jwt_audience = Some(aud);
    }
    let v = sf.api_version.strip_prefix('v').unwrap_or("");
    let ok = v.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.chars().all(|c| c.is_ascii_digit())
            && b.chars().all(|c| c.is_ascii_digit())
    });
    if !ok {
        return Err(ConfigError::new(
            "salesforce.api_version",
            format!("must look like v62.0, got {:?}", sf.api_version),
        ));
    }
    if sf.client_id.trim().is_empty() {
        return Err(ConfigError::new(
            "salesforce.client_id",
            "must not be empty",
        ));
    }
    sf.private_key_source = secret_pair(
        "salesforce.private_key",
        sf.private_key.take(),
        sf.private_key_file.take(),
    )?;
    sf.client_secret_source = secret_pair(
        "salesforce.client_secret",
        sf.client_secret.take(),
        sf.client_secret_file.take(),
    )?;
    sf.refresh_token_source = secret_pair(
        "salesforce.refresh_token",
        sf.refresh_token.take(),
        sf.refresh_token_file.take(),
    )?;
    match sf.auth {
        SalesforceAuth::Jwt => {
            if sf.username.as_deref().is_none_or(|u| u.trim().is_empty()) {
                return Err(ConfigError::new(
                    "salesforce.username",
                    "is required when auth = \"jwt\"",
                ));
            }
            if !sf.private_key_source.is_set() {
                return Err(ConfigError::new(
                    "salesforce.private_key",
                    "is required when auth = \"jwt\" (set private_key_file or private_key)",
                ));
            }
        }
        SalesforceAuth::ClientCredentials => {
            if !sf.client_secret_source.is_set() {
                return Err(ConfigError::new(
                    "salesforce.client_secret",
                    "is required when auth = \"client_credentials\"",
                ));
            }
        }
        SalesforceAuth::RefreshToken => {
            if !sf.refresh_token_source.is_set() {
                return Err(ConfigError::new(
                    "salesforce.refresh_token",
                    "is required when auth = \"refresh_token\"",
                ));
            }
        }
    }
    check_positive(
        "salesforce.requests_per_second",
        sf.requests_per_second,
        10_000.0,
    )?;
    check_range(
        "salesforce.max_daily_api_percent",
        sf.max_daily_api_percent,
        1.0,
        100.0,
    )?;
    check_duration("salesforce.timeout", sf.timeout)?;
    Ok(sf)
}

fn validate_hubspot(mut hs: HubspotSettings) -> Result<HubspotSettings, ConfigError> {
    check_url("hubspot.base_url", &hs.base_url)?;
    let v = &hs.api_version;
    let dated = v.len() == 7
        && v.as_bytes()[4] == b'-'
        && v[..4].chars().all(|c| c.is_ascii_digit())
        && v[5..].chars().all(|c| c.is_ascii_digit());
    if !(v == "v3" || dated) {
        return Err(ConfigError::new(
            "hubspot.api_version",
            format!("must be v3 or a dated version such as 2026-03, got {v:?}"),
        ));
    }
    hs.access_token_source = secret_pair(
        "hubspot.access_token",
        hs.access_token.take(),
        hs.access_token_file.take(),
    )?;
    hs.client_secret_source = secret_pair(
        "hubspot.client_secret",
        hs.client_secret.take(),
        hs.client_secret_file.take(),
    )?;
    hs.refresh_token_source = secret_pair(
        "hubspot.refresh_token",
        hs.refresh_token.take(),
        hs.refresh_token_file.take(),
    )?;
    match hs.auth {
        HubspotAuth::Token => {
            if !hs.access_token_source.is_set() {
                return Err(ConfigError::new(
                    "hubspot.access_token",
                    "missing: set hubspot.access_token_file, hubspot.access_token, or PENDO_SYNC__HUBSPOT__ACCESS_TOKEN",
                ));
            }
        }
        HubspotAuth::Oauth => {
            if hs.client_id.as_deref().is_none_or(|c| c.trim().is_empty()) {
                return Err(ConfigError::new(
                    "hubspot.client_id",
                    "is required when auth = \"oauth\"",
                ));
            }
            if !hs.client_secret_source.is_set() {
                return Err(ConfigError::new(
                    "hubspot.client_secret",
                    "is required when auth = \"oauth\"",
                ));
            }
            if !hs.refresh_token_source.is_set() {
                return Err(ConfigError::new(
                    "hubspot.refresh_token",
                    "is required when auth = \"oauth\"",
                ));
            }
        }
    }
    check_range(
        "hubspot.requests_per_10s",
        hs.requests_per_10s as f64,
        1.0,
        1000.0,
    )?;
    check_positive(
        "hubspot.search_requests_per_second",
        hs.search_requests_per_second,
        100.0,
    )?;
    check_duration("hubspot.timeout", hs.timeout)?;
    Ok(hs)
}

/// HubSpot filters are `property=value` pairs joined by `,` or `&&`.
pub fn parse_hubspot_filter(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in text
        .split([',', '&'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not property=value"))?;
        let (k, v) = (k.trim(), v.trim().trim_matches(['"', '\'']));
        if !is_identifier(k) {
            return Err(format!("{k:?} is not a HubSpot property name"));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    if out.is_empty() {
        return Err("no property=value pair".to_owned());
    }
    Ok(out)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_field_path(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(is_identifier)
}

fn check_url(key: &str, value: &str) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => Ok(()),
        Ok(u) => Err(ConfigError::new(
            key,
            format!(
                "must be an http(s) URL with a host, got scheme {:?} in {value:?}",
                u.scheme()
            ),
        )),
        Err(e) => Err(ConfigError::new(
            key,
            format!("is not a valid URL ({e}): {value:?}"),
        )),
    }
}

fn check_guard(at: &str, g: &GuardSettings) -> Result<(), ConfigError> {
    check_range(
        &format!("{at}.max_clear_percent"),
        g.max_clear_percent,
        0.0,
        100.0,
    )?;
    check_range(
        &format!("{at}.max_overwrite_percent"),
        g.max_overwrite_percent,
        0.0,
        100.0,
    )?;
    check_range(&format!("{at}.min_values"), g.min_values as f64, 0.0, 1e12)?;
    check_duration(&format!("{at}.window"), g.window)
}

fn check_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<(), ConfigError> {
    if !(lo..=hi).contains(&v) {
        return Err(ConfigError::new(
            key,
            format!("must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(())
}

fn check_positive(key: &str, v: f64, hi: f64) -> Result<(), ConfigError> {
    if !(v > 0.0 && v <= hi) {
        return Err(ConfigError::new(
            key,
            format!("must be greater than 0 and at most {hi}, got {v}"),
        ));
    }
    Ok(())
}

fn check_duration(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(key, "must be longer than zero"));
    }
    Ok(())
}

/// humantime durations ("90s", "5m", "24h") in config.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); write e.g. \"90s\", \"5m\" or \"24h\""
            ))
        })
    }
}

/// [`duration`] for an optional key.
mod duration_opt {
    use std::time::Duration;

    use serde::Deserializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

mod defaults {
    use std::time::Duration;

    pub fn max_clear_percent() -> f64 {
        10.0
    }
    pub fn max_overwrite_percent() -> f64 {
        50.0
    }
    pub fn min_values() -> u64 {
        100
    }
    pub fn guard_window() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn lease_ttl() -> Duration {
        Duration::from_secs(15)
    }
    pub fn retention() -> Duration {
        Duration::from_secs(90 * 86_400)
    }
    pub fn notify_events() -> Vec<super::NotifyEvent> {
        vec![
            super::NotifyEvent::Hold,
            super::NotifyEvent::WriterPaused,
            super::NotifyEvent::Dead,
        ]
    }

    pub fn region() -> String {
        "us".into()
    }
    pub fn batch_size() -> usize {
        500
    }
    pub fn pendo_rps() -> f64 {
        5.0
    }
    pub fn max_in_flight() -> usize {
        2
    }
    pub fn pendo_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_attempts() -> u32 {
        10
    }
    pub fn unmatched_retry() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn discovery_interval() -> Duration {
        Duration::from_secs(60)
    }
    pub fn retry_initial() -> Duration {
        Duration::from_secs(1)
    }
    pub fn retry_max() -> Duration {
        Duration::from_secs(300)
    }
    pub fn sf_login_url() -> String {
        "https://login.salesforce.com".into()
    }
    pub fn sf_api_version() -> String {
        "v62.0".into()
    }
    pub fn sf_rps() -> f64 {
        10.0
    }
    pub fn sf_daily_percent() -> f64 {
        50.0
    }
    pub fn sf_bulk_threshold() -> u64 {
        200_000
    }
    pub fn crm_timeout() -> Duration {
        Duration::from_secs(120)
    }
    pub fn hs_base_url() -> String {
        "https://api.hubapi.com".into()
    }
    pub fn hs_api_version() -> String {
        "v3".into()
    }
    pub fn hs_per_10s() -> u32 {
        90
    }
    pub fn hs_search_rps() -> f64 {
        4.0
    }
    pub fn poll_interval() -> Duration {
        Duration::from_secs(60)
    }
    pub fn reconcile_interval() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn overlap() -> Duration {
        Duration::from_secs(300)
    }
    pub fn session_ttl() -> Duration {
        Duration::from_secs(12 * 3600)
    }

    pub fn admin_listen() -> String {
        "127.0.0.1:9464".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config/example.toml");

    fn load(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml_with_env(text, HashMap::new())
    }

    #[test]
    fn the_design_example_loads_unchanged() {
        let s = load(EXAMPLE).expect("example config loads");
        assert_eq!(s.mappings.len(), 2);
        assert_eq!(s.pendo.batch_size, 500);
        assert_eq!(s.schedule.overlap, Duration::from_secs(300));
        assert_eq!(s.mappings[0].fields["arr"].field_type, FieldType::Number);
        assert_eq!(
            s.mappings[1].fields["csmname"].transform,
            Some(Transform::OwnerName)
        );
        assert_eq!(s.pendo.api_base(), "https://app.pendo.io");
    }

    #[test]
    fn the_admin_port_s_keys_are_checked_and_reads_need_credentials_beyond_loopback() {
        let with_admin = |lines: &str| {
            load(&EXAMPLE.replace(
                "token_file = \"/run/secrets/admin_token\"",
                &format!("token_file = \"/run/secrets/admin_token\"\n{lines}"),
            ))
        };
        let s = load(EXAMPLE).unwrap();
        assert!(
            !s.admin.reads_need_credentials,
            "loopback: reads open by default"
        );
        let s = with_admin("").unwrap();
        assert!(!s.admin.reads_need_credentials);
        let wide = EXAMPLE.replace("listen = \"127.0.0.1:9464\"", "listen = \"0.0.0.0:9464\"");
        assert!(load(&wide).unwrap().admin.reads_need_credentials);
        let open = wide.replace(
            "token_file = \"/run/secrets/admin_token\"",
            "token_file = \"/run/secrets/admin_token\"\nread_auth = false",
        );
        assert!(!load(&open).unwrap().admin.reads_need_credentials);
        let s = with_admin(
            "allowed_hosts = [\"Pendo-Sync.internal\"]\ntrusted_user_header = \"X-Forwarded-Email\"\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.7\"]\nviewer_token_file = \"/run/secrets/viewer\"",
        )
        .unwrap();
        assert_eq!(s.admin.allowed_hosts, ["pendo-sync.internal"]);
        assert_eq!(s.admin.trusted_proxy_nets.len(), 2);
        assert!(s.admin.viewer_token_source.is_set());
        for (lines, key) in [
            (
                "allowed_hosts = [\"https://x.example/\"]",
                "admin.allowed_hosts[0]",
            ),
            (
                "trusted_user_header = \"X-Forwarded-Email\"",
                "admin.trusted_proxies",
            ),
            (
                "trusted_proxies = [\"10.0.0.0/8\"]",
                "admin.trusted_user_header",
            ),
            (
                "trusted_user_header = \"X-Email\"\ntrusted_proxies = [\"10.0.0.0/33\"]",
                "admin.trusted_proxies[0]",
            ),
            ("trusted_role = \"admin\"", "trusted_role"),
            ("session_ttl = \"5s\"", "admin.session_ttl"),
            (
                "viewer_token = \"a\"\nviewer_token_file = \"b\"",
                "admin.viewer_token",
            ),
        ] {
            let e = with_admin(lines).unwrap_err().to_string();
            assert!(e.contains(key), "{lines}: {e}");
        }
    }

    #[test]
    fn the_admin_port_s_lists_and_switch_come_from_the_environment_too() {
        let env: HashMap<String, String> = [
            ("PENDO_SYNC__ADMIN__LISTEN", "0.0.0.0:9464"),
            ("PENDO_SYNC__ADMIN__READ_AUTH", "false"),
            ("PENDO_SYNC__ADMIN__ALLOWED_HOSTS", "a.example,b.example"),
            (
                "PENDO_SYNC__ADMIN__TRUSTED_USER_HEADER",
                "X-Forwarded-Email",
            ),
            ("PENDO_SYNC__ADMIN__TRUSTED_PROXIES", "10.0.0.0/8"),
            // A secret with a comma stays whole.
            ("PENDO_SYNC__ADMIN__VIEWER_TOKEN", "a,b"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let s = Settings::from_toml_with_env(EXAMPLE, env).unwrap();
        assert!(!s.admin.reads_need_credentials);
        assert_eq!(s.admin.allowed_hosts, ["a.example", "b.example"]);
        assert_eq!(s.admin.trusted_proxy_nets.len(), 1);
        assert_eq!(
            s.admin
                .viewer_token_source
                .resolve("admin.viewer_token")
                .unwrap()
                .expose_secret(),
            "a,b"
        );
    }

    #[test]
    fn a_url_s_password_is_hidden_whatever_characters_it_holds() {
        for (url, shown) in [
            ("postgres://u:pw@db:5432/x", "postgres://u:***@db:5432/x"),
            ("postgres://u:pa/ss@db:5432/x", "postgres://u:***@db:5432/x"),
            (
                "postgres://u:a?b#c/d=@db/x?sslmode=require",
                "postgres://u:***@db/x?sslmode=require",
            ),
            ("postgres://u:p@ss@db/x", "postgres://u:***@db/x"),
            (
                "postgres://u:+/Zm9v==@[::1]:5432/x",
                "postgres://u:***@[::1]:5432/x",
            ),
            ("postgres://db/x?password=s3cret", "postgres://db/x"),
            ("postgres://u@db/x", "postgres://u@db/x"),
        ] {
            let got = redact_url(url);
            assert_eq!(got, shown, "{url}");
        }
    }

    #[test]
    fn the_compose_config_keeps_its_state_in_postgres() {
        let s = load(include_str!("../deploy/config.toml")).expect("deploy config loads");
        assert!(s.state.is_postgres());
        assert_eq!(s.state.lease_ttl, Duration::from_secs(15));
        assert!(matches!(s.state.password_source, SecretSource::File(_)));
        assert_eq!(
            s.state.display(),
            "postgres://pendo_sync@postgres:5432/pendo_sync"
        );
    }

    #[test]
    fn state_is_a_path_or_a_url_never_both_nor_neither() {
        let url = "url = \"postgres://u@db/pendo\"";
        let both = EXAMPLE.replace("[state]\n", &format!("[state]\n{url}\n"));
        let e = load(&both).unwrap_err().to_string();
        assert!(e.contains("state.path") && e.contains("state.url"), "{e}");
        let neither = EXAMPLE.replace("path = \"/var/lib/pendo-sync/state.db\"", "");
        let e = load(&neither).unwrap_err().to_string();
        assert!(e.contains("state.path") && e.contains("state.url"), "{e}");
        let pg = EXAMPLE.replace("path = \"/var/lib/pendo-sync/state.db\"", url);
        assert!(load(&pg).unwrap().state.is_postgres());
        let mysql = EXAMPLE.replace(
            "path = \"/var/lib/pendo-sync/state.db\"",
            "url = \"mysql://u:pw@db/x\"",
        );
        let e = load(&mysql).unwrap_err().to_string();
        assert!(e.starts_with("state.url:") && !e.contains("pw"), "{e}");
        let short = EXAMPLE.replace(
            "path = \"/var/lib/pendo-sync/state.db\"",
            &format!("{url}\nlease_ttl = \"1s\""),
        );
        let e = load(&short).unwrap_err().to_string();
        assert!(e.starts_with("state.lease_ttl:"), "{e}");
        let sqlite_password = EXAMPLE.replace(
            "path = \"/var/lib/pendo-sync/state.db\"",
            "path = \"/tmp/s.db\"\npassword_file = \"/run/secrets/pg\"",
        );
        let e = load(&sqlite_password).unwrap_err().to_string();
        assert!(e.starts_with("state.password_file:"), "{e}");
    }

    #[test]
    fn a_state_url_s_password_is_never_shown() {
        let text = EXAMPLE.replace(
            "path = \"/var/lib/pendo-sync/state.db\"",
            "url = \"postgres://sync:canary-db-pw-77@db:5432/pendo?sslmode=require&password=canary-db-pw-77\"",
        );
        let s = load(&text).unwrap();
        assert!(!format!("{s:?}").contains("canary-db-pw-77"));
        let shown = s.state.display();
        assert!(!shown.contains("canary-db-pw-77"), "{shown}");
        assert!(
            shown.starts_with("postgres://sync:***@db:5432/pendo"),
            "{shown}"
        );
    }

    #[test]
    fn environment_overrides_a_key() {
        let env = HashMap::from([
            ("PENDO_SYNC__PENDO__BATCH_SIZE".to_owned(), "42".to_owned()),
            ("PENDO_SYNC__PENDO__REGION".to_owned(), "eu".to_owned()),
        ]);
        let s = Settings::from_toml_with_env(EXAMPLE, env).unwrap();
        assert_eq!(s.pendo.batch_size, 42);
        assert_eq!(s.pendo.api_base(), "https://app.eu.pendo.io");
    }

    #[test]
    fn errors_name_the_key() {
        let bad = EXAMPLE.replace("batch_size = 500", "batch_size = 0");
        let e = load(&bad).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pendo.batch_size: must be between 1 and 10000, got 0"
        );
    }

    #[test]
    fn removed_account_from_is_rejected_naming_the_key() {
        let bad = EXAMPLE.replace(
            "name = \"hs-contacts\"\n",
            "name = \"hs-contacts\"\naccount_from = \"primary_company\"\n",
        );
        assert_ne!(bad, EXAMPLE, "the example has an hs-contacts mapping");
        let e = load(&bad).unwrap_err();
        assert_eq!(e.key, "mappings[1].account_from", "{e}");
        assert!(
            e.message
                .starts_with("unknown key `account_from`: it was removed"),
            "{e}"
        );
        assert!(e.message.contains("never reached Pendo"), "{e}");
        assert!(
            e.to_string().starts_with("mappings[1].account_from: "),
            "{e}"
        );
        // Elsewhere the name is just an unknown key.
        let elsewhere = EXAMPLE.replace(
            "batch_size = 500",
            "batch_size = 500\naccount_from = \"primary_company\"",
        );
        let e = load(&elsewhere).unwrap_err();
        assert_eq!(e.key, "pendo.account_from", "{e}");
        assert!(
            e.message
                .starts_with("unknown key `account_from`, expected one of"),
            "{e}"
        );
    }
}
