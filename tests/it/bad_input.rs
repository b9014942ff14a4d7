//! Guarantee 7, as a catalogue: bad configs, bad CRM data and odd Pendo answers. Each case states
//! its exact outcome: the key, record or field the message names, and that the rest of the work
//! went on (nothing lost).

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use pendo_sync::config::Settings;
use pendo_sync::domain::Kind;
use pendo_sync::engine::Mode;
use pendo_sync::sim::hubspot::SimFaults;
use pendo_sync::sim::pendo::PendoFaults;
use pendo_sync::sim::salesforce::SalesforceFault;
use pendo_sync::store::{QueueFilter, QueueState};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::crm_harness::{Crm, CrmOptions, hs_contact_id, sf_account_id};
use crate::helpers::{ACCOUNT_FIELDS, Options, TestApp, account, account_id};

// ---- configuration ------------------------------------------------------------------------

/// A small valid config with every section; each case edits it.
fn base() -> String {
    format!("{HEAD}{MAPPINGS}")
}

const HEAD: &str = r#"[state]
path = "/tmp/pendo-sync-bad-input.db"

[pendo]
region = "us"
integration_key = "k"
batch_size = 100
requests_per_second = 5
timeout = "30s"

[salesforce]
login_url = "https://login.salesforce.com"
auth = "client_credentials"
client_id = "cid"
client_secret = "s"
requests_per_second = 10

[hubspot]
base_url = "https://api.hubapi.com"
access_token = "t"
requests_per_10s = 90
search_requests_per_second = 4

[schedule]
poll_interval = "60s"

[admin]
listen = "127.0.0.1:9464"

"#;

const MAPPINGS: &str = r#"[[mappings]]
name = "sf-accounts"
source = "salesforce"
object = "Account"
kind = "account"
id = "Id"
  [mappings.fields]
  plantier = { from = "Plan_Tier__c", type = "string" }
  arr      = { from = "ARR__c",       type = "number" }

[[mappings]]
name = "hs-contacts"
source = "hubspot"
object = "contacts"
kind = "visitor"
id = "email"
  [mappings.fields]
  owneremail = { from = "hubspot_owner_id", type = "string", transform = "owner_email" }
"#;

/// One edit of [`base`]: replace `from` (first occurrence) with `to`.
struct ConfigCase {
    name: &'static str,
    from: &'static str,
    to: &'static str,
    env: &'static [(&'static str, &'static str)],
    /// The exact key the error names.
    key: &'static str,
    /// A part of the message that says what is wrong.
    says: &'static str,
}

const fn case(
    name: &'static str,
    from: &'static str,
    to: &'static str,
    key: &'static str,
    says: &'static str,
) -> ConfigCase {
    ConfigCase {
        name,
        from,
        to,
        env: &[],
        key,
        says,
    }
}

const CONFIG_CASES: &[ConfigCase] = &[
    case(
        "unknown key",
        "batch_size = 100",
        "batch_size = 100\nbatchsize = 3",
        "pendo.batchsize",
        "unknown key `batchsize`, expected one of `region`",
    ),
    case(
        "unknown section",
        "[schedule]",
        "[schedul]",
        "schedul",
        "unknown key `schedul`",
    ),
    case(
        "unknown key in a field",
        "type = \"number\" }",
        "type = \"number\", default = 0 }",
        "mappings[0].fields.arr.default",
        "unknown key `default`, expected one of `from`, `type`, `transform`, `on_null`",
    ),
    case(
        "bad duration",
        "timeout = \"30s\"",
        "timeout = \"soon\"",
        "pendo.timeout",
        "\"soon\" is not a duration",
    ),
    case(
        "zero duration",
        "poll_interval = \"60s\"",
        "poll_interval = \"0s\"",
        "schedule.poll_interval",
        "must be longer than zero",
    ),
    case(
        "bad region",
        "region = \"us\"",
        "region = \"mars\"",
        "pendo.region",
        "must be one of us, eu, us1, jp, au; got \"mars\"",
    ),
    case(
        "a Pendo field mapped twice for one kind",
        "transform = \"owner_email\" }\n",
        "transform = \"owner_email\" }\n[[mappings]]\nname = \"hs-companies\"\nsource = \"hubspot\"\nobject = \"companies\"\nkind = \"account\"\nid = \"domain\"\n  [mappings.fields]\n  plantier = { from = \"plan\", type = \"string\" }\n",
        "mappings[2].fields.plantier",
        "the account field \"plantier\" is already mapped by mapping \"sf-accounts\"",
    ),
    case(
        "both secret twins",
        "integration_key = \"k\"",
        "integration_key = \"k\"\nintegration_key_file = \"/run/secrets/k\"",
        "pendo.integration_key",
        "both pendo.integration_key and pendo.integration_key_file are set",
    ),
    case(
        "both twins of admin.token",
        "listen = \"127.0.0.1:9464\"",
        "listen = \"127.0.0.1:9464\"\ntoken = \"a\"\ntoken_file = \"/run/a\"",
        "admin.token",
        "both admin.token and admin.token_file are set",
    ),
    case(
        "a missing secret",
        "integration_key = \"k\"",
        "",
        "pendo.integration_key",
        "missing: set pendo.integration_key_file",
    ),
    case(
        "an invalid URL",
        "region = \"us\"",
        "base_url = \"not a url\"",
        "pendo.base_url",
        "is not a valid URL",
    ),
    case(
        "a URL that is not http(s)",
        "base_url = \"https://api.hubapi.com\"",
        "base_url = \"ftp://api.hubapi.com\"",
        "hubspot.base_url",
        "must be an http(s) URL",
    ),
    case(
        "zero Pendo quota",
        "requests_per_second = 5",
        "requests_per_second = 0",
        "pendo.requests_per_second",
        "must be greater than 0",
    ),
    case(
        "negative Salesforce quota",
        "requests_per_second = 10",
        "requests_per_second = -1",
        "salesforce.requests_per_second",
        "must be greater than 0 and at most 10000, got -1",
    ),
    case(
        "zero HubSpot quota",
        "requests_per_10s = 90",
        "requests_per_10s = 0",
        "hubspot.requests_per_10s",
        "must be between 1 and 1000, got 0",
    ),
    case(
        "zero HubSpot search quota",
        "search_requests_per_second = 4",
        "search_requests_per_second = 0",
        "hubspot.search_requests_per_second",
        "must be greater than 0",
    ),
    case(
        "negative batch size",
        "batch_size = 100",
        "batch_size = -5",
        "pendo.batch_size",
        "-5",
    ),
    case(
        "an unknown source",
        "source = \"hubspot\"",
        "source = \"zoho\"",
        "mappings[1].source",
        "zoho",
    ),
    case(
        "an unknown field type",
        "type = \"number\"",
        "type = \"currency\"",
        "mappings[0].fields.arr.type",
        "currency",
    ),
    case(
        "an implausible from path",
        "from = \"ARR__c\"",
        "from = \"ARR__c; DROP TABLE\"",
        "mappings[0].fields.arr.from",
        "is not a plausible CRM field path",
    ),
    case(
        "an empty segment in a from path",
        "from = \"ARR__c\"",
        "from = \"Owner..Email\"",
        "mappings[0].fields.arr.from",
        "\"Owner..Email\" is not a plausible CRM field path",
    ),
    case(
        "a transform with a non-string type",
        "type = \"string\", transform",
        "type = \"number\", transform",
        "mappings[1].fields.owneremail.type",
        "transform owner_email always yields a string",
    ),
    case(
        "a transform on Salesforce",
        "plantier = { from = \"Plan_Tier__c\", type = \"string\" }",
        "plantier = { from = \"Plan_Tier__c\", type = \"string\", transform = \"owner_name\" }",
        "mappings[0].fields.plantier.transform",
        "owner_name only works on HubSpot owner ids",
    ),
    case(
        "no mappings at all",
        MAPPINGS,
        "",
        "mappings",
        "at least one [[mappings]] entry is needed",
    ),
    case(
        "a mapping with no fields",
        "  owneremail = { from = \"hubspot_owner_id\", type = \"string\", transform = \"owner_email\" }\n",
        "",
        "mappings[1].fields",
        "maps no fields",
    ),
    case(
        "a source without its section",
        "[hubspot]\nbase_url = \"https://api.hubapi.com\"\naccess_token = \"t\"\nrequests_per_10s = 90\nsearch_requests_per_second = 4\n",
        "",
        "mappings[1].source",
        "is \"hubspot\" but there is no [hubspot] section",
    ),
    case(
        "an implausible id path",
        "id = \"Id\"",
        "id = \"Account Id\"",
        "mappings[0].id",
        "\"Account Id\" is not a field path",
    ),
    case(
        "the same mapping name twice",
        "name = \"hs-contacts\"",
        "name = \"sf-accounts\"",
        "mappings[1].name",
        "\"sf-accounts\" is used by two mappings",
    ),
    case(
        "jwt without a private key",
        "auth = \"client_credentials\"",
        "auth = \"jwt\"\nusername = \"u@x.test\"",
        "salesforce.private_key",
        "is required when auth = \"jwt\"",
    ),
    case(
        "a bad api_version",
        "auth = \"client_credentials\"",
        "api_version = \"62\"\nauth = \"client_credentials\"",
        "salesforce.api_version",
        "must look like v62.0, got \"62\"",
    ),
    case(
        "a bad admin listen address",
        "listen = \"127.0.0.1:9464\"",
        "listen = \"localhost\"",
        "admin.listen",
        "must be host:port",
    ),
    case(
        "retry_max shorter than retry_initial",
        "timeout = \"30s\"",
        "timeout = \"30s\"\nretry_initial = \"10s\"\nretry_max = \"1s\"",
        "pendo.retry_max",
        "must not be shorter than pendo.retry_initial",
    ),
    case(
        "a HubSpot filter that is not property=value",
        "id = \"email\"",
        "id = \"email\"\nfilter = \"lifecyclestage\"",
        "mappings[1].filter",
        "\"lifecyclestage\" is not property=value",
    ),
    ConfigCase {
        name: "a bad value from the environment",
        from: "",
        to: "",
        env: &[("PENDO_SYNC__PENDO__TIMEOUT", "forever")],
        key: "pendo.timeout",
        says: "\"forever\" is not a duration",
    },
    ConfigCase {
        name: "an unknown key from the environment",
        from: "",
        to: "",
        env: &[("PENDO_SYNC__PENDO__TLS_VERIFY", "false")],
        key: "pendo.tls_verify",
        says: "unknown key `tls_verify`",
    },
];

#[test]
fn every_config_mistake_names_its_key() {
    let mut failures = Vec::new();
    for c in CONFIG_CASES {
        assert!(
            base().contains(c.from),
            "{}: {:?} not in the base",
            c.name,
            c.from
        );
        let text = base().replacen(c.from, c.to, 1);
        let env: HashMap<String, String> = c
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match Settings::from_toml_with_env(&text, env) {
            Ok(_) => failures.push(format!("{}: accepted", c.name)),
            Err(e) if e.key != c.key || !e.message.contains(c.says) => failures.push(format!(
                "{}: expected key {:?} saying {:?}, got {:?}: {:?}",
                c.name, c.key, c.says, e.key, e.message
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The base itself is valid: every failure above is the edit's doing.
    Settings::from_toml_with_env(&base(), HashMap::new()).expect("the base config is valid");
}

/// An unknown enum value reads like the other config errors: the value, the accepted ones, no
/// Rust vocabulary (the config crate's own message was "enum Source does not have variant
/// constructor zoho for key `mappings[1]source`").
#[test]
fn unknown_enum_values_list_the_accepted_ones() {
    let cases = [
        (
            "source = \"hubspot\"",
            "source = \"zoho\"",
            &["salesforce", "hubspot"][..],
        ),
        (
            "type = \"number\"",
            "type = \"currency\"",
            &["string", "number", "boolean", "date"][..],
        ),
        (
            "kind = \"visitor\"",
            "kind = \"user\"",
            &["visitor", "account"][..],
        ),
    ];
    for (from, to, accepted) in cases {
        let e = Settings::from_toml_with_env(&base().replacen(from, to, 1), HashMap::new())
            .unwrap_err();
        for a in accepted {
            assert!(
                e.message.contains(a),
                "{to}: {a:?} not offered in {:?}",
                e.message
            );
        }
        assert!(!e.message.contains("variant"), "{to}: {:?}", e.message);
    }
}

/// A secret given in the environment is taken as written: "007123" must not arrive as "7123",
/// "1e5" as "100000" or "TRUE" as "true" (which `config`'s `try_parsing(true)` used to do).
#[test]
fn secrets_from_the_environment_are_taken_verbatim() {
    use secrecy::ExposeSecret;
    let text = base().replacen("integration_key = \"k\"\n", "", 1);
    for value in ["007123", "1e5", "+123", "12.50", "TRUE"] {
        let env = HashMap::from([(
            "PENDO_SYNC__PENDO__INTEGRATION_KEY".to_owned(),
            value.to_owned(),
        )]);
        let s = Settings::from_toml_with_env(&text, env).expect("loads");
        let key = s
            .pendo
            .integration_key_source
            .resolve("pendo.integration_key")
            .unwrap();
        assert_eq!(key.expose_secret(), value);
    }
}

fn pendo_sync() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pendo-sync"))
}

/// Secrets are read when a command starts: a file that is missing, a directory, empty, or not
/// a key at all stops the command with exit 2 and the key's name, before any network call.
#[test]
fn unusable_secret_files_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let missing = dir.path().join("missing");
    let a_dir = dir.path().join("a-directory");
    std::fs::create_dir(&a_dir).unwrap();
    let state = dir.path().join("state.db");
    let base = base().replace("/tmp/pendo-sync-bad-input.db", state.to_str().unwrap());
    let jwt = |file: &std::path::Path| {
        format!(
            "auth = \"jwt\"\nusername = \"u@x.test\"\nprivate_key_file = \"{}\"",
            file.display()
        )
    };
    let cases: Vec<(&str, String, String, String)> = vec![
        (
            "a missing file",
            "integration_key = \"k\"".into(),
            format!("integration_key_file = \"{}\"", missing.display()),
            format!(
                "pendo.integration_key_file: cannot read {}",
                missing.display()
            ),
        ),
        (
            "a directory",
            "integration_key = \"k\"".into(),
            format!("integration_key_file = \"{}\"", a_dir.display()),
            format!(
                "pendo.integration_key_file: cannot read {}",
                a_dir.display()
            ),
        ),
        (
            "an empty file",
            "access_token = \"t\"".into(),
            format!("access_token_file = \"{}\"", empty.display()),
            format!("hubspot.access_token_file: {} is empty", empty.display()),
        ),
        (
            "a Salesforce key file that is a directory",
            "auth = \"client_credentials\"".into(),
            jwt(&a_dir),
            format!(
                "salesforce.private_key_file: cannot read {}",
                a_dir.display()
            ),
        ),
        (
            "a Salesforce key that is not a PEM key",
            "auth = \"client_credentials\"".into(),
            jwt(&not_pem),
            "salesforce.private_key: is not an RSA private key in PEM form".into(),
        ),
    ];
    for (name, from, to, expected) in cases {
        let config = dir.path().join("config.toml");
        std::fs::write(&config, base.replacen(&from, &to, 1)).unwrap();
        let out = pendo_sync()
            .arg("--config")
            .arg(&config)
            .arg("sync")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(&expected),
            "{name}: expected {expected:?} in {stderr}"
        );
    }
}

// ---- CRM data -----------------------------------------------------------------------------

/// What a case's record must come to.
enum Outcome {
    /// Pendo holds exactly these fields for the Pendo id.
    Sent(&'static str, Value),
    /// Set aside with this reason; the detail names all of these.
    SetAside(&'static str, &'static [&'static str]),
    /// Skipped as having no Pendo id (counted, listed as missing_id).
    NoId,
}

struct DataCase {
    name: &'static str,
    crm_id: &'static str,
    /// Field edits applied to a good account record.
    edits: Value,
    outcome: Outcome,
}

fn data_cases() -> Vec<DataCase> {
    use Outcome::*;
    // 5,000 characters (not bytes), ending in multi-byte ones: a cut would show.
    let long = "x".repeat(4_992) + "…ünïcødé";
    assert_eq!(long.chars().count(), 5_000);
    let long: &'static str = Box::leak(long.into_boxed_str());
    vec![
        DataCase {
            name: "non-numeric ARR with a thousands separator",
            crm_id: "001BAD-ARR",
            edits: json!({"ARR__c": "1,200"}),
            outcome: SetAside(
                "bad_value",
                &["001BAD-ARR", "arr", "ARR__c", "\"1,200\" is not a number"],
            ),
        },
        DataCase {
            name: "a currency sign in ARR",
            crm_id: "001BAD-USD",
            edits: json!({"ARR__c": "$1200"}),
            outcome: SetAside(
                "bad_value",
                &["001BAD-USD", "arr", "\"$1200\" is not a number"],
            ),
        },
        DataCase {
            name: "NaN",
            crm_id: "001BAD-NAN",
            edits: json!({"ARR__c": "NaN"}),
            outcome: SetAside(
                "bad_value",
                &["001BAD-NAN", "arr", "\"NaN\" is not a number"],
            ),
        },
        DataCase {
            name: "Infinity",
            crm_id: "001BAD-INF",
            edits: json!({"ARR__c": "Infinity"}),
            outcome: SetAside(
                "bad_value",
                &["001BAD-INF", "arr", "\"Infinity\" is not a number"],
            ),
        },
        DataCase {
            name: "an empty id",
            crm_id: "001EMPTY",
            edits: json!({"Id": "   "}),
            outcome: NoId,
        },
        DataCase {
            name: "a null id",
            crm_id: "001NULLID",
            edits: json!({"Id": null}),
            outcome: NoId,
        },
        DataCase {
            name: "an invalid date",
            crm_id: "001BAD-DATE",
            edits: json!({"Renewal_Date__c": "2027-02-30"}),
            outcome: SetAside(
                "bad_value",
                &[
                    "001BAD-DATE",
                    "renewaldate",
                    "Renewal_Date__c",
                    "\"2027-02-30\" is not a date",
                ],
            ),
        },
        DataCase {
            name: "a date in a local format",
            crm_id: "001BAD-DMY",
            edits: json!({"Renewal_Date__c": "31/12/2027"}),
            outcome: SetAside("bad_value", &["001BAD-DMY", "\"31/12/2027\" is not a date"]),
        },
        DataCase {
            name: "a boolean that is neither",
            crm_id: "001BAD-BOOL",
            edits: json!({"Strategic__c": "maybe"}),
            outcome: SetAside(
                "bad_value",
                &["001BAD-BOOL", "isstrategic", "expected true or false"],
            ),
        },
        DataCase {
            name: "an object where text belongs",
            crm_id: "001BAD-OBJ",
            edits: json!({"Plan_Tier__c": {"label": "Gold"}}),
            outcome: SetAside("bad_value", &["001BAD-OBJ", "plantier", "expected text"]),
        },
        DataCase {
            name: "a 5,000-character string passes intact",
            crm_id: "001LONG",
            edits: json!({"Plan_Tier__c": long}),
            outcome: Sent("plantier", json!(long)),
        },
        DataCase {
            name: "a unicode id passes exactly",
            crm_id: "001-Zürich-東京",
            edits: json!({"Id": "001-Zürich-東京"}),
            outcome: Sent("plantier", json!("Starter")),
        },
        DataCase {
            name: "an emoji id passes exactly",
            crm_id: "001🚀launch",
            edits: json!({"Id": "001🚀launch", "Plan_Tier__c": "Rocket 🚀"}),
            outcome: Sent("plantier", json!("Rocket 🚀")),
        },
        DataCase {
            name: "an id with slashes passes",
            crm_id: "acme/eu/001",
            edits: json!({"Id": "acme/eu/001"}),
            outcome: Sent("plantier", json!("Starter")),
        },
        DataCase {
            name: "a null relationship is a null field, not an error",
            crm_id: "001NOOWNER",
            edits: json!({"Owner": null}),
            outcome: Sent("owneremail", Value::Null),
        },
    ]
}

/// Every bad record of one page is set aside with a message naming it; every good one (and the
/// odd-but-valid ones) reaches Pendo exactly.
#[tokio::test]
async fn bad_crm_records_are_set_aside_and_the_rest_arrive_exactly() {
    let t = TestApp::with(Options {
        create_missing: true,
        ..Options::default()
    })
    .await;
    t.seed(10);
    let cases = data_cases();
    for c in &cases {
        let mut rec = account(0); // plantier Starter, an owner, a valid date
        rec["Id"] = json!(c.crm_id);
        for (k, v) in c.edits.as_object().unwrap() {
            rec[k] = v.clone();
        }
        t.crm.upsert("Account", c.crm_id, rec);
    }
    // Two CRM records claiming one Pendo id with different values: ambiguous, neither is sent.
    let mut a = account(1);
    a["Id"] = json!("001SHARED");
    let mut b = account(2);
    b["Id"] = json!("001SHARED");
    t.crm.upsert("Account", "001DUP-A", a);
    t.crm.upsert("Account", "001DUP-B", b);
    // Two CRM records with one Pendo id and the same values are not a conflict.
    let mut same = account(3);
    same["Id"] = json!("001TWINS");
    t.crm.upsert("Account", "001TWIN-A", same.clone());
    t.crm.upsert("Account", "001TWIN-B", same);

    let report = t.sync().await;
    let cycle = &report.cycles[0];
    assert_eq!(cycle.skipped_empty_ids, 2);
    assert_eq!(cycle.ambiguous, 1);
    let app = t.app().await;
    let invalid = app.store.invalid_records(None).await.unwrap();
    app.store.close().await;
    let held = t.pendo.values(Kind::Account);

    for c in &cases {
        let rows: Vec<_> = invalid.iter().filter(|r| r.crm_id == c.crm_id).collect();
        match &c.outcome {
            Outcome::Sent(field, value) => {
                assert!(rows.is_empty(), "{}: set aside: {rows:?}", c.name);
                let fields = held
                    .get(c.crm_id)
                    .unwrap_or_else(|| panic!("{}: Pendo has no {:?}", c.name, c.crm_id));
                assert_eq!(
                    fields.get(*field),
                    (!value.is_null()).then_some(value),
                    "{}",
                    c.name
                );
            }
            Outcome::SetAside(reason, names) => {
                assert_eq!(rows.len(), 1, "{}: {rows:?}", c.name);
                assert_eq!(rows[0].reason, *reason, "{}", c.name);
                for n in *names {
                    assert!(
                        rows[0].detail.contains(n),
                        "{}: {n:?} not in {:?}",
                        c.name,
                        rows[0].detail
                    );
                }
                assert!(!held.contains_key(c.crm_id), "{}: was sent", c.name);
            }
            Outcome::NoId => {
                assert_eq!(rows.len(), 1, "{}: {rows:?}", c.name);
                assert_eq!(rows[0].reason, "missing_id");
                assert_eq!(
                    rows[0].detail,
                    format!(
                        "record {}: id field Id is empty, so it has no Pendo id",
                        c.crm_id
                    )
                );
            }
        }
    }
    // The ambiguous id: both records listed, the detail naming the id; nothing sent for it.
    let dup: Vec<_> = invalid
        .iter()
        .filter(|r| r.reason == "ambiguous_id")
        .collect();
    assert_eq!(dup.len(), 1, "the second claimant is held back: {dup:?}");
    assert_eq!(dup[0].pendo_id.as_deref(), Some("001SHARED"));
    assert!(
        dup[0]
            .detail
            .contains("Pendo id 001SHARED is also the id of another CRM record")
    );
    assert!(
        held.get("001SHARED").is_none_or(|f| f.is_empty()),
        "ambiguous id sent"
    );
    assert_eq!(held["001TWINS"]["plantier"], json!("Starter"));
    // Nothing lost: every seeded good record arrived whole.
    for i in 0..10 {
        assert_eq!(held[&account_id(i)].len(), 5, "account {i}");
    }
    // Bad records stay visible in `queue list --state invalid` until fixed in the CRM; fixing one
    // there lets it through on the next cycle.
    t.crm
        .set_field("Account", "001BAD-NAN", "ARR__c", json!(42));
    t.sync().await;
    let arr = t.pendo.value(Kind::Account, "001BAD-NAN", "arr");
    assert_eq!(arr.and_then(|v| v.as_f64()), Some(42.0));
    let app = t.app().await;
    let still: Vec<_> = app
        .store
        .invalid_records(None)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.crm_id)
        .collect();
    app.store.close().await;
    assert!(!still.contains(&"001BAD-NAN".to_owned()), "{still:?}");
    assert!(still.contains(&"001BAD-INF".to_owned()), "{still:?}");
}

/// An owner removed in the CRM (`Owner: null`) clears the Pendo field; no error.
#[tokio::test]
async fn a_relationship_that_becomes_null_clears_the_field() {
    let t = TestApp::new().await;
    t.seed(3);
    t.sync().await;
    assert!(
        t.pendo
            .value(Kind::Account, &account_id(1), "owneremail")
            .is_some()
    );
    t.crm
        .set_field("Account", &account_id(1), "Owner", Value::Null);
    let report = t.sync().await;
    assert_eq!(report.cycles[0].invalid, 0);
    assert_eq!(
        t.pendo.value(Kind::Account, &account_id(1), "owneremail"),
        None
    );
    t.assert_converged();
}

/// The `accounts` mapping's records set aside, as (CRM id, reason, detail).
async fn set_aside(t: &TestApp) -> Vec<(String, String, String)> {
    let app = t.app().await;
    let rows = app.store.invalid_records(Some("accounts")).await.unwrap();
    app.store.close().await;
    rows.into_iter()
        .map(|r| (r.crm_id, r.reason, r.detail))
        .collect()
}

/// The outbox's values per state (staged, pending, held, unmatched, dead).
async fn outbox_counts(t: &TestApp) -> std::collections::BTreeMap<&'static str, i64> {
    let app = t.app().await;
    let counts = app.store.outbox_counts().await.unwrap();
    app.store.close().await;
    counts
}

crate::on_both_backends! {
    /// A NUL character (U+0000) in a CRM string (issue 22 item 6): PostgreSQL's jsonb and text
    /// refuse it, SQLite takes it, so one bad value used to fail every later cycle of its mapping
    /// on PostgreSQL (nothing else reached Pendo) and went to Pendo from SQLite. Now, on both
    /// alike, its record is set aside at mapping time with a message naming the field, whether
    /// the NUL is in a first value, replaces a value Pendo holds, or is in the id; the changes
    /// made beside it, and later ones, reach Pendo and nothing stays in the outbox.
    async fn a_nul_in_a_crm_string_sets_its_record_aside_on_both_backends(backend: Backend) {
        let Some(t) = TestApp::on(backend).await else {
            return;
        };
        const N: usize = 60;
        const SAYS: &str = "contains a NUL character (U+0000), which cannot be stored or sent";
        t.seed(N);
        // A first value with a NUL (nothing of the account is in Pendo yet).
        t.crm.set_field(
            "Account",
            &account_id(1),
            "Plan_Tier__c",
            json!("Gold\u{0}Plus"),
        );
        // An id with a NUL: the Salesforce Id is also the CRM record id.
        let nul_id = "001NUL\u{0}ID";
        let mut rec = account(N + 1);
        rec["Id"] = json!(nul_id);
        t.crm.upsert("Account", nul_id, rec);

        let report = t.sync().await;
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let rows = set_aside(&t).await;
        assert_eq!(rows.len(), 2, "{rows:?}");
        let first = rows
            .iter()
            .find(|r| r.0 == account_id(1))
            .unwrap_or_else(|| panic!("account 1 is not set aside: {rows:?}"));
        assert_eq!(first.1, "bad_value");
        assert!(
            first.2.contains("field plantier (from Plan_Tier__c): \"Gold\\0Plus\" ")
                && first.2.ends_with(SAYS),
            "{}",
            first.2
        );
        let in_id = rows
            .iter()
            .find(|r| r.0.starts_with("001NUL"))
            .unwrap_or_else(|| panic!("the NUL id is not set aside: {rows:?}"));
        assert_eq!(in_id.0, "001NUL\\0ID", "stored readable, without the NUL");
        assert_eq!(in_id.1, "bad_value");
        assert!(
            in_id.2.contains("field Id (from Id): the id ") && in_id.2.ends_with(SAYS),
            "{}",
            in_id.2
        );
        assert!(
            rows.iter().all(|r| !r.0.contains('\u{0}') && !r.2.contains('\u{0}')),
            "{rows:?}"
        );
        // The rest arrived; nothing of the two records was sent.
        let held = t.pendo.values(Kind::Account);
        for i in (0..N).filter(|i| *i != 1) {
            let id = account_id(i);
            assert_eq!(held[&id].len(), 5, "account {i}: {:?}", held[&id]);
            assert_eq!(held[&id]["plantier"], account(i)["Plan_Tier__c"], "account {i}");
        }
        assert!(
            held.get(&account_id(1)).is_none_or(|f| f.is_empty()),
            "{:?}",
            held.get(&account_id(1))
        );
        assert!(
            held.get(nul_id).is_none_or(|f| f.is_empty()),
            "{:?}",
            held.get(nul_id)
        );
        let counts = outbox_counts(&t).await;
        assert!(counts.values().all(|n| *n == 0), "{counts:?}");

        // A NUL over a value Pendo holds, with 20 ordinary changes made at the same time.
        let before = t.pendo.value(Kind::Account, &account_id(2), "plantier");
        assert_eq!(before, Some(json!("Enterprise")));
        t.crm.set_field(
            "Account",
            &account_id(2),
            "Plan_Tier__c",
            json!("Enterprise\u{0}"),
        );
        for i in 10..30 {
            t.crm.set_field(
                "Account",
                &account_id(i),
                "Plan_Tier__c",
                json!(format!("Tier {i}")),
            );
        }
        let report = t.sync().await;
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        for i in 10..30 {
            assert_eq!(
                t.pendo.value(Kind::Account, &account_id(i), "plantier"),
                Some(json!(format!("Tier {i}"))),
                "account {i}"
            );
        }
        assert_eq!(
            t.pendo.value(Kind::Account, &account_id(2), "plantier"),
            before,
            "Pendo keeps what it held"
        );
        let rows = set_aside(&t).await;
        assert_eq!(rows.len(), 3, "{rows:?}");
        let over = rows
            .iter()
            .find(|r| r.0 == account_id(2))
            .unwrap_or_else(|| panic!("account 2 is not set aside: {rows:?}"));
        assert!(
            over.2.contains("field plantier (from Plan_Tier__c): \"Enterprise\\0\" ")
                && over.2.ends_with(SAYS),
            "{}",
            over.2
        );
        let counts = outbox_counts(&t).await;
        assert!(counts.values().all(|n| *n == 0), "{counts:?}");

        // Later: ordinary changes go through, and a record fixed in the CRM is sent and no
        // longer listed.
        for i in 40..45 {
            t.crm.set_field(
                "Account",
                &account_id(i),
                "ARR__c",
                json!(2_000_000.0 + i as f64),
            );
        }
        t.crm.set_field("Account", &account_id(1), "Plan_Tier__c", json!("Gold Plus"));
        let report = t.sync().await;
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        for i in 40..45 {
            assert_eq!(
                t.pendo
                    .value(Kind::Account, &account_id(i), "arr")
                    .and_then(|v| v.as_f64()),
                Some(2_000_000.0 + i as f64),
                "account {i}"
            );
        }
        assert_eq!(
            t.pendo.value(Kind::Account, &account_id(1), "plantier"),
            Some(json!("Gold Plus"))
        );
        let rows = set_aside(&t).await;
        let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(ids.len(), 2, "{rows:?}");
        assert!(!ids.contains(&account_id(1).as_str()), "{rows:?}");
        let counts = outbox_counts(&t).await;
        assert!(counts.values().all(|n| *n == 0), "{counts:?}");
    }
}

/// The CRM answers something that is not JSON (a proxy's HTML page, a body cut short): the cycle
/// fails with a message saying so, its watermark stays, the other mapping still syncs, and the
/// next run picks the change up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_crm_answers_fail_the_cycle_cleanly() {
    let crm = Crm::start(CrmOptions::default()).await;
    crm.seed_accounts(12);
    crm.seed_contacts(4);
    crm.sync_until_clean(2).await;
    let html = "<!DOCTYPE html><html><head><title>Login | Salesforce</title></head><body>Maintenance</body></html>";
    let truncated =
        r#"{"totalSize":12,"done":true,"records":[{"attributes":{"type":"Account"},"Id":"001H"#;
    let cases: [(&str, SalesforceFault, SimFaults, &str, &str); 3] = [
        (
            "Salesforce sends an HTML page",
            SalesforceFault {
                forced: [(200, html.to_owned())].into(),
                ..SalesforceFault::default()
            },
            SimFaults::default(),
            "sf-accounts",
            "salesforce sent an unreadable answer: expected JSON",
        ),
        (
            "Salesforce sends truncated JSON",
            SalesforceFault {
                forced: [(200, truncated.to_owned())].into(),
                ..SalesforceFault::default()
            },
            SimFaults::default(),
            "sf-accounts",
            "salesforce sent an unreadable answer: expected JSON (EOF while parsing",
        ),
        (
            "HubSpot sends an HTML page",
            SalesforceFault::default(),
            SimFaults {
                html_pages: 1,
                ..SimFaults::default()
            },
            "hs-contacts",
            "hubspot sent an unreadable answer: expected a JSON object, got \"<html>",
        ),
    ];
    for (round, (name, sf_fault, hs_fault, failing, says)) in cases.into_iter().enumerate() {
        let app = crm.app().await;
        let before = app.store.watermark(failing).await.unwrap();
        app.store.close().await;
        // A change in each CRM; only the failing mapping's must wait.
        let arr = json!(5_000_000.0 + round as f64);
        crm.sf
            .set_field("Account", &sf_account_id(3), "ARR__c", arr.clone());
        let stage = format!("stage-{round}");
        crm.hs.upsert(
            "contacts",
            hs_contact_id(1),
            json!({"lifecyclestage": stage}),
        );
        crm.sf.set_fault(sf_fault);
        crm.hs.set_fault(hs_fault);
        let report = crm.sync().await;
        assert_eq!(report.failed.len(), 1, "{name}: {:?}", report.failed);
        let (mapping, error) = &report.failed[0];
        assert_eq!(mapping, failing, "{name}");
        assert!(error.contains(says), "{name}: {error}");
        assert!(
            error.starts_with(&format!("mapping {failing}: ")),
            "{name}: {error}"
        );
        let app = crm.app().await;
        assert_eq!(
            app.store.watermark(failing).await.unwrap(),
            before,
            "{name}: watermark moved"
        );
        app.store.close().await;
        let sf_now = crm
            .pendo
            .value(Kind::Account, &sf_account_id(3), "arr")
            .and_then(|v| v.as_f64());
        let arr = arr.as_f64();
        let hs_now = crm
            .pendo
            .value(Kind::Visitor, "person1@customer.example", "lifecyclestage");
        if failing == "sf-accounts" {
            assert_ne!(sf_now, arr, "{name}");
            assert_eq!(
                hs_now,
                Some(json!(stage)),
                "{name}: the other mapping went on"
            );
        } else {
            assert_eq!(sf_now, arr, "{name}: the other mapping went on");
            assert_ne!(hs_now, Some(json!(stage)), "{name}");
        }
        // The next run reads the same changes again and succeeds.
        crm.sync_until_clean(1).await;
        crm.assert_converged();
    }
}

// ---- Pendo answers ------------------------------------------------------------------------

/// Per-record `errors` in either shape (objects or strings) in a batch where other records
/// succeed: the erroring records keep Pendo's text, the others are confirmed, and the unknown
/// key the simulator adds to every answer (`kind`) changes nothing.
#[tokio::test]
async fn per_record_errors_in_both_shapes_spare_the_rest_of_the_batch() {
    for as_strings in [false, true] {
        // Pendo declares owneremail a number: only records that carry an owner email fail.
        let mut schema = ACCOUNT_FIELDS.to_vec();
        schema[2] = ("owneremail", "number");
        let t = TestApp::with(Options {
            schema,
            max_attempts: 2,
            errors_as_strings: as_strings,
            ..Options::default()
        })
        .await;
        t.seed(6);
        for i in [1, 4] {
            t.crm
                .set_field("Account", &account_id(i), "Owner", Value::Null);
        }
        t.sync().await;
        let answers: Vec<_> = t.writes().into_iter().map(|w| w.status).collect();
        assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
        let app = t.app().await;
        let rows = app
            .store
            .outbox_list(&QueueFilter::default(), 100)
            .await
            .unwrap();
        app.store.close().await;
        for i in 0..6 {
            let id = account_id(i);
            let mine: Vec<_> = rows.iter().filter(|r| r.pendo_id == id).collect();
            if i == 1 || i == 4 {
                assert!(mine.is_empty(), "{id}: {mine:?}");
                assert_eq!(
                    t.pendo.values(Kind::Account)[&id].len(),
                    4,
                    "{id} confirmed"
                );
                continue;
            }
            assert_eq!(mine.len(), 5, "{id}: the whole record waits: {mine:?}");
            let owner = format!("owner{}@acme.test", i % 7);
            let text = format!("value \"{owner}\" for field \"owneremail\" is not a valid number");
            let expected = if as_strings {
                format!("Pendo reported an error for account \"{id}\": {id}: {text}")
            } else {
                format!("Pendo reported an error for account \"{id}\": {text}")
            };
            for r in mine {
                assert_eq!(r.state, QueueState::Dead, "{id}");
                assert_eq!(r.last_error.as_deref(), Some(expected.as_str()), "{id}");
            }
        }
    }
}

/// A WAF's HTML 503 instead of JSON: a transient failure whose message quotes the page; the rows
/// wait in the outbox and go through on the next attempt.
#[tokio::test]
async fn an_html_503_from_pendo_is_retried_with_a_readable_message() {
    let t = TestApp::new().await;
    t.seed(4);
    // Three 503s use up the in-process attempts of the first batch.
    t.pendo.set_faults(PendoFaults {
        status_script: vec![503, 503, 503],
        ..PendoFaults::default()
    });
    let app = t.app().await;
    let cancel = CancellationToken::new();
    app.cycle(&t.settings.mappings[0], Mode::Incremental, false, &())
        .await
        .unwrap();
    app.drain(&cancel, Duration::ZERO).await.unwrap();
    let rows = app
        .store
        .outbox_list(&QueueFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(rows.len(), 20, "{rows:?}");
    for r in &rows {
        assert_eq!(r.state, QueueState::Pending);
        assert_eq!(
            r.last_error.as_deref(),
            Some(
                "Pendo is unavailable (503): <html><head><title>503 Service Unavailable</title></head><body><center><h1>503 Service Unavailable</h1></center></body></html>"
            )
        );
    }
    app.drain(&cancel, Duration::from_secs(5)).await.unwrap();
    app.store.close().await;
    t.assert_converged();
    assert!(
        t.app()
            .await
            .store
            .outbox_list(&QueueFilter::default(), 1)
            .await
            .unwrap()
            .is_empty()
    );
}
