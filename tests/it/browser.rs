//! A real headless Chromium for the console's tests, driven over WebDriver (fantoccini) through
//! Debian's chromedriver on a free loopback port. `.ci/run` installs both; on a machine without
//! them the browser tests say so and pass only outside CI (under `CI=true` they fail).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// A chromedriver child and a browser session on it; both end when dropped.
pub(crate) struct Browser {
    pub(crate) client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium outlives a killed chromedriver (it is reparented, not killed), so the whole
        // process group chromedriver leads goes, whether the test passed or panicked.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.wait();
    }
}

fn chromedriver() -> Option<PathBuf> {
    let path = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"));
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the console's browser tests need chromedriver at {} (`.ci/run` installs Debian's chromium and chromium-driver)",
        path.display()
    );
    eprintln!(
        "SKIPPED: no chromedriver at {} (install Debian's chromium and chromium-driver, or run `bash .ci/run`)",
        path.display()
    );
    None
}

impl Browser {
    /// Starts chromedriver and a headless Chromium, or `None` outside CI when they are missing.
    pub(crate) async fn start() -> Option<Browser> {
        let driver_path = chromedriver()?;
        let port = crate::service::free_port();
        let profile = tempfile::tempdir().expect("temp dir");
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).unwrap();
        let driver = Command::new(driver_path)
            .arg(format!("--port={port}"))
            // Its own process group, which Chromium joins: see `Drop`.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while reqwest::get(format!("{url}/status")).await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": binary,
                "args": [
                    "--headless=new",
                    // CI runs as root, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    // No network but loopback here: nothing may try to reach Google.
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-quic",
                    "--no-first-run",
                    // No crash handler: it starts its own session and would outlive the test.
                    "--disable-crash-reporter",
                    "--disable-breakpad",
                    "--window-size=1360,1700",
                    format!("--user-data-dir={}", profile.path().join("profile").display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a Chromium session starts");
        Some(Browser {
            client,
            driver,
            _profile: profile,
        })
    }

    pub(crate) async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("the page loads");
    }

    /// The text of the first element matching `css`, waiting up to 10 s for it to appear.
    pub(crate) async fn text(&self, css: &str) -> String {
        let el = self
            .client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css:?} on the page: {e}"));
        el.text().await.expect("element text")
    }

    pub(crate) async fn click(&self, css: &str) {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css:?} to click: {e}"))
            .click()
            .await
            .expect("click");
    }

    pub(crate) async fn type_into(&self, css: &str, text: &str) {
        let el = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no field {css:?}: {e}"));
        el.clear().await.expect("clear");
        el.send_keys(text).await.expect("typing");
    }

    /// Runs a script in the page and returns its value.
    pub(crate) async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script {script:?} failed: {e}"))
    }

    /// What the page's Content-Security-Policy blocked since it loaded (`directive blocked-url`),
    /// read through a buffered ReportingObserver: a style attribute or an inline script added
    /// to a template would break the page silently under the CSP, and shows here.
    pub(crate) async fn csp_violations(&self) -> Vec<String> {
        let v = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 const seen = [];
                 const observer = new ReportingObserver(
                   (reports) => reports.forEach((r) => seen.push(r.body.effectiveDirective + ' ' + r.body.blockedURL)),
                   { types: ['csp-violation'], buffered: true });
                 observer.observe();
                 setTimeout(() => { observer.takeRecords().forEach((r) => seen.push(r.body.effectiveDirective + ' ' + r.body.blockedURL)); done(seen); }, 200);",
                vec![],
            )
            .await
            .expect("the CSP reports");
        serde_json::from_value(v).expect("strings")
    }

    /// Waits until `script` returns true (up to 15 s).
    pub(crate) async fn until(&self, what: &str, script: &str) {
        self.until_within(what, script, Duration::from_secs(15))
            .await;
    }

    /// Waits until `script` returns true, up to `limit`.
    pub(crate) async fn until_within(&self, what: &str, script: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.js(script).await == json!(true) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Accepts the page's `confirm()` once it shows.
    pub(crate) async fn accept_confirm(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.client.accept_alert().await.is_err() {
            assert!(Instant::now() < deadline, "no confirm dialog appeared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Signs in through the page: the header's "Sign in" link, the token typed into the form,
    /// back on the page it came from, signed in as `role` (the session is a cookie).
    pub(crate) async fn sign_in(&self, token: &str, role: &str) {
        let before = self.js("return location.pathname + location.search").await;
        self.until(
            "the sign-in link",
            "return !!document.getElementById('signin-link') && !document.getElementById('signin-link').hidden && document.getElementById('signin-link').href.includes('next=')",
        )
        .await;
        self.click("#signin-link").await;
        self.sign_in_here(token).await;
        assert_eq!(
            self.js("return location.pathname + location.search").await,
            before,
            "back where the sign-in started"
        );
        self.until(
            "the session to show",
            &format!(
                "return (document.getElementById('session-state')?.textContent || '').endsWith('({role})')"
            ),
        )
        .await;
    }

    /// Fills in and sends the sign-in form of the page shown now.
    pub(crate) async fn sign_in_here(&self, token: &str) {
        self.type_into("#signin-token", token).await;
        self.click("#signin-form button").await;
        self.until(
            "the page after signing in",
            "return document.readyState === 'complete' && !document.getElementById('signin-form')",
        )
        .await;
    }

    /// A PNG of the window, written to `$PENDO_SYNC_SCREENSHOTS/<name>.png` when that variable
    /// names a folder (the README's pictures come from here).
    pub(crate) async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("PENDO_SYNC_SCREENSHOTS") else {
            return;
        };
        let png = self.client.screenshot().await.expect("screenshot");
        let path = PathBuf::from(dir).join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// Processes whose command line names `needle` (pgrep -f).
fn processes_naming(needle: &str) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-f", needle])
        .output()
        .expect("pgrep runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A test that ends, passing or panicking, leaves no Chromium behind: left running they pile up
/// (nine after three runs here) and steal the benches' CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_browser_leaves_no_process_behind() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let profile = browser._profile.path().display().to_string();
    browser.goto("about:blank").await;
    assert!(
        !processes_naming(&profile).is_empty(),
        "Chromium runs with the profile {profile}"
    );
    drop(browser);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_naming(&profile);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still running after the drop: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
