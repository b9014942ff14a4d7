//! The admin port on a shared network (DESIGN "Who may see what"): the real binary bound to
//! `0.0.0.0`, asked over plain HTTP the way a neighbour on the cluster network, a browser with a
//! session, a forged cross-site form and a sign-in proxy would ask.

use std::net::IpAddr;
use std::time::Duration;

use pendo_sync::sim::salesforce::account_id;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::service::{ADMIN_TOKEN, Env, Options, VIEWER_TOKEN, free_port};

/// The proxy the config trusts; requests from 127.0.0.1 are from elsewhere.
const PROXY: &str = "127.0.0.2";

/// A port on every interface with both tokens, a listed host name and a trusted sign-in proxy.
async fn shared_port(accounts: usize, default_guard: bool) -> (Env, crate::service::Service) {
    let mut env = Env::new(Options {
        accounts,
        default_guard,
        poll: "1h",
        viewer_token: true,
        admin_extra: "allowed_hosts = [\"pendo-sync.test\"]\n\
                      trusted_user_header = \"X-Forwarded-Email\"\n\
                      trusted_proxies = [\"127.0.0.2/32\"]\n\
                      trusted_role = \"operator\"\n",
        ..Options::default()
    })
    .await;
    if default_guard {
        // A hold to decide: every account's plan tier changes at once after the first sync.
        let out = env.cli(&["sync"]).await;
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        for i in 0..accounts {
            env.sf
                .set_field("Account", &account_id(i), "Plan_Tier__c", json!("Bulk"));
        }
        let out = env.cli(&["sync"]).await;
        assert_eq!(out.status.code(), Some(4), "{out:?}");
    }
    // Bound to every interface; reached over loopback.
    let port = env.admin.rsplit(':').next().unwrap().to_owned();
    let svc = env.start_on(&format!("0.0.0.0:{port}"));
    env.wait_ready(&svc, Duration::from_secs(30)).await;
    (env, svc)
}

fn client_from(addr: Option<&str>) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(addr.map(|a| a.parse::<IpAddr>().unwrap()))
        .build()
        .unwrap()
}

/// The session cookie a sign-in set (`name=value`), and the whole `Set-Cookie` line.
async fn sign_in(env: &Env, token: &str) -> (String, String) {
    let resp = client_from(None)
        .post(env.url("/signin"))
        .form(&[("token", token), ("next", "/holds")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/holds");
    let line = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    (line.split(';').next().unwrap().to_owned(), line)
}

async fn csrf_of(env: &Env, cookie: &str) -> String {
    let session: Value = client_from(None)
        .get(env.url("/session"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    session["csrf"].as_str().expect("a csrf value").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_crm_data_needs_credentials_and_roles_hold() {
    let (env, svc) = shared_port(5, false).await;
    let anyone = client_from(None);
    let id = account_id(0);

    // Probes and the scraper: open (readiness may say 503 for its own reasons, never 401).
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = anyone.get(env.url(path)).send().await.unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert!(
            status == 200 || (path == "/readyz" && status == 503),
            "{path}: {status} {body}"
        );
    }
    // Every page and read that shows CRM data: refused, with no CRM data in the answer.
    let crm_paths = [
        "/".to_owned(),
        "/queue/pending".to_owned(),
        "/queue/invalid".to_owned(),
        "/holds".to_owned(),
        "/holds/1".to_owned(),
        format!("/why/account/{id}"),
        format!("/why?kind=account&id={id}"),
        "/v1/status".to_owned(),
        "/v1/holds".to_owned(),
        "/v1/holds/1".to_owned(),
        format!("/v1/why/account/{id}"),
        "/v1/resync/r-1".to_owned(),
    ];
    for path in &crm_paths {
        let r = anyone.get(env.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let body = r.text().await.unwrap();
        // (A refused page's sign-in form carries its own path back, id and all.)
        assert!(path.contains(&id) || !body.contains(&id), "{path}: {body}");
        assert!(!body.contains("sf-accounts"), "{path}: {body}");
        if !path.starts_with("/v1/") {
            assert!(body.contains("id=\"signin-form\""), "{path}: {body}");
        }
    }
    // A wrong token is no credential.
    let r = anyone
        .get(env.url("/v1/status"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The viewer reads, and cannot act.
    let r = anyone
        .get(env.url(&format!("/v1/why/account/{id}")))
        .bearer_auth(VIEWER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = anyone
        .get(env.url("/"))
        .bearer_auth(VIEWER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("sf-accounts"));
    for (path, body) in [
        ("/v1/queue/retry", json!({"state": "dead"})),
        ("/v1/resync", json!({})),
        ("/v1/holds/1/approve", json!({})),
    ] {
        let r = anyone
            .post(env.url(path))
            .bearer_auth(VIEWER_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
    let r = anyone
        .get(env.url(&format!("/v1/why/account/{id}?live=true")))
        .bearer_auth(VIEWER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        403,
        "checking live spends quota: the operator's"
    );
    // The operator acts.
    let r = anyone
        .post(env.url("/v1/queue/retry"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"state": "dead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Host names: the listed one and loopback names are answered, others get 421 (the probes
    // answer whatever the Host: a kubelet names the pod's address).
    let with_host = |host: &'static str, path: &'static str| {
        anyone
            .get(env.url(path))
            .bearer_auth(VIEWER_TOKEN)
            .header("host", host)
            .send()
    };
    assert_eq!(
        with_host("pendo-sync.test:9464", "/v1/status")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        with_host("evil.example", "/v1/status")
            .await
            .unwrap()
            .status(),
        421
    );
    assert_eq!(with_host("10.1.2.3:9464", "/").await.unwrap().status(), 421);
    assert_eq!(
        with_host("10.1.2.3:9464", "/readyz")
            .await
            .unwrap()
            .status(),
        200
    );

    // The trusted header from an address that is not a listed proxy: ignored.
    let r = anyone
        .get(env.url("/v1/status"))
        .header("x-forwarded-email", "mallory@evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A viewer's session reads and cannot act even with its own CSRF value.
    let (viewer, _) = sign_in(&env, VIEWER_TOKEN).await;
    let r = anyone
        .get(env.url("/queue/pending"))
        .header("cookie", &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csrf = csrf_of(&env, &viewer).await;
    let r = anyone
        .post(env.url("/v1/queue/retry"))
        .header("cookie", &viewer)
        .header("x-csrf-token", &csrf)
        .json(&json!({"state": "dead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_a_signed_cookie_and_a_forged_cross_site_post_fails() {
    let (env, svc) = shared_port(5, false).await;
    let anyone = client_from(None);

    // A wrong token: the form again, no cookie.
    let r = anyone
        .post(env.url("/signin"))
        .form(&[("token", "guess"), ("next", "/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    // A sign-in posted by a page of another site: refused.
    let r = anyone
        .post(env.url("/signin"))
        .header("origin", "http://evil.example")
        .form(&[("token", ADMIN_TOKEN), ("next", "/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // `next` never leads off the port.
    let r = anyone
        .post(env.url("/signin"))
        .form(&[("token", ADMIN_TOKEN), ("next", "//evil.example/x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/");

    let (cookie, line) = sign_in(&env, ADMIN_TOKEN).await;
    let port = env.admin.rsplit(':').next().unwrap();
    assert!(
        cookie.starts_with(&format!("pendo_sync_session_{port}=")),
        "{line}"
    );
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(line.contains(part), "{part}: {line}");
    }
    assert!(!line.contains(ADMIN_TOKEN), "{line}");
    let r = anyone
        .get(env.url("/holds"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The forged cross-site POST: the browser sends the cookie, but the form cannot send the
    // CSRF header.
    let r = anyone
        .post(env.url("/v1/queue/drop"))
        .header("cookie", &cookie)
        .header("origin", "http://evil.example")
        .header("content-type", "text/plain")
        .body(r#"{"state": "pending"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = anyone
        .post(env.url("/v1/resync"))
        .header("cookie", &cookie)
        .header("x-csrf-token", "0123456789abcdef0123456789abcdef")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a guessed CSRF value");
    // A tampered cookie is no session.
    // (The MAC's last hex digit changed: to '1' if it was '0', else to '0'.)
    let last = if cookie.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{}{last}", &cookie[..cookie.len() - 1]);
    let r = anyone
        .get(env.url("/holds"))
        .header("cookie", &tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // With the session's CSRF value, the operator acts from the console.
    let csrf = csrf_of(&env, &cookie).await;
    let r = anyone
        .post(env.url("/v1/queue/retry"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .json(&json!({"state": "dead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Signing out drops the cookie.
    let r = anyone
        .post(env.url("/signout"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    // Neither token reached the log, the session document or a page.
    let session = anyone
        .get(env.url("/session"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let page = anyone
        .get(env.url("/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (what, text) in [("log", svc.log()), ("/session", session), ("/", page)] {
        for token in [ADMIN_TOKEN, VIEWER_TOKEN] {
            assert!(!text.contains(token), "{what}: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_named_by_the_trusted_proxy_decides_a_hold_and_is_recorded() {
    let (env, _svc) = shared_port(150, true).await;
    let proxy = client_from(Some(PROXY));
    let as_ana = |r: reqwest::RequestBuilder| r.header("x-forwarded-email", "ana@acme.test");

    let r = as_ana(proxy.get(env.url("/holds/1"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let session: Value = as_ana(proxy.get(env.url("/session")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session["who"], "ana@acme.test");
    assert_eq!(session["via"], "proxy");
    // Through the proxy a browser's request is cross-site-protected too.
    let r = as_ana(proxy.post(env.url("/v1/holds/1/approve")))
        .json(&json!({"reason": "planned"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = as_ana(proxy.post(env.url("/v1/holds/1/approve")))
        .header("x-csrf-token", session["csrf"].as_str().unwrap())
        .json(&json!({"reason": "planned"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let out = env.cli(&["holds", "show", "1"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ana@acme.test"), "{stdout}");

    // The same header from an unlisted address names nobody.
    let r = as_ana(client_from(None).get(env.url("/holds/1")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn reads_need_credentials_by_default_beyond_loopback_only() {
    // The default: loopback, reads open, actions for the operator only (as before).
    let env = Env::new(Options {
        accounts: 1,
        poll: "1h",
        ..Options::default()
    })
    .await;
    let load = |listen: &str| {
        let env_vars = [("PENDO_SYNC__ADMIN__LISTEN".to_owned(), listen.to_owned())];
        pendo_sync::config::Settings::load_with_env(&env.config, env_vars.into_iter().collect())
            .expect("valid")
    };
    assert!(!load(&env.admin).admin.reads_need_credentials);
    let wide = load(&format!("0.0.0.0:{}", free_port()));
    assert!(
        wide.admin.reads_need_credentials,
        "the default beyond loopback"
    );
}
