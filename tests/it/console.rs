//! The console as a person uses it: `pendo-sync run` (the real binary) against the Salesforce and
//! Pendo simulators, its pages loaded in a real headless Chromium. What the page shows must equal
//! `status --format json`; lists link to provenance; actions need the token; a hold is approved
//! from the page; and CRM values built to break out of HTML stay text.
//!
//! `PENDO_SYNC_SCREENSHOTS=docs cargo test console` rewrites the README's pictures.

use std::time::{Duration, Instant};

use pendo_sync::domain::Kind;
use pendo_sync::sim::salesforce::account_id;
use serde_json::{Value, json};

use crate::browser::Browser;
use crate::service::{ADMIN_TOKEN, Env, Options, VIEWER_TOKEN};

/// A CRM value that closes an attribute and a tag, then tries an image handler and a script.
const HOSTILE: &str =
    "\"'><img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>&amp;";

/// A Salesforce id (a Pendo id here) that closes an attribute: it lands in links, hidden form
/// values and titles.
const HOSTILE_ID: &str = "001\"'><img src=x onerror=window.__pwned=3>";

/// No element the CRM value could have made exists, and nothing it carried has run.
const NOTHING_INJECTED: &str = "return document.querySelectorAll('img').length === 0
    && document.querySelectorAll('script:not([src])').length === 0
    && window.__pwned === undefined";

async fn status_json(env: &Env) -> Value {
    let out = env.cli(&["status", "--format", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// Polls `/v1/status` until `done` says the service is where the test wants it.
async fn wait_status(env: &Env, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = env.get("/v1/status").await;
        if code == 200 {
            let v: Value = serde_json::from_str(&body).expect("status JSON");
            if done(&v) {
                return v;
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `[pointer, shown]` for every element of the page tagged with a status pointer.
async fn tagged_numbers(browser: &Browser) -> Vec<(String, String)> {
    let v = browser
        .js("return Array.from(document.querySelectorAll('[data-status]')).map(e =>
               [e.dataset.status, e.hasAttribute('data-value') ? e.dataset.value : e.textContent.trim()])")
        .await;
    serde_json::from_value(v).expect("pairs")
}

/// What the status document says at `pointer`, as the page should show it.
fn expected_at(status: &Value, pointer: &str) -> String {
    if pointer == "/open_holds/length" {
        return status["open_holds"]
            .as_array()
            .map_or(0, Vec::len)
            .to_string();
    }
    match status.pointer(pointer) {
        None => panic!("the page shows {pointer}, which status --format json does not have"),
        Some(Value::Null) => "null".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Every tagged number on the overview equals the same number in `status --format json`.
/// The service may move between the two reads (a retry comes due): a mismatch is read again,
/// and three in a row fail.
async fn overview_matches_status(env: &Env, browser: &Browser) -> Value {
    let mut last = String::new();
    for _ in 0..3 {
        browser.goto(&env.url("/")).await;
        let shown = tagged_numbers(browser).await;
        let status = status_json(env).await;
        assert!(
            shown.len() >= 20,
            "the overview tags only {} numbers: {shown:?}",
            shown.len()
        );
        let wrong: Vec<String> = shown
            .iter()
            .filter(|(p, text)| expected_at(&status, p) != *text)
            .map(|(p, text)| format!("{p}: page {text:?}, status {:?}", expected_at(&status, p)))
            .collect();
        if wrong.is_empty() {
            return status;
        }
        last = wrong.join("\n");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("the overview and status --format json differ:\n{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_status_model_links_lists_to_provenance_and_runs_no_crm_script() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let mut env = Env::new(Options {
        accounts: 50,
        create_missing: false,
        poll: "1h",
        ..Options::default()
    })
    .await;
    // Pendo knows 45 of the 50 accounts: 5 ids (15 values) wait as unmatched.
    for i in 0..45 {
        env.pendo.add_entity(Kind::Account, &account_id(i));
    }
    env.sf
        .set_field("Account", &account_id(0), "Plan_Tier__c", json!(HOSTILE));
    // A number field holding text: the record is set aside, its detail quoting the value.
    env.sf
        .set_field("Account", &account_id(1), "ARR__c", json!(HOSTILE));
    // An account Pendo does not know, whose id is hostile: 6 unmatched ids, 18 values.
    let mut record = env.sf.records("Account")[2].clone();
    record["Plan_Tier__c"] = json!("Growth");
    env.sf.upsert("Account", HOSTILE_ID, record);
    let _svc = env.start();
    wait_status(&env, "the first cycle and its push", |s| {
        s["mappings"][0]["last_run"]["ok"] == json!(true)
            && s["outbox"]["pending"] == json!(0)
            && s["outbox"]["unmatched"] == json!(18)
    })
    .await;

    // The overview: every number equals status --format json.
    let status = overview_matches_status(&env, &browser).await;
    assert_eq!(browser.text("#writer-state").await, "running");
    assert_eq!(
        browser
            .text("#outbox tr[data-state=unmatched] td:nth-child(2)")
            .await,
        "18"
    );
    // The chart: 96 slots of two bars, each tagged (and so checked above), and the totals.
    let chart = status["chart"].as_array().expect("chart");
    assert_eq!(chart.len(), 96, "{status}");
    let sum = |key: &str| -> i64 { chart.iter().map(|c| c[key].as_i64().unwrap()).sum() };
    assert!(sum("changes") > 0 && sum("pendo_requests") > 0, "{status}");
    assert_eq!(
        browser.text("#chart-changes").await,
        sum("changes").to_string()
    );
    assert_eq!(
        browser.text("#chart-requests").await,
        sum("pendo_requests").to_string()
    );
    assert_eq!(
        browser.text("#chart-cycles").await,
        sum("cycles").to_string()
    );
    let bars = browser
        .js("return document.querySelectorAll('#cycle-chart rect[data-status]').length")
        .await;
    assert_eq!(bars, json!(96 * 2));
    assert_eq!(browser.js(NOTHING_INJECTED).await, json!(true));
    assert_eq!(browser.csp_violations().await, Vec::<String>::new());
    browser.screenshot("console-overview").await;

    // A list, then one of its ids' provenance.
    browser.click("nav a[href='/queue/unmatched']").await;
    assert_eq!(browser.text("#list-total").await, "18");
    let rows = browser
        .js("return document.querySelectorAll('#list tbody tr').length")
        .await;
    assert_eq!(rows, json!(18));
    // The hostile id: in links, hidden form values and titles, and nothing of it ran or parsed.
    assert_eq!(browser.js(NOTHING_INJECTED).await, json!(true));
    let hostile_rows = browser
        .js(&format!(
            "return Array.from(document.querySelectorAll('#list td.id a')).filter(a => a.textContent === {}).length",
            json!(HOSTILE_ID)
        ))
        .await;
    assert_eq!(
        hostile_rows,
        json!(3),
        "one row per field, the id shown as text"
    );
    let values = browser
        .js(&format!(
            "return Array.from(document.querySelectorAll('#list input[name=id]')).filter(i => i.value === {}).length",
            json!(HOSTILE_ID)
        ))
        .await;
    assert_eq!(values, json!(6), "retry and drop carry the id intact");
    let mut hostile_link = None;
    for a in browser
        .client
        .find_all(fantoccini::Locator::Css("#list td.id a"))
        .await
        .unwrap()
    {
        if a.text().await.unwrap() == HOSTILE_ID {
            hostile_link = Some(a);
            break;
        }
    }
    hostile_link
        .expect("the hostile id's link")
        .click()
        .await
        .unwrap();
    assert_eq!(browser.text("#why-id").await, HOSTILE_ID);
    assert_eq!(browser.js(NOTHING_INJECTED).await, json!(true));
    browser.goto(&env.url("/queue/unmatched")).await;
    let first = browser.text("#list tbody tr td.id a").await;
    browser.click("#list tbody tr td.id a").await;
    assert_eq!(browser.text("#why-id").await, first);
    let fields = browser
        .js("return document.querySelectorAll('#why-fields tbody tr').length")
        .await;
    assert_eq!(fields, json!(3));

    // The id filter.
    browser.goto(&env.url("/queue/unmatched")).await;
    browser
        .type_into("form.filter input[name=id]", &account_id(47))
        .await;
    browser.click("form.filter button").await;
    browser
        .until(
            "the filtered list",
            "return document.getElementById('list-total')?.textContent === '3'",
        )
        .await;
    let bulk = browser
        .js("return document.querySelectorAll('.bulk form').length")
        .await;
    assert_eq!(
        bulk,
        json!(0),
        "no action on the whole state from a filtered list"
    );

    // The search box, and a hostile value shown as text on the provenance page.
    browser.goto(&env.url("/")).await;
    browser
        .type_into("form.search input[name=id]", &account_id(0))
        .await;
    browser.click("form.search button").await;
    assert_eq!(browser.text("#why-id").await, account_id(0));
    let plantier = browser
        .text("#why-fields tr[data-field=plantier] td.value")
        .await;
    assert!(plantier.contains(HOSTILE), "{plantier:?}");
    assert_eq!(browser.js(NOTHING_INJECTED).await, json!(true));

    // "Check live" needs the token; with it, the verdict comes in as text.
    browser.click("#check-live").await;
    browser
        .until(
            "the refusal",
            "return document.getElementById('live').textContent.includes('refused')",
        )
        .await;
    browser.sign_in(ADMIN_TOKEN, "operator").await;
    // The session is an HttpOnly cookie the page's scripts cannot read, and the token is kept
    // nowhere in the page.
    assert_eq!(browser.js("return document.cookie").await, json!(""));
    assert_eq!(
        browser
            .js("return sessionStorage.length + localStorage.length")
            .await,
        json!(0)
    );
    let cookies = browser.client.get_all_cookies().await.expect("cookies");
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    assert!(cookies[0].http_only() == Some(true), "{cookies:?}");
    assert!(!cookies[0].value().contains(ADMIN_TOKEN), "{cookies:?}");
    browser.click("#check-live").await;
    assert!(
        !browser
            .client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .contains(ADMIN_TOKEN)
    );
    let verdict = browser.text("#verdict").await;
    assert!(verdict.contains("agree"), "{verdict}");
    assert_eq!(browser.js(NOTHING_INJECTED).await, json!(true));
    assert_eq!(browser.csp_violations().await, Vec::<String>::new());

    // The record set aside: listed with its hostile detail as text.
    browser.click("nav a[href='/queue/invalid']").await;
    assert_eq!(browser.text("#list-total").await, "1");
    let detail = browser.text("#list tbody td.error").await;
    assert!(
        detail.contains("ARR__c") || detail.contains("arr"),
        "{detail}"
    );
    assert_eq!(browser.js(NOTHING_INJECTED).await, json!(true));

    // An ordinary account's provenance for the README, checked live.
    browser
        .goto(&env.url(&format!("/why/account/{}", account_id(5))))
        .await;
    browser.click("#check-live").await;
    assert!(browser.text("#verdict").await.contains("agree"));
    browser.screenshot("console-why").await;

    // Queue actions with the token: drop one id's values, retry the rest by hand.
    browser.goto(&env.url("/queue/unmatched")).await;
    let dropped = browser.text("#list tbody tr td.id a").await;
    browser
        .click("#list tbody tr td.actions form[data-action='/v1/queue/drop'] button")
        .await;
    browser.accept_confirm().await;
    browser
        .until(
            "the list after the drop",
            "return document.getElementById('list-total')?.textContent === '15'",
        )
        .await;
    assert_eq!(status_json(&env).await["outbox"]["unmatched"], json!(15));
    let other = browser.text("#list tbody tr td.id a").await;
    browser
        .click(".bulk form[data-action='/v1/queue/retry'] button")
        .await;
    browser.accept_confirm().await;
    browser
        .until(
            "the retry's answer",
            "return document.querySelector(\".bulk form[data-action='/v1/queue/retry'] output\")?.textContent === 'done'",
        )
        .await;
    browser
        .goto(&env.url(&format!("/why/account/{other}")))
        .await;
    let events = browser.text("#why-events").await;
    assert!(events.contains("retried"), "{events}");
    browser
        .goto(&env.url(&format!("/why/account/{dropped}")))
        .await;
    let events = browser.text("#why-events").await;
    assert!(events.contains("dropped"), "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_is_approved_from_the_console_by_an_operator_not_a_viewer() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let mut env = Env::new(Options {
        accounts: 150,
        default_guard: true,
        poll: "1h",
        viewer_token: true,
        ..Options::default()
    })
    .await;
    let out = env.cli(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for i in 0..150 {
        env.sf
            .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Bulk"));
    }
    let out = env.cli(&["sync"]).await;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    // On every interface, as in a container: reading needs a sign-in.
    let port = env.admin.rsplit(':').next().unwrap().to_owned();
    let svc = env.start_on(&format!("0.0.0.0:{port}"));
    env.wait_ready(&svc, Duration::from_secs(30)).await;

    browser.goto(&env.url("/")).await;
    assert!(browser.text("#signin-message").await.contains("CRM data"));
    browser.sign_in_here(VIEWER_TOKEN).await;
    assert_eq!(browser.text("#open-holds").await, "1");
    browser.click("#holds a[href='/holds/1']").await;
    assert_eq!(browser.text("#hold-state").await, "open");
    assert_eq!(browser.text("#hold-values").await, "150");
    assert_eq!(browser.csp_violations().await, Vec::<String>::new());
    browser
        .until(
            "the viewer's session",
            "return document.getElementById('session-state').textContent.endsWith('(viewer)')",
        )
        .await;

    // As a viewer: refused, and the hold stays open.
    browser.click("#approve-form button").await;
    browser.accept_confirm().await;
    browser
        .until(
            "the refusal",
            "return document.querySelector('#approve-form output').textContent.includes('refused')",
        )
        .await;
    browser.goto(&env.url("/holds/1")).await;
    assert_eq!(browser.text("#hold-state").await, "open");

    browser.sign_in(ADMIN_TOKEN, "operator").await;
    assert_eq!(browser.text("#hold-state").await, "open");
    browser
        .type_into("#approve-form input[name=reason]", "price change announced")
        .await;
    browser.click("#approve-form button").await;
    browser.accept_confirm().await;
    browser
        .until(
            "the approved hold",
            "return document.getElementById('hold-state')?.textContent === 'approved'",
        )
        .await;
    env.wait_converged(&svc, Duration::from_secs(30)).await;
    browser.goto(&env.url("/")).await;
    assert_eq!(browser.text("#open-holds").await, "0");
    let out = env.cli(&["holds", "show", "1"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("price change announced"), "{stdout}");

    // A resync from the overview (the token is still in the tab), followed to its end: every
    // value goes to Pendo again.
    let writes_before = env.pendo_writes();
    browser
        .client
        .find(fantoccini::Locator::Css(
            "#resync-form select[name=mapping] option[value='sf-accounts']",
        ))
        .await
        .expect("the mapping is offered")
        .click()
        .await
        .expect("select");
    browser.click("#resync-form button").await;
    browser.accept_confirm().await;
    browser
        .until(
            "the resync to finish",
            "return /resync .*: done/.test(document.querySelector('#resync-form output').textContent)",
        )
        .await;
    let shown = browser.text("#resync-form output").await;
    assert!(shown.contains("150 records read"), "{shown}");
    assert!(env.pendo_writes() > writes_before, "the resync sent again");

    // Auto-refresh: the overview reloads itself every 10 s once asked to, and remembers it.
    browser.goto(&env.url("/")).await;
    browser.click("#auto-refresh").await;
    browser.js("window.__before_reload = 1; return true").await;
    browser
        .until_within(
            "the overview to reload itself",
            "return window.__before_reload === undefined && document.getElementById('auto-refresh')?.checked === true",
            Duration::from_secs(30),
        )
        .await;
}

/// The headers and refusals, over plain HTTP (no browser needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_carry_a_strict_csp_and_actions_need_the_token() {
    let mut env = Env::new(Options {
        accounts: 5,
        poll: "1h",
        ..Options::default()
    })
    .await;
    let svc = env.start();
    env.wait_ready(&svc, Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    for path in [
        "/",
        "/queue/pending",
        "/holds",
        "/assets/console.js",
        "/nowhere",
    ] {
        let resp = client.get(env.url(path)).send().await.unwrap();
        let h = resp.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        for part in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(part), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
    }
    let page = client
        .get(env.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        page.matches("<script").count(),
        1,
        "one script, from /assets: {page}"
    );
    assert!(page.contains("<script src=\"/assets/console.js\" defer></script>"));
    // The token is typed into the sign-in page's form only, which POSTs it (a GET form would
    // put it in the URL); no page holds a token box.
    assert!(!page.contains("type=\"password\""), "{page}");
    let signin = client
        .get(env.url("/signin?next=/holds"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let form = signin
        .split("<form")
        .find(|f| f.contains("id=\"signin-form\""))
        .expect("the sign-in form");
    let form = &form[..form.find('>').unwrap()];
    assert!(form.contains("method=\"post\""), "{form}");
    assert!(form.contains("action=\"/signin\""), "{form}");

    // A page of another site pointing its name at 127.0.0.1 (DNS rebinding) is not answered.
    let r = client
        .get(env.url("/"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    let r = client
        .get(env.url("/v1/status"))
        .header(
            "host",
            format!("localhost:{}", env.admin.rsplit(':').next().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let post = |path: &str, token: Option<&str>, body: Value| {
        let mut r = client.post(env.url(path)).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let r = post("/v1/queue/drop", None, json!({"state": "pending"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = post("/v1/queue/drop", Some("wrong"), json!({"state": "pending"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = post("/v1/queue/drop", Some(ADMIN_TOKEN), json!({}))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        400,
        "dropping everything takes a state or an id"
    );
    let r = post(
        "/v1/queue/retry",
        Some(ADMIN_TOKEN),
        json!({"state": "invalid"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let r = post(
        "/v1/queue/retry",
        Some(ADMIN_TOKEN),
        json!({"state": "dead"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"retried": 0}));
    // Dropping a record set aside drops it from the named mapping only.
    {
        let store = pendo_sync::store::Store::open(&env.dir.path().join("state.db"))
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO invalid_records (mapping, crm_id, pendo_id, reason, detail, seen_at)
             VALUES ('sf-accounts', 'BAD1', NULL, 'bad_value', 'x', 0),
                    ('sf-other', 'BAD1', NULL, 'bad_value', 'x', 0)",
        )
        .execute(store.pool())
        .await
        .unwrap();
        store.close().await;
    }
    let r = post(
        "/v1/queue/drop",
        Some(ADMIN_TOKEN),
        json!({"state": "invalid", "mapping": "sf-accounts", "id": "BAD1"}),
    )
    .await
    .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"dropped": 1}));
    let r = post(
        "/v1/queue/drop",
        Some(ADMIN_TOKEN),
        json!({"state": "pending", "mapping": "sf-accounts"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400, "mapping selects records set aside only");

    let (code, _) = env
        .get(&format!("/why/account/{}/live", account_id(0)))
        .await;
    assert_eq!(code, 401, "checking live spends quota: token only");
    let (code, body) = env.get("/queue/nowhere").await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = env.get("/queue/pending?after=garbage").await;
    assert_eq!(code, 400, "{body}");
}
