//! The TOML config that points pendo-sync at the simulators, built in one place: the demo, the
//! integration-test harnesses and the benchmarks describe what differs and [`SimConfig::to_toml`]
//! writes the text (every string quoted and escaped).
//!
//! ```
//! use pendo_sync::sim::config::{Auth, MappingSection, PendoSection, SalesforceSection, SimConfig};
//!
//! let text = SimConfig::new(
//!     "/tmp/state.db",
//!     PendoSection::new("key").base_url("http://127.0.0.1:4000").batch_size(100),
//! )
//! .salesforce(SalesforceSection::new(
//!     "http://127.0.0.1:4001",
//!     Auth::client_credentials("id", "secret"),
//! ))
//! .mapping(MappingSection::sf_accounts("accounts"))
//! .to_toml();
//! assert!(text.contains("batch_size = 100\n"));
//! ```

use std::fmt::{Display, Write as _};
use std::path::Path;

/// One `[mappings.fields]` entry: (Pendo field, CRM field path, type, transform).
pub type FieldSpec = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
);

/// The fields of the Salesforce simulator's `Account` records (see [`super::SF_ACCOUNT_FIELDS`]).
pub const SF_ACCOUNT: [FieldSpec; 5] = [
    ("plantier", "Plan_Tier__c", "string", None),
    ("arr", "ARR__c", "number", None),
    ("owneremail", "Owner.Email", "string", None),
    ("renewaldate", "Renewal_Date__c", "date", None),
    ("isstrategic", "Strategic__c", "boolean", None),
];

/// The fields of the HubSpot simulator's contacts (see [`super::HS_CONTACT_FIELDS`]).
pub const HS_CONTACT: [FieldSpec; 3] = [
    ("lifecyclestage", "lifecyclestage", "string", None),
    (
        "owneremail",
        "hubspot_owner_id",
        "string",
        Some("owner_email"),
    ),
    ("csmname", "hubspot_owner_id", "string", Some("owner_name")),
];

/// `s` as a TOML basic string: quoted, with `"`, `\` and control characters escaped.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Builder setters, one per `name: kind`: `str` sets `Some(v.into())` from anything that is
/// `Into<String>`, `raw` sets a `String` (raw lines), any other (single-token) type `T` sets
/// `Some(v)`.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $kind:tt),* $(,)?) => {
        $(setters!(@one [$(#[$doc])*] $name $kind);)*
    };
    (@one [$($doc:tt)*] $name:ident str) => {
        $($doc)*
        pub fn $name(mut self, v: impl Into<String>) -> Self {
            self.$name = Some(v.into());
            self
        }
    };
    (@one [$($doc:tt)*] $name:ident raw) => {
        $($doc)*
        pub fn $name(mut self, v: impl Into<String>) -> Self {
            self.$name = v.into();
            self
        }
    };
    (@one [$($doc:tt)*] $name:ident $t:ty) => {
        $($doc)*
        pub fn $name(mut self, v: $t) -> Self {
            self.$name = Some(v);
            self
        }
    };
}

/// A whole config: `[state]`, `[pendo]`, the optional CRM, `[schedule]` and `[admin]` sections,
/// the mappings, and raw TOML after them.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub state_path: String,
    /// `[state] url` (PostgreSQL) instead of `path`.
    pub state_url: Option<String>,
    pub pendo: PendoSection,
    pub salesforce: Option<SalesforceSection>,
    pub hubspot: Option<HubspotSection>,
    /// `[schedule]` keys; the section is written when any is set.
    pub poll_interval: Option<String>,
    pub reconcile_interval: Option<String>,
    pub overlap: Option<String>,
    /// `[admin]` keys (`listen`, `token`, `viewer_token`) and raw lines after them
    /// (`allowed_hosts`, `read_auth`, the trusted proxy); the section is written when any is set.
    pub admin_listen: Option<String>,
    pub admin_token: Option<String>,
    pub admin_viewer_token: Option<String>,
    pub admin_extra: String,
    pub mappings: Vec<MappingSection>,
    /// Raw TOML appended after the mappings (more `[[mappings]]`, say).
    pub tail: String,
}

/// `[pendo]`. Every key but the integration key is optional; [`PendoSection::new`] sets
/// `max_in_flight = 2` (what most callers use) and nothing else.
#[derive(Debug, Clone)]
pub struct PendoSection {
    pub base_url: Option<String>,
    pub integration_key: Option<String>,
    pub integration_key_file: Option<String>,
    pub batch_size: Option<usize>,
    pub requests_per_second: Option<f64>,
    pub max_in_flight: Option<u32>,
    pub timeout: Option<String>,
    pub max_attempts: Option<u32>,
    pub create_missing: Option<bool>,
    pub unmatched_retry: Option<String>,
    pub discovery_interval: Option<String>,
    pub retry_initial: Option<String>,
    pub retry_max: Option<String>,
    /// Raw lines appended to the section.
    pub extra: String,
}

/// `auth` and the credential keys of `[salesforce]` or `[hubspot]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Auth {
    /// The `auth` key; `None` leaves it out.
    pub kind: Option<String>,
    /// Credential keys (`client_id`, `client_secret`, `access_token`, `private_key`, ...) and
    /// their values, written in this order.
    pub keys: Vec<(String, String)>,
}

/// `[salesforce]`.
#[derive(Debug, Clone)]
pub struct SalesforceSection {
    pub login_url: String,
    pub auth: Auth,
    pub requests_per_second: Option<f64>,
    pub timeout: Option<String>,
    /// Raw lines appended to the section.
    pub extra: String,
}

/// `[hubspot]`.
#[derive(Debug, Clone)]
pub struct HubspotSection {
    pub base_url: String,
    pub auth: Auth,
    pub requests_per_10s: Option<u32>,
    pub search_requests_per_second: Option<f64>,
    pub timeout: Option<String>,
    /// Raw lines appended to the section.
    pub extra: String,
}

/// One `[[mappings]]` entry.
#[derive(Debug, Clone)]
pub struct MappingSection {
    pub name: String,
    pub source: String,
    pub object: String,
    pub kind: String,
    pub id: String,
    pub filter: Option<String>,
    pub on_delete: Option<String>,
    pub id_case: Option<String>,
    pub fields: Vec<FieldSpec>,
    /// Raw lines written after the mapping's keys, before `[mappings.fields]`.
    pub extra: String,
}

impl SimConfig {
    pub fn new(state_path: impl AsRef<Path>, pendo: PendoSection) -> SimConfig {
        SimConfig {
            state_path: state_path.as_ref().display().to_string(),
            state_url: None,
            pendo,
            salesforce: None,
            hubspot: None,
            poll_interval: None,
            reconcile_interval: None,
            overlap: None,
            admin_listen: None,
            admin_token: None,
            admin_viewer_token: None,
            admin_extra: String::new(),
            mappings: Vec::new(),
            tail: String::new(),
        }
    }

    /// The state in PostgreSQL at `url` instead of the SQLite file.
    pub fn state_url(mut self, url: Option<String>) -> Self {
        self.state_url = url;
        self
    }

    pub fn salesforce(mut self, section: SalesforceSection) -> Self {
        self.salesforce = Some(section);
        self
    }

    pub fn hubspot(mut self, section: HubspotSection) -> Self {
        self.hubspot = Some(section);
        self
    }

    setters! {
        poll_interval: str,
        reconcile_interval: str,
        overlap: str,
        admin_listen: str,
        admin_token: str,
        admin_viewer_token: str,
        /// Raw TOML lines in `[admin]`.
        admin_extra: raw,
        /// Raw TOML appended after the mappings.
        tail: raw,
    }

    pub fn mapping(mut self, mapping: MappingSection) -> Self {
        self.mappings.push(mapping);
        self
    }

    /// The config text.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        header(&mut out, "[state]");
        match &self.state_url {
            Some(url) => {
                kv_str(&mut out, "url", url);
                kv_str(&mut out, "lease_ttl", "3s");
            }
            None => kv_str(&mut out, "path", &self.state_path),
        }

        let p = &self.pendo;
        header(&mut out, "[pendo]");
        opt_str(&mut out, "base_url", &p.base_url);
        opt_str(&mut out, "integration_key", &p.integration_key);
        opt_str(&mut out, "integration_key_file", &p.integration_key_file);
        opt(&mut out, "batch_size", &p.batch_size);
        opt(&mut out, "requests_per_second", &p.requests_per_second);
        opt(&mut out, "max_in_flight", &p.max_in_flight);
        opt_str(&mut out, "timeout", &p.timeout);
        opt(&mut out, "max_attempts", &p.max_attempts);
        opt(&mut out, "create_missing", &p.create_missing);
        opt_str(&mut out, "unmatched_retry", &p.unmatched_retry);
        opt_str(&mut out, "discovery_interval", &p.discovery_interval);
        opt_str(&mut out, "retry_initial", &p.retry_initial);
        opt_str(&mut out, "retry_max", &p.retry_max);
        raw(&mut out, &p.extra);

        if let Some(s) = &self.salesforce {
            header(&mut out, "[salesforce]");
            kv_str(&mut out, "login_url", &s.login_url);
            s.auth.write(&mut out);
            opt(&mut out, "requests_per_second", &s.requests_per_second);
            opt_str(&mut out, "timeout", &s.timeout);
            raw(&mut out, &s.extra);
        }

        if let Some(h) = &self.hubspot {
            header(&mut out, "[hubspot]");
            kv_str(&mut out, "base_url", &h.base_url);
            h.auth.write(&mut out);
            opt(&mut out, "requests_per_10s", &h.requests_per_10s);
            opt(
                &mut out,
                "search_requests_per_second",
                &h.search_requests_per_second,
            );
            opt_str(&mut out, "timeout", &h.timeout);
            raw(&mut out, &h.extra);
        }

        let schedule = [
            ("poll_interval", &self.poll_interval),
            ("reconcile_interval", &self.reconcile_interval),
            ("overlap", &self.overlap),
        ];
        let admin = [
            ("listen", &self.admin_listen),
            ("token", &self.admin_token),
            ("viewer_token", &self.admin_viewer_token),
        ];
        for (name, keys) in [("[schedule]", &schedule[..]), ("[admin]", &admin[..])] {
            let extra = if name == "[admin]" {
                self.admin_extra.as_str()
            } else {
                ""
            };
            if keys.iter().any(|(_, v)| v.is_some()) || !extra.is_empty() {
                header(&mut out, name);
                for (key, value) in keys {
                    opt_str(&mut out, key, value);
                }
                raw(&mut out, extra);
            }
        }

        for m in &self.mappings {
            header(&mut out, "[[mappings]]");
            kv_str(&mut out, "name", &m.name);
            kv_str(&mut out, "source", &m.source);
            kv_str(&mut out, "object", &m.object);
            kv_str(&mut out, "kind", &m.kind);
            kv_str(&mut out, "id", &m.id);
            opt_str(&mut out, "id_case", &m.id_case);
            opt_str(&mut out, "filter", &m.filter);
            opt_str(&mut out, "on_delete", &m.on_delete);
            raw(&mut out, &m.extra);
            if !m.fields.is_empty() {
                out.push_str(&fields_table(&m.fields));
            }
        }

        if !self.tail.is_empty() {
            out.push('\n');
            raw(&mut out, &self.tail);
        }
        out
    }
}

impl PendoSection {
    /// `[pendo]` with an inline integration key and `max_in_flight = 2`.
    pub fn new(integration_key: impl Into<String>) -> PendoSection {
        PendoSection {
            base_url: None,
            integration_key: Some(integration_key.into()),
            integration_key_file: None,
            batch_size: None,
            requests_per_second: None,
            max_in_flight: Some(2),
            timeout: None,
            max_attempts: None,
            create_missing: None,
            unmatched_retry: None,
            discovery_interval: None,
            retry_initial: None,
            retry_max: None,
            extra: String::new(),
        }
    }

    setters! {
        base_url: str,
        batch_size: usize,
        requests_per_second: f64,
        timeout: str,
        max_attempts: u32,
        create_missing: bool,
        unmatched_retry: str,
        discovery_interval: str,
        retry_initial: str,
        retry_max: str,
        /// Raw lines appended to `[pendo]`.
        extra: raw,
    }

    /// Reads the key from `path` (`integration_key_file`) instead of the inline key.
    pub fn integration_key_file(mut self, path: impl AsRef<Path>) -> Self {
        self.integration_key = None;
        self.integration_key_file = Some(path.as_ref().display().to_string());
        self
    }

    /// `None` leaves the key out.
    pub fn max_in_flight(mut self, v: Option<u32>) -> Self {
        self.max_in_flight = v;
        self
    }
}

impl Auth {
    /// `auth = "<kind>"` and no credential yet.
    pub fn new(kind: impl Into<String>) -> Auth {
        Auth {
            kind: Some(kind.into()),
            keys: Vec::new(),
        }
    }

    /// Salesforce's client-credentials flow.
    pub fn client_credentials(
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> Auth {
        Auth::new("client_credentials")
            .key("client_id", client_id)
            .key("client_secret", client_secret)
    }

    /// A HubSpot private-app token (no `auth` key: the default).
    pub fn access_token(token: impl Into<String>) -> Auth {
        Auth::default().key("access_token", token)
    }

    /// Adds a credential key.
    pub fn key(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.keys.push((key.into(), value.into()));
        self
    }

    fn write(&self, out: &mut String) {
        opt_str(out, "auth", &self.kind);
        for (k, v) in &self.keys {
            kv_str(out, k, v);
        }
    }
}

impl SalesforceSection {
    pub fn new(login_url: impl Into<String>, auth: Auth) -> SalesforceSection {
        SalesforceSection {
            login_url: login_url.into(),
            auth,
            requests_per_second: None,
            timeout: None,
            extra: String::new(),
        }
    }

    setters! {
        requests_per_second: f64,
        timeout: str,
        /// Raw lines appended to `[salesforce]`.
        extra: raw,
    }
}

impl HubspotSection {
    pub fn new(base_url: impl Into<String>, auth: Auth) -> HubspotSection {
        HubspotSection {
            base_url: base_url.into(),
            auth,
            requests_per_10s: None,
            search_requests_per_second: None,
            timeout: None,
            extra: String::new(),
        }
    }

    setters! {
        requests_per_10s: u32,
        search_requests_per_second: f64,
        timeout: str,
        /// Raw lines appended to `[hubspot]`.
        extra: raw,
    }
}

impl MappingSection {
    /// A mapping with no optional key and no field.
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        object: impl Into<String>,
        kind: impl Into<String>,
        id: impl Into<String>,
    ) -> MappingSection {
        MappingSection {
            name: name.into(),
            source: source.into(),
            object: object.into(),
            kind: kind.into(),
            id: id.into(),
            filter: None,
            on_delete: None,
            id_case: None,
            fields: Vec::new(),
            extra: String::new(),
        }
    }

    /// The Salesforce simulator's accounts: `Account` → account by `Id`,
    /// `on_delete = "clear"`, the [`SF_ACCOUNT`] fields.
    pub fn sf_accounts(name: impl Into<String>) -> MappingSection {
        MappingSection::new(name, "salesforce", "Account", "account", "Id")
            .on_delete(Some("clear"))
            .fields(&SF_ACCOUNT)
    }

    /// The HubSpot simulator's contacts: `hs-contacts`, `contacts` → visitor by lower-cased
    /// `email`, `on_delete = "keep"`, the [`HS_CONTACT`] fields.
    pub fn hs_contacts() -> MappingSection {
        MappingSection::new("hs-contacts", "hubspot", "contacts", "visitor", "email")
            .id_case("lower")
            .on_delete(Some("keep"))
            .fields(&HS_CONTACT)
    }

    setters! {
        filter: str,
        id_case: str,
        /// Raw lines written after the mapping's keys.
        extra: raw,
    }

    /// `None` leaves the key out.
    pub fn on_delete(mut self, v: Option<&str>) -> Self {
        self.on_delete = v.map(str::to_owned);
        self
    }

    /// Replaces the fields.
    pub fn fields(mut self, fields: &[FieldSpec]) -> Self {
        self.fields = fields.to_vec();
        self
    }

    /// Keeps only the fields whose Pendo name is in `names`.
    pub fn only(mut self, names: &[&str]) -> Self {
        self.fields.retain(|f| names.contains(&f.0));
        self
    }
}

/// A `  [mappings.fields]` table, columns aligned.
pub fn fields_table(fields: &[FieldSpec]) -> String {
    let name_width = fields.iter().map(|f| f.0.len()).max().unwrap_or(0);
    let from_width = fields
        .iter()
        .map(|f| quote(f.1).len() + 1)
        .max()
        .unwrap_or(0);
    let mut out = String::from("  [mappings.fields]\n");
    for (name, from, ty, transform) in fields {
        let from = format!("{},", quote(from));
        let _ = write!(
            out,
            "  {name:<name_width$} = {{ from = {from:<from_width$} type = {}",
            quote(ty)
        );
        if let Some(t) = transform {
            let _ = write!(out, ", transform = {}", quote(t));
        }
        out.push_str(" }\n");
    }
    out
}

fn header(out: &mut String, name: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(name);
    out.push('\n');
}

fn kv(out: &mut String, key: &str, value: impl Display) {
    let _ = writeln!(out, "{key} = {value}");
}

fn kv_str(out: &mut String, key: &str, value: &str) {
    kv(out, key, quote(value));
}

fn opt<T: Display>(out: &mut String, key: &str, value: &Option<T>) {
    if let Some(v) = value {
        kv(out, key, v);
    }
}

fn opt_str(out: &mut String, key: &str, value: &Option<String>) {
    if let Some(v) = value {
        kv_str(out, key, v);
    }
}

fn raw(out: &mut String, lines: &str) {
    if !lines.is_empty() {
        out.push_str(lines);
        if !lines.ends_with('\n') {
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_lists_render_as_the_text_constants() {
        assert_eq!(fields_table(&SF_ACCOUNT), super::super::SF_ACCOUNT_FIELDS);
        assert_eq!(fields_table(&HS_CONTACT), super::super::HS_CONTACT_FIELDS);
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(quote(r#"a "b" \c"#), r#""a \"b\" \\c""#);
        assert_eq!(quote("x\ny"), r#""x\ny""#);
    }

    #[test]
    fn a_full_config_parses() {
        let text = SimConfig::new(
            "/tmp/sim-config-test.db",
            PendoSection::new("k\"ey")
                .base_url("http://127.0.0.1:9")
                .batch_size(10)
                .requests_per_second(2.5)
                .timeout("5s"),
        )
        .salesforce(
            SalesforceSection::new("http://127.0.0.1:9", Auth::client_credentials("id", "s"))
                .requests_per_second(50.0),
        )
        .hubspot(
            HubspotSection::new("http://127.0.0.1:9", Auth::access_token("t"))
                .requests_per_10s(100),
        )
        .poll_interval("1s")
        .admin_token("a")
        .mapping(MappingSection::sf_accounts("sf-accounts").filter("Type = 'Customer'"))
        .mapping(MappingSection::hs_contacts())
        .to_toml();
        assert!(text.contains("requests_per_second = 50\n"), "{text}");
        let settings =
            crate::config::Settings::from_toml_with_env(&text, std::collections::HashMap::new())
                .unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(settings.mappings.len(), 2);
        assert_eq!(settings.mappings[0].fields.len(), 5);
    }
}
