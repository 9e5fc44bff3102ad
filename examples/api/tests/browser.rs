//! The dashboard in a real browser: Debian's Chromium, headless, driven over WebDriver.
//! It types text in the playground and hears the job stream into the `<audio>` element,
//! and requeues a dead letter and sees it leave the list. A screenshot is kept as a test
//! artifact: `target/test-artifacts/dashboard.png`.

use std::time::Duration;

use super::webdriver::Driver;
use super::{Setup, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_plays_the_playground_and_requeues_dead_letters() {
    let t = TestApp::start(Setup {
        worker: true,
        ..Setup::default()
    })
    .await;
    let dead = t.dead_job("Nobody speaks this.").await;
    let addr = t.serve().await;

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = driver.session(profile.path()).await;
    browser.goto(&format!("http://{addr}/")).await;

    // Live: the first snapshot fills the voice picker and the dead letters.
    browser
        .until(
            "the en-us voice",
            "return document.querySelector('#voice option[value=\"en-us\"]') !== null",
        )
        .await;
    browser.find(&format!("tr[data-dead=\"{dead}\"]")).await;

    // The playground: type, pick, speak; the job completes and the player has a source
    // that streams a WAV.
    browser
        .type_into("#text", "Hello from the browser test. It streams.")
        .await;
    browser.click("#voice option[value=\"en-us\"]").await;
    browser.click("#speak").await;
    let state = browser
        .until(
            "the job completed",
            "const s = document.getElementById('play-state').textContent; return s.endsWith(': completed') && s",
        )
        .await;
    assert!(state.as_str().unwrap().ends_with(": completed"), "{state}");
    let source = browser
        .until(
            "a playable source",
            "const p = document.getElementById('player'); return p.currentSrc && p.readyState >= 1 && !p.error && [p.currentSrc, p.duration]",
        )
        .await;
    assert!(
        source[0].as_str().unwrap().contains("/stream?format=wav"),
        "{source}"
    );

    // Requeue the dead letter: its row leaves the list and the job waits again.
    browser
        .click(&format!("tr[data-dead=\"{dead}\"] button.requeue"))
        .await;
    browser
        .until(
            "the dead letter gone",
            &format!("return document.querySelector('tr[data-dead=\"{dead}\"]') === null"),
        )
        .await;
    t.until_state(&dead, "queued").await;
    // A later snapshot (they come at least every 3 s) does not bring it back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let back = browser
        .eval(&format!(
            "return document.querySelector('tr[data-dead=\"{dead}\"]') !== null"
        ))
        .await;
    assert_eq!(back, false);

    let png = browser.screenshot().await;
    assert_eq!(&png[1..4], b"PNG");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.png"), png).unwrap();
    browser.close().await;
    t.stop().await;
}
