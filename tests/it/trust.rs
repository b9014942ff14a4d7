//! Issue "trust in the field": the smaller guarantees a code review found unenforced.

use pendo_sync::connectors::Watermark;
use pendo_sync::store::PageCommit;

use crate::helpers::TestApp;

/// The connector contract says watermarks never move backward; the store enforces it, so a
/// connector bug (or a clock step) cannot make a mapping re-read from an older point and then
/// store that older point over a newer one.
#[tokio::test]
async fn a_stored_watermark_never_moves_backward() {
    let t = TestApp::new().await;
    let app = t.app().await;
    let commit_to = |mapping: &'static str, w: &str| {
        let w = Watermark(w.to_owned());
        let store = app.store.clone();
        async move {
            store
                .commit_page(&PageCommit {
                    mapping,
                    watermark: Some(&w),
                    ..Default::default()
                })
                .await
                .unwrap();
            store.watermark(mapping).await.unwrap().unwrap().0
        }
    };
    let commit = |w: &str| commit_to("accounts", w);
    assert_eq!(commit("100").await, "100");
    assert_eq!(commit("99").await, "100", "a numeric watermark went back");
    assert_eq!(commit("120").await, "120");
    let sf = |ts: &str, id: &str| format!(r#"{{"id":"{id}","ts":"{ts}"}}"#);
    let later = sf("2026-11-20T10:00:00.000Z", "001B");
    assert_eq!(commit(&later).await, later);
    let earlier = sf("2026-11-20T09:59:59.000Z", "001Z");
    assert_eq!(commit(&earlier).await, later, "a Salesforce cursor went back");
    let tie = sf("2026-11-20T10:00:00.000Z", "001A");
    assert_eq!(commit(&tie).await, later, "same time, smaller id is earlier");
    let hs = |ms: i64, id: &str| format!(r#"{{"id":"{id}","ms":{ms}}}"#);
    let h = hs(1_700_000_000_000, "5");
    assert_eq!(commit_to("contacts", &h).await, h);
    let back = hs(1_699_999_999_999, "9");
    assert_eq!(commit_to("contacts", &back).await, h, "a HubSpot mark went back");
    app.store.close().await;
}
