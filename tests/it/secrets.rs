//! Guarantee 8: the integration key never appears in Debug output, logs (trace level), errors,
//! the state file or status.

use pendo_sync::sim::pendo::PendoFaults;

use crate::helpers::{CANARY_KEY, Captured, TestApp};

#[tokio::test]
async fn the_canary_key_never_leaks() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let t = TestApp::new().await;
    t.seed(5);
    // Errors too: a refused key, server errors, and a dropped connection all produce messages.
    t.pendo.set_faults(PendoFaults {
        status_script: vec![500, 403],
        ..Default::default()
    });
    let report = t.sync().await;
    t.sync().await;
    let app = t.app().await;
    let status = pendo_sync::status::status_report(&t.settings, &app.store)
        .await
        .unwrap();

    let mut texts = vec![
        format!("{:?}", t.settings),
        format!("{:?}", app.pendo),
        format!("{:?}", app.writer),
        format!("{report:?}"),
        serde_json::to_string(&status).unwrap(),
        format!("{:?}", t.settings.pendo.integration_key_source),
    ];
    texts.push(String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned());
    app.store.close().await;
    for file in ["state.db", "state.db-wal"] {
        if let Ok(bytes) = std::fs::read(t.dir.path().join(file)) {
            texts.push(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    assert!(texts.last().unwrap().len() > 1000 || texts.len() > 7);
    assert!(
        texts[6].contains("TRACE") || texts[6].contains("DEBUG"),
        "trace logging was captured"
    );
    for text in &texts {
        assert!(
            !text.contains(CANARY_KEY),
            "the key leaked into: {}",
            &text[..text.len().min(300)]
        );
        assert!(
            !text.contains("canary-sf-secret"),
            "the Salesforce secret leaked"
        );
    }
}

#[cfg(unix)]
#[tokio::test]
async fn the_state_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let t = TestApp::new().await;
    let app = t.app().await;
    let mode = std::fs::metadata(app.store.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "state file mode {mode:o}");
}
